"""`make bench`: one run, one machine, one model; table, JSON and plot.

python -m bench --model models/model.onnx --out reports/bench
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
import numpy as np
from rich.console import Console

from bench import model_option, report, servers
from bench.measure import Measurement, Workload, measure
from bench.venvs import VenvError, peer_python
from digit_recognizer.server.cpus import available_cpus
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.inference import InferenceOptions, Model, load_model
from digit_recognizer.trainer.data import (
    SHARED_DATA_DIR,
    DataError,
    load_dataset,
    resolve_data_dir,
    to_model_inputs,
)

CONCURRENCIES = (1, 16, 64, 256)
BULK = Workload("bulk", "classify", 256, 4)
BULK_U8 = Workload("bulk u8", "classify", 256, 4, "u8")
# One program with the project's client library: one process, one AsyncDigitClient and its
# pool (a connection to each worker), 64 callers; beside the many-process single-image load.
ONE_CLIENT = Workload("one client", "client", 1, 64, connections=0, processes=1)
# This server's Open Inference Protocol front, for the same loads the peers get over it; and
# its REST routes for 256 images a request: JSON tensors, and Triton's binary tensor data.
V2 = (
    Workload("v2", "infer", 1, 64),
    Workload("v2 bulk", "infer", 256, 4),
    Workload("v2 bulk u8", "infer", 256, 4, "u8"),
    Workload("v2 rest bulk", "rest", 256, 4),
    Workload("v2 rest bulk binary", "rest-binary", 256, 4),
)
CPUS = available_cpus()
# --workers N between one process and the default (one per CPU): the scaling curve.
SCALING = tuple(n for n in (2, 4, 8, 16, 32, 64) if n < CPUS)
PEER_REQUIREMENTS = {
    "kserve": ("kserve==0.21.0", "onnxruntime==1.31.1"),
    # uvloop 0.22 crashes MLServer's inference worker (SeldonIO/MLServer#2286).
    "mlserver": ("mlserver==1.7.1", "uvloop<0.22", "onnxruntime==1.31.1"),
    "pytriton": ("nvidia-pytriton==0.7.0", "onnxruntime==1.31.1"),
}
console = Console(stderr=True)


def single(concurrency: int, call: str = "classify") -> Workload:
    return Workload("single" if call != "stream" else "stream", call, 1, concurrency)


def as_v2(workloads: list[Workload]) -> list[Workload]:
    return [Workload(w.name, "infer", w.images, w.concurrency) for w in workloads]


def plan(quick: bool) -> list[tuple[str, list[Workload]]]:
    """(server key, workloads) in run order."""
    sweep = [single(c) for c in ((1, 64) if quick else CONCURRENCIES)]
    return [
        ("floor", [*sweep, single(64, "stream"), BULK]),
        ("default", [*sweep, ONE_CLIENT, BULK, BULK_U8, single(64, "stream"), *V2]),
        ("one-process", [single(1), single(64), ONE_CLIENT, BULK]),
        ("batching-off", [single(64), BULK]),
        *[(f"workers-{n}", [single(64), BULK]) for n in SCALING],
        ("kserve", as_v2([*sweep, BULK])),
        ("mlserver", as_v2([*sweep, BULK])),
        ("mlserver-0", as_v2([single(64), BULK])),
        ("pytriton", as_v2([*sweep, BULK])),
    ]


def samples_file(out: Path, data_dir: str | None, model: Model) -> Path:
    """1,024 MNIST test digits and the digits this model gives them in-process: a server
    that answers anything else (wrong order, wrong rows) is counted as wrong."""
    location = resolve_data_dir(data_dir)
    if location is None or not location.exists():
        raise click.ClickException(
            f"no MNIST data at {location or SHARED_DATA_DIR}: pass --data-dir or set MNIST_DATA_DIR"
        )
    try:
        dataset = load_dataset(location)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    path = out / "samples.npz"
    images = to_model_inputs(dataset.x_test[:1024])
    probabilities = model.predict(images)[:, : model.num_classes]  # then the digit score
    np.savez(path, images=images, expected=probabilities.argmax(axis=1))
    return path


def make_server(key: str, model: Path, name: str, port: int, work: Path) -> servers.Server:
    if key == "floor":
        return servers.floor(port)
    if key == "default":
        label = f"digit-server (default: --workers auto = {CPUS})"
        return servers.ours(label, model, name, port)
    if key == "one-process":
        return servers.ours("digit-server --workers 1", model, name, port, "--workers", "1")
    if key == "batching-off":
        flags = ("--workers", "1", "--max-batch-size", "1")
        return servers.ours(
            "digit-server --workers 1 --max-batch-size 1", model, name, port, *flags
        )
    if key.startswith("workers-"):
        count = key.split("-")[1]
        return servers.ours(
            f"digit-server --workers {count}", model, name, port, "--workers", count
        )
    peer = key.split("-")[0]
    python = peer_python(peer, *PEER_REQUIREMENTS[peer])
    if peer == "kserve":
        return servers.kserve(python, model, name, port)
    if peer == "mlserver":
        workers = 0 if key == "mlserver-0" else 1
        return servers.mlserver(python, model, name, port, workers, work / f"mlserver-{workers}")
    return servers.pytriton(python, model, name, port)


def machine() -> dict:
    import grpc
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def median_run(runs: list[Measurement]) -> dict:
    """The round with the median requests/s (the lower middle for an even count), with every
    round's figure kept beside it."""
    ordered = sorted(runs, key=lambda run: run.requests_per_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    return {
        **chosen.as_dict(),
        "rounds_requests_per_s": [run.requests_per_s for run in runs],
        "rounds_p50_ms": [run.p50_ms for run in runs],
        "rounds_p99_ms": [run.p99_ms for run in runs],
        "rounds_per_worker": [run.per_worker for run in runs],
    }


def group(workload: Workload) -> tuple[str, int, int, str]:
    """Workloads compared with each other, whatever protocol each server speaks."""
    return (workload.name, workload.images, workload.concurrency, workload.encoding)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default="reports/bench",
    show_default=True,
    help="bench.json, bench.png, logs",
)
@click.option(
    "--data-dir",
    default=None,
    help="MNIST directory (default: $MNIST_DATA_DIR, else ../shared/mnist)",
)
@click.option(
    "--duration",
    type=float,
    default=3.0,
    show_default=True,
    help="measured seconds per load and round",
)
@click.option(
    "--warmup",
    type=float,
    default=1.0,
    show_default=True,
    help="unmeasured seconds before each load",
)
@click.option(
    "--rounds",
    type=int,
    default=5,
    show_default=True,
    help="every load is run this many times, servers interleaved; the median counts",
)
@click.option(
    "--clients",
    type=int,
    default=max(2, os.cpu_count() or 1),
    show_default=True,
    help="load-generating processes (fewer when there are fewer callers)",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice([key for key, _ in plan(quick=False)]),
    help="run only these servers; repeatable",
)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="include KServe, MLServer and Triton (installed into cached venvs)",
)
@click.option("--quick", is_flag=True, help="1 and 64 callers only (for smoke tests)")
@click.option(
    "--load",
    "loads",
    multiple=True,
    help="run only these loads (single, one client, bulk, bulk u8, stream, v2, ...); repeatable",
)
@click.option(
    "--callers", multiple=True, type=int, help="run only loads with this many callers; repeatable"
)
def main(
    model: Path, out: Path, data_dir: str | None, duration: float, warmup: float, rounds: int,
    clients: int, only: tuple[str, ...], peers: bool, quick: bool, loads: tuple[str, ...],
    callers: tuple[int, ...],
) -> None:  # fmt: skip
    """Measure this server against its compute ceiling, its transport floor and its peers.

    Every server is started first and stays up; each load then runs against each server in
    turn, for several rounds, so that slow drifts of a shared machine hit all of them alike.
    """
    out.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_model(model, InferenceOptions(provider="cpu"))
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    samples = samples_file(out, data_dir, loaded)
    images = np.load(samples)["images"]
    cores = CPUS
    results: dict = {
        "machine": machine(),
        "model": {"path": str(model), "name": loaded.card.name, "version": loaded.card.version},
        "settings": {
            "duration_s": duration, "warmup_s": warmup, "rounds": rounds, "clients": clients,
        },
        "runs": [],
        "skipped": {},
        "idle_cpu": {},
        "workers_auto": CPUS,
    }  # fmt: skip
    console.print("[bold]compute ceiling[/]: onnxruntime in-process")
    ceiling = subprocess.run(
        [sys.executable, "-m", "bench.ceiling", str(model), "--seconds", str(min(duration, 2.0))],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    results["ceiling"] = json.loads(ceiling.stdout)
    wanted = [
        (key, kept)
        for key, workloads in plan(quick)
        if (not only or key in only) and (peers or key not in report.PEER_KEYS)
        if (kept := [w for w in workloads if _chosen(w, loads, callers)])
    ]
    with contextlib.ExitStack() as stack:
        live: dict[str, tuple[servers.Running, list[Workload]]] = {}
        for key, workloads in wanted:
            port = servers.free_port()
            try:
                server = make_server(key, model, loaded.card.name, port, out / "work")
                console.print(f"starting {server.name}")
                running = stack.enter_context(servers.running(server, port, out / "logs", images))
            except (VenvError, servers.ServerFailed) as exc:
                console.print(f"[red]{key} skipped[/]: {exc}")
                results["skipped"][key] = str(exc)
                continue
            live[key] = (running, workloads)
        results["idle_cpu"] = idle_cpu({key: running for key, (running, _) in live.items()})
        # One round: each group of comparable loads, against every server that has it.
        groups = list(dict.fromkeys(group(w) for _, workloads in wanted for w in workloads))
        schedule = [
            (key, running, workload)
            for wanted_group in groups
            for key, (running, workloads) in live.items()
            for workload in workloads
            if group(workload) == wanted_group
        ]
        measured: dict[tuple[str, Workload], list[Measurement]] = {}
        for round_number in range(1, rounds + 1):
            for key, running, workload in schedule:
                result = measure(
                    running, workload, samples=samples, clients=clients,
                    warmup_s=warmup, duration_s=duration, cores=cores,
                )  # fmt: skip
                measured.setdefault((key, workload), []).append(result)
                console.print(
                    f"round {round_number}/{rounds} [bold]{running.server.name}[/] "
                    f"{workload.name} x{workload.images} c{workload.concurrency}: "
                    + report.one_line(result)
                )
    for (key, _), runs in measured.items():
        results["runs"].append({"key": key, **median_run(runs)})
    results["targets"] = report.targets(results)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    report.plot(results, out / "bench.png")
    (out / "bench.md").write_text(report.markdown(results))
    report.print_all(results, Console(width=200))
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")


def _chosen(workload: Workload, loads: tuple[str, ...], callers: tuple[int, ...]) -> bool:
    return (not loads or workload.name in loads) and (
        not callers or workload.concurrency in callers
    )


def idle_cpu(live: dict[str, servers.Running], seconds: float = 2.0) -> dict[str, float]:
    """Cores each started server burns while nobody calls it (they all stay up together)."""
    before = {key: running.cpu_s() for key, running in live.items()}
    time.sleep(seconds)
    return {key: (running.cpu_s() - before[key]) / seconds for key, running in live.items()}


if __name__ == "__main__":
    main()
