"""Runs inside its own venv with tritonclient[grpc], used as its docs show (defaults included).
Usage: python triton_protocol_grpc.py HOST:PORT MODEL NOT_READY_MODEL -> one JSON line:
the model's config, its statistics before and after one infer of 3 images and a stream of 100
requests of one image each (then one bad request in the same stream), the stream's replies,
and is_model_ready for the model, a model that is not ready and an unknown one."""

import json
import sys
from functools import partial

import numpy as np
import tritonclient.grpc as triton


def images_of(*digits: int) -> np.ndarray:
    images = np.zeros((len(digits), 784), np.float32)
    for row, digit in enumerate(digits):
        images[row, digit] = 1.0
    return images


def pixels(images: np.ndarray) -> list:
    tensor = triton.InferInput("pixels", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return [tensor]


def main() -> None:
    target, model, not_ready = sys.argv[1:4]
    client = triton.InferenceServerClient(url=target)
    config = client.get_model_config(model, as_json=True)["config"]
    before = client.get_inference_statistics(model, as_json=True)["model_stats"]
    infer = client.infer(model, pixels(images_of(3, 1, 4)))

    replies: list[dict] = []

    def on_reply(replies: list[dict], result, error) -> None:
        if error is not None:
            replies.append({"error": str(error.message())})
        else:
            response = result.get_response()
            digits = result.as_numpy("probabilities").argmax(axis=1).tolist()
            replies.append({"id": response.id, "digits": digits})

    client.start_stream(callback=partial(on_reply, replies))
    for i in range(100):
        client.async_stream_infer(model, pixels(images_of(i % 10)), request_id=str(i))
    bad = triton.InferInput("pixels", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    client.async_stream_infer(model, [bad], request_id="bad")
    client.stop_stream()  # waits for every reply
    after = client.get_inference_statistics(model, as_json=True)["model_stats"]
    print(
        json.dumps(
            {
                "config": config,
                "extensions": client.get_server_metadata(as_json=True)["extensions"],
                "infer": infer.as_numpy("probabilities").argmax(axis=1).tolist(),
                "stats_before": before,
                "stats_after": after,
                "stream": replies,
                "ready": {
                    "model": client.is_model_ready(model),
                    "not_ready": client.is_model_ready(not_ready),
                    "unknown": client.is_model_ready("no-such-model"),
                },
            }
        )
    )
    client.close()


if __name__ == "__main__":
    main()
