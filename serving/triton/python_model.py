"""Triton python-backend model: runs a version's ``model.onnx`` with onnxruntime on CPU.

Copied as ``<repository>/<model>/<version>/model.py`` by ``serving.triton.repository``; it runs
inside the Triton venv (numpy<2, onnxruntime), never in the project's venv, and imports nothing
from the project.

Contract (see ``serving.export``): input ``features`` ``FP32 [batch, F]``, output
``probabilities`` ``FP32 [batch, H]``. With dynamic batching Triton hands ``execute`` several
requests; they are concatenated into one onnxruntime call and the result split back per request.

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

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"


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
        self.n_features = int(self.session.get_inputs()[0].shape[1])
        self.label = f"{args['model_name']} v{args['model_version']}"
        pb_utils.Logger.log_info(f"{self.label}: onnxruntime {ort.__version__}, {path}, {threads} thread(s)")

    def execute(self, requests):
        arrays, errors = [], {}
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            x = None if tensor is None else tensor.as_numpy()
            if x is None or x.ndim != 2 or x.shape[1] != self.n_features or x.dtype != np.float32:
                got = "nothing" if x is None else f"{x.dtype} {list(x.shape)}"
                errors[i] = f"{self.label}: input '{INPUT_NAME}' must be FP32 [batch, {self.n_features}], got {got}"
                arrays.append(None)
            else:
                arrays.append(x)
        good = [a for a in arrays if a is not None]
        out = None
        if good:
            x = good[0] if len(good) == 1 else np.concatenate(good)
            try:
                out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            except Exception as exc:  # one failure answers every request of the batch with the reason
                message = f"{self.label}: onnxruntime failed: {exc}"
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, offset = [], 0
        for i, x in enumerate(arrays):
            if x is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            part = out[offset:offset + len(x)]
            offset += len(x)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)]))
        return responses

    def finalize(self):
        self.session = None
