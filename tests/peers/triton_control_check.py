"""Runs inside its own venv with tritonclient[grpc] or tritonclient[http] (whichever is
installed; give the matching port). Usage: python triton_control_check.py HOST:PORT MODEL
-> one JSON line: explicit model control as Triton's docs show it (load_model,
is_model_ready, get_model_config, infer, unload_model), against a server started with
--model-control-mode explicit --load-model a."""

import json
import sys

import numpy as np

try:
    import tritonclient.grpc as triton
except (ImportError, RuntimeError):  # the http venv has no grpcio
    import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def main() -> None:
    target, model = sys.argv[1], sys.argv[2]
    client = triton.InferenceServerClient(url=target)

    def ready() -> dict:
        return {name: client.is_model_ready(name) for name in ("a", model)}

    before = ready()
    client.load_model(model)
    after_load = ready()
    if triton.__name__ == "tritonclient.grpc":  # a ModelConfigResponse, as JSON on request
        config = client.get_model_config(model, as_json=True)["config"]
    else:
        config = client.get_model_config(model)
    images = np.zeros((2, 784), np.float32)
    images[0, 3] = images[1, 1] = 1.0
    pixels = triton.InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images)
    result = client.infer(model, [pixels])
    digits = result.as_numpy("probabilities").argmax(axis=1).tolist()
    client.unload_model(model)
    after_unload = ready()
    try:
        client.load_model("nope")
        load_unknown = "loaded"
    except InferenceServerException as exc:
        load_unknown = str(exc)
    print(
        json.dumps(
            {
                "before": before,
                "after_load": after_load,
                "config": {"max_batch_size": int(config["max_batch_size"])},
                "digits": digits,
                "after_unload": after_unload,
                "load_unknown": load_unknown,
            }
        )
    )


if __name__ == "__main__":
    main()
