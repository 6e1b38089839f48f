"""BentoML serving of the light and heavy rankers (service, process control, client, CLI).

The wire format (``serving.bento.protocol``) is binary: float32 little-endian matrices in the
request and response bodies, shapes and model names in headers. JSON would cost 50-100 ms per
1000 rows on this path.
"""
