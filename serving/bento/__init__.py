"""BentoML serving of the light and heavy rankers (service, process control, client;
the CLI ``home-mixer serve bentoml ...`` is in ``home_mixer/cli.py``).

The wire format (``serving.bento.protocol``) is binary: float32 little-endian matrices in the
request and response bodies, shapes and model names in headers. JSON would cost 50-100 ms per
1000 rows on this path.
"""
