"""The compute ceiling: onnxruntime in-process on the exported model, no serving at all.

Images per second at each batch size, for each intra-op thread count; the best setting per
batch size is what no server on this machine can exceed.

    python -m bench.ceiling models/model.onnx --seconds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

from digit_recognizer.protos.contract import PIXELS_PER_IMAGE

BATCH_SIZES = (1, 32, 128, 256, 1024)  # 256: the bench's bulk request size


def images_per_second(session: ort.InferenceSession, batch: int, seconds: float) -> float:
    name = session.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).random((batch, PIXELS_PER_IMAGE), dtype=np.float32)}
    for _ in range(3):
        session.run(None, feed)
    runs = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feed)
        runs += 1
    return runs * batch / elapsed


def measure(
    model: str, seconds: float, thread_counts: list[int], batch_sizes: tuple[int, ...]
) -> dict:
    """{"rows": [{"batch", "threads", "images_per_s"}...], "best": {batch: {...}}}."""
    rows = []
    for threads in thread_counts:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for batch in batch_sizes:
            rate = images_per_second(session, batch, seconds)
            rows.append({"batch": batch, "threads": threads, "images_per_s": rate})
    best = {}
    for batch in batch_sizes:
        best[str(batch)] = max(
            (row for row in rows if row["batch"] == batch), key=lambda row: row["images_per_s"]
        )
    return {"rows": rows, "best": best}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size and setting")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="intra-op thread counts to try",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = parser.parse_args(argv)
    result = measure(args.model, args.seconds, args.threads, tuple(args.batch_sizes))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
