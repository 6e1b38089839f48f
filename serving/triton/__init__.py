"""Serving the registered rankers on a real Triton server (python backend running onnxruntime).

- ``install``: where ``scripts/setup_triton.sh`` put tritonserver (its own venv);
- ``repository``: the model repository built and synced from the MLflow registry;
- ``server``: ``TritonServer``, the ``tritonserver`` process (a ``core.services.ManagedProcess``)
  on loopback ports, and model (re)loads;
- ``client``: ``TritonRankerClient.predict`` with binary tensors and deadlines.

The CLI (``home-mixer serve triton ...``, ``home-mixer export``) is in ``home_mixer/cli.py``.
"""
