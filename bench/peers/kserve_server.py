"""KServe 0.21 serving the model: a `kserve.Model` whose predict runs onnxruntime, behind
KServe's own gRPC v2 server. Runs in the bench's KServe venv, never in the project's.

Configured by environment (KServe parses sys.argv itself on import): BENCH_MODEL (.onnx),
BENCH_MODEL_NAME, BENCH_GRPC_PORT, BENCH_HTTP_PORT. KServe has no server-side batching."""

from __future__ import annotations

import os

import grpc.aio._server
import kserve
import kserve.protocol.rest.server as rest_server
import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse

# KServe binds [::] (gRPC) and 0.0.0.0 (REST) unconditionally; the bench stays on loopback.
_add_port = grpc.aio._server.Server.add_insecure_port
grpc.aio._server.Server.add_insecure_port = lambda self, address: _add_port(  # type: ignore[method-assign]
    self, "127.0.0.1:" + address.rsplit(":", 1)[1]
)


class _LoopbackConfig(uvicorn.Config):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


rest_server.uvicorn.Config = _LoopbackConfig  # type: ignore[misc]


class Mnist(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True

    def predict(
        self,
        payload: InferRequest,
        headers: dict | None = None,
        response_headers: dict | None = None,
    ) -> InferResponse:
        pixels = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        probabilities = self.session.run(None, {self.input_name: pixels})[0]
        output = InferOutput(self.output_name, list(probabilities.shape), "FP32")
        output.set_data_from_numpy(probabilities, binary_data=True)
        return InferResponse(
            response_id=payload.id,
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=True,
        )


if __name__ == "__main__":
    kserve.ModelServer(
        grpc_port=int(os.environ["BENCH_GRPC_PORT"]),
        http_port=int(os.environ["BENCH_HTTP_PORT"]),
        workers=1,
        enable_latency_logging=False,
    ).start([Mnist(os.environ["BENCH_MODEL_NAME"], os.environ["BENCH_MODEL"])])
