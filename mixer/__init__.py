"""The mixer service: the home-timeline request path (see mixer/pipeline.py) and its HTTP API (mixer/api.py)."""
