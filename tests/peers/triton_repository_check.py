"""Runs inside its own venv with tritonclient[grpc]. Usage: python triton_repository_check.py
HOST:PORT -> one JSON line: the repository index and, for every ready version in it, the
digits it gives images of 3, 1 and 4."""

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    client = triton.InferenceServerClient(url=sys.argv[1])
    index = client.get_model_repository_index(as_json=True).get("models", [])
    images = np.zeros((3, 784), np.float32)
    for row, digit in enumerate((3, 1, 4)):
        images[row, digit] = 1.0
    pixels = triton.InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images)
    answers = {}
    for entry in index:
        if entry.get("state") == "READY":
            result = client.infer(entry["name"], [pixels], model_version=entry["version"])
            response = result.get_response()
            key = f"{entry['name']}/{entry['version']}"
            answers[key] = {
                "digits": result.as_numpy("probabilities").argmax(axis=1).tolist(),
                "version": response.model_version,
            }
    print(json.dumps({"index": index, "answers": answers}))


if __name__ == "__main__":
    main()
