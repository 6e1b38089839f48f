"""Serving the registered rankers on a real Triton server (python backend running onnxruntime).

- ``install``: where ``scripts/setup_triton.sh`` put tritonserver (its own venv);
- ``repository``: the model repository built and synced from the MLflow registry;
- ``server``: start/stop/status/load of a ``tritonserver`` process on loopback ports;
- ``client``: ``TritonRankerClient.predict`` with binary tensors and deadlines;
- ``cli``: ``home-mixer serve triton ...`` and ``home-mixer export``.
"""
