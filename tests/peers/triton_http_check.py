"""Runs inside its own venv with tritonclient[http]. Usage: python triton_http_check.py
HOST:PORT MODEL -> one JSON line (JSON tensors; the binary-data extension is not served)."""

import json
import sys

import numpy as np
import tritonclient.http as triton


def main() -> None:
    target, model = sys.argv[1], sys.argv[2]
    client = triton.InferenceServerClient(url=target)
    images = np.zeros((2, 784), np.float32)
    images[0, 7] = images[1, 2] = 1.0
    pixels = triton.InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images, binary_data=False)
    wanted = triton.InferRequestedOutput("probabilities", binary_data=False)
    result = client.infer(model, [pixels], outputs=[wanted], request_id="h1")
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready(model),
                "inputs": client.get_model_metadata(model)["inputs"],
                "digits": result.as_numpy("probabilities").argmax(axis=1).tolist(),
                "id": result.get_response()["id"],
            }
        )
    )


if __name__ == "__main__":
    main()
