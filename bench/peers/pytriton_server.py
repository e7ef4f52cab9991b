"""Triton Inference Server (the tritonserver 2.51 binary PyTriton 0.7 ships, CPU only here)
serving the model: a PyTriton `@batch` function running onnxruntime, with Triton's dynamic
batcher. Runs in the bench's PyTriton venv, never in the project's.

    python pytriton_server.py MODEL.onnx MODEL_NAME GRPC_PORT HTTP_PORT METRICS_PORT

The bench sets LD_LIBRARY_PATH to this interpreter's LIBDIR: Triton's Python stub must load
the same libpython as the venv, or the model fails to load."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH_SIZE = 256


def main() -> None:
    model, model_name = sys.argv[1:3]
    grpc_port, http_port, metrics_port = map(int, sys.argv[3:6])
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {output_name: session.run(None, {input_name: inputs[input_name]})[0]}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=http_port,
        metrics_address="127.0.0.1",
        metrics_port=metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=model_name,
            infer_func=infer,
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=(784,))],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=(10,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE,
                batcher=DynamicBatcher(max_queue_delay_microseconds=0),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
