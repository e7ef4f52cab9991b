"""Runs inside its own venv with tritonclient[grpc] (never in the project's environment: it
pins protobuf<7). Usage: python triton_client_check.py HOST:PORT MODEL -> one JSON line."""

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    target, model = sys.argv[1], sys.argv[2]
    client = triton.InferenceServerClient(url=target)
    metadata = client.get_model_metadata(model, as_json=True)
    images = np.zeros((3, 784), np.float32)
    for row, digit in enumerate((3, 1, 4)):
        images[row, digit] = 1.0
    pixels = triton.InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images)
    result = client.infer(
        model, [pixels], outputs=[triton.InferRequestedOutput("probabilities")], request_id="t1"
    )
    try:
        client.get_model_metadata("no-such-model")
        unknown = "no error"
    except triton.InferenceServerException as exc:
        unknown = exc.status()
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready(model),
                "inputs": metadata["inputs"],
                "digits": result.as_numpy("probabilities").argmax(axis=1).tolist(),
                "id": result.get_response().id,
                "unknown_model": unknown,
            }
        )
    )


if __name__ == "__main__":
    main()
