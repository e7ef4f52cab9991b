"""Runs inside its own venv with kserve: its InferenceRESTClient (protocol v2) with binary
tensor data both ways, as kserve's docs show. Usage: python kserve_rest_check.py HOST:PORT
MODEL NOT_READY_MODEL -> one JSON line: the digits of 3 images sent binary and answered binary,
and is_model_ready for the model and a model that is not ready."""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def main() -> None:
    target, model, not_ready = sys.argv[1:4]
    base_url = f"http://{target}"
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    images = np.zeros((3, 784), np.float32)
    for row, digit in enumerate((3, 1, 4)):
        images[row, digit] = 1.0
    pixels = InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images, binary_data=True)
    request = InferRequest(
        model_name=model,
        infer_inputs=[pixels],
        request_id="k1",
        request_outputs=[RequestedOutput("probabilities", parameters={"binary_data": True})],
    )
    headers: dict[str, str] = {}
    response = await client.infer(base_url, request, model_name=model, response_headers=headers)
    (output,) = response.outputs
    print(
        json.dumps(
            {
                "digits": output.as_numpy().argmax(axis=1).tolist(),
                "id": response.id,
                "binary_reply": "inference-header-content-length" in headers,
                "ready": {
                    "model": await client.is_model_ready(base_url, model),
                    "not_ready": await client.is_model_ready(base_url, not_ready),
                },
            }
        )
    )
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
