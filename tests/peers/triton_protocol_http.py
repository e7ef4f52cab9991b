"""Runs inside its own venv with tritonclient[http], used as its docs show (defaults included:
set_data_from_numpy sends binary tensor data, InferRequestedOutput asks for binary outputs, no
outputs asks for all of them binary). Usage: python triton_protocol_http.py HOST:PORT MODEL
NOT_READY_MODEL -> one JSON line: server metadata, the model's config, its statistics before
and after three infers, their digits, and is_model_ready for the model, a model that is not
ready and an unknown one."""

import json
import sys

import numpy as np
import tritonclient.http as triton


def images_of(*digits: int) -> np.ndarray:
    images = np.zeros((len(digits), 784), np.float32)
    for row, digit in enumerate(digits):
        images[row, digit] = 1.0
    return images


def main() -> None:
    target, model, not_ready = sys.argv[1:4]
    client = triton.InferenceServerClient(url=target)
    config = client.get_model_config(model)
    before = client.get_inference_statistics(model)["model_stats"]

    # 1. The defaults: binary input, no outputs named (all of them, binary).
    images = images_of(3, 1, 4)
    binary = triton.InferInput("pixels", list(images.shape), "FP32")
    binary.set_data_from_numpy(images)
    defaults = client.infer(model, [binary], request_id="b1")
    # 2. UINT8 pixels in binary, the output asked for by name (binary by default).
    u8 = (images_of(2, 7) * 255).astype(np.uint8)
    as_u8 = triton.InferInput("pixels", list(u8.shape), "UINT8")
    as_u8.set_data_from_numpy(u8)
    named = client.infer(model, [as_u8], outputs=[triton.InferRequestedOutput("probabilities")])
    # 3. JSON in, binary out.
    as_json = triton.InferInput("pixels", [1, 784], "FP32")
    as_json.set_data_from_numpy(images_of(9), binary_data=False)
    mixed = client.infer(model, [as_json], outputs=[triton.InferRequestedOutput("probabilities")])

    after = client.get_inference_statistics(model)["model_stats"]
    print(
        json.dumps(
            {
                "extensions": client.get_server_metadata()["extensions"],
                "config": config,
                "stats_before": before,
                "stats_after": after,
                "defaults": defaults.as_numpy("probabilities").argmax(axis=1).tolist(),
                "defaults_id": defaults.get_response()["id"],
                "defaults_binary": "data" not in defaults.get_response()["outputs"][0],
                "uint8": named.as_numpy("probabilities").argmax(axis=1).tolist(),
                "json_in_binary_out": mixed.as_numpy("probabilities").argmax(axis=1).tolist(),
                "ready": {
                    "model": client.is_model_ready(model),
                    "not_ready": client.is_model_ready(not_ready),
                    "unknown": client.is_model_ready("no-such-model"),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
