"""The GPU record: onnxruntime's CUDA ceiling three ways, then digit-server on it.

    python -m bench.gpu --model models/model.onnx --samples reports/bench/samples.npz

1. In-process at batch 256 (images/s): numpy in and out (what the server does), IO binding
   (the input copied to the device by onnxruntime, the output bound there and copied back),
   and device-resident IO (input already on the GPU, output left there: the ceiling no
   server fed over a network reaches). Plus max |p_cuda - p_cpu| with TF32 off and on.
2. digit-server with each `--server PROVIDER:WORKERS` (default: cuda with --workers 1, 8 and
   auto, cpu with auto; `floor:-` is the bare grpc.aio floor) under bulk load (256-image raw
   f32 Classify requests) and single-image load (64 callers), each load from several
   processes. One JSON document on stdout.

Without a GPU the CUDA ceilings are skipped (and cuda servers refuse to start).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from bench import servers
from bench.measure import Workload, measure
from digit_recognizer.server.cpus import available_cpus

BATCH = 256


def _rate(run: Callable[[], object], seconds: float) -> float:
    for _ in range(5):
        run()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += 1
    return done * BATCH / (time.perf_counter() - started)


def ceiling(model: Path, images: np.ndarray, seconds: float) -> dict:
    batch = np.ascontiguousarray(np.resize(images, (BATCH, images.shape[1])), np.float32)
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name, output = cpu.get_inputs()[0].name, cpu.get_outputs()[0].name
    result = {"cpu numpy": _rate(lambda: cpu.run([output], {name: batch}), seconds)}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return result
    expected = cpu.run([output], {name: images})[0]
    for tf32 in ("0", "1"):
        session = ort.InferenceSession(
            str(model), providers=[("CUDAExecutionProvider", {"use_tf32": tf32})]
        )
        got = session.run([output], {name: images})[0]
        result[f"max |p_cuda - p_cpu|, tf32 {tf32}"] = float(np.abs(got - expected).max())
    cuda = ort.InferenceSession(
        str(model), providers=[("CUDAExecutionProvider", {"use_tf32": "0"})]
    )
    result["cuda numpy"] = _rate(lambda: cuda.run([output], {name: batch}), seconds)
    binding = cuda.io_binding()

    def bound() -> None:
        binding.bind_cpu_input(name, batch)
        binding.bind_output(output, "cuda")
        cuda.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    result["cuda io binding"] = _rate(bound, seconds)
    resident = cuda.io_binding()
    resident.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
    resident.bind_output(output, "cuda")
    result["cuda device-resident"] = _rate(lambda: cuda.run_with_iobinding(resident), seconds)
    return result


def through_server(
    model: Path, samples: Path, provider: str, workers: str, duration: float, logs: Path,
    bulk_callers: int,
) -> list[dict]:  # fmt: skip
    port = servers.free_port()
    if provider == "floor":
        server = servers.floor(port)
    else:
        flags = ("--provider", provider, "--workers", workers)
        server = servers.ours(f"digit-server {' '.join(flags)}", model, "", port, *flags)
    images = np.load(samples)["images"]
    runs = []
    # 8 and 4 load processes with 4 connections each: enough connections for every worker
    # of a 16-core box to get some (SO_REUSEPORT spreads connections, not calls).
    loads = ((Workload("bulk", "classify", BATCH, bulk_callers, connections=4), 8),
             (Workload("single", "classify", 1, 64, connections=4), 4))  # fmt: skip
    with servers.running(server, port, logs, images) as running:
        for workload, clients in loads:
            result = measure(
                running, workload, samples=samples, clients=clients, warmup_s=1.0,
                duration_s=duration, cores=available_cpus(),
            )  # fmt: skip
            runs.append({"provider": provider, "workers": workers, **result.as_dict()})
            click.echo(
                f"{server.name} {workload.name} x{workload.concurrency}: "
                f"{result.images_per_s:,.0f} images/s, p50 {result.p50_ms:.2f} ms, cpu server "
                f"{result.server_cpu:.1f} clients {result.client_cpu:.1f} ({result.limit}), "
                f"errors {result.errors}",
                err=True,
            )
    return runs


@click.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--samples", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--server",
    "matrix",
    multiple=True,
    default=("cuda:1", "cuda:8", "cuda:auto", "cpu:auto"),
    show_default=True,
    help="PROVIDER:WORKERS to measure, repeatable; floor:- is the bare grpc.aio floor",
)
@click.option("--bulk-callers", type=int, default=16, show_default=True)
@click.option("--no-ceiling", is_flag=True, help="skip the in-process measurements")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="per measurement")
@click.option("--logs", type=click.Path(path_type=Path), default=Path("reports/bench/gpu-logs"))
def main(
    model: Path, samples: Path, matrix: tuple[str, ...], bulk_callers: int, no_ceiling: bool,
    seconds: float, logs: Path,
) -> None:  # fmt: skip
    """onnxruntime's ceiling on this machine, then digit-server's figures on it."""
    images = np.load(samples)["images"].astype(np.float32)
    record: dict = {"cpus": available_cpus(), "providers": ort.get_available_providers()}
    if not no_ceiling:
        record["ceiling_images_per_s"] = ceiling(model, images, seconds)
        click.echo(json.dumps(record["ceiling_images_per_s"]), err=True)
    record["runs"] = [
        run
        for entry in matrix
        for run in through_server(
            model, samples, *_provider_and_workers(entry), seconds, logs, bulk_callers
        )
    ]
    click.echo(json.dumps(record, indent=1))


def _provider_and_workers(entry: str) -> tuple[str, str]:
    provider, _, workers = entry.partition(":")
    return provider, workers


if __name__ == "__main__":
    main()
