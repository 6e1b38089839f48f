"""Triton python-backend model: runs a version's ``model.onnx`` with onnxruntime on CPU.

Copied as ``<repository>/<model>/<version>/model.py`` by ``serving.triton.repository``; it runs
inside the Triton venv (numpy<2, onnxruntime), never in the project's venv, and imports nothing
from the project.

Contract: the inputs and outputs are the ONNX model's own, each ``[batch, width]``: a ranker's
``features`` ``FP32 [batch, F]`` -> ``probabilities`` ``FP32 [batch, H]`` (``serving.export``), the
two-tower user tower's ``post``/``author``/``action`` ``INT64`` and ``mask`` ``FP32 [batch, L]`` ->
``user_embedding`` ``FP32 [batch, D]`` (``serving.user_tower_export``). With dynamic batching Triton
hands ``execute`` several requests; each input is concatenated over them into one onnxruntime call
and the outputs are split back per request.

Model-config parameters (``config.pbtxt``): ``intra_op_threads`` (onnxruntime intra-op threads,
default 2). Idle threads do not spin (``session.intra_op.allow_spinning = 0``): the server shares
the cores with the mixer, and spinning workers would take CPU from it between requests (no
measurable cost here: 1000 rows of the light ranker take 1.8 ms with or without spinning).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads") or 2)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        # (name, dtype, width) of every input; the width is fixed by the exporters, the batch dynamic
        self.inputs = [(i.name, ORT_DTYPES[i.type], int(i.shape[1])) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.label = f"{args['model_name']} v{args['model_version']}"
        pb_utils.Logger.log_info(f"{self.label}: onnxruntime {ort.__version__}, {path}, {threads} thread(s)")

    def _read(self, request):
        """``({input name: array}, None)`` or ``(None, error message)`` for one request."""
        arrays, rows = {}, None
        for name, dtype, width in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            x = None if tensor is None else tensor.as_numpy()
            if x is None or x.ndim != 2 or x.shape[1] != width or x.dtype != dtype or (rows not in (None, len(x))):
                got = "nothing" if x is None else f"{x.dtype} {list(x.shape)}"
                kind = "FP32" if dtype == np.float32 else "INT64"
                return None, f"{self.label}: input '{name}' must be {kind} [batch, {width}] (one batch for all inputs), got {got}"
            arrays[name], rows = x, len(x)
        return arrays, None

    def execute(self, requests):
        read = [self._read(r) for r in requests]
        good = [a for a, _ in read if a is not None]
        out = None
        if good:
            feed = {name: good[0][name] if len(good) == 1 else np.concatenate([a[name] for a in good])
                    for name, _, _ in self.inputs}
            try:
                out = self.session.run(self.outputs, feed)
            except Exception as exc:  # one failure answers every request of the batch with the reason
                message = f"{self.label}: onnxruntime failed: {exc}"
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, offset = [], 0
        for arrays, error in read:
            if arrays is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            n = len(next(iter(arrays.values())))
            tensors = [pb_utils.Tensor(name, o[offset:offset + n]) for name, o in zip(self.outputs, out)]
            offset += n
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.session = None
