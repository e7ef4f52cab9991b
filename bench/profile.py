"""Where a server's time goes under load: py-spy samples the server process while the bench's
load generator drives it; the raw stacks (input for any flame-graph tool) are written out and
the hottest frames printed.

    python -m bench.profile --model models/model.onnx --concurrency 64 --out reports/bench

Samples are taken only while a thread holds the GIL (`--gil`): on a server whose event loop
is the bottleneck, that is the time that decides throughput.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import click
import numpy as np

from bench import model_option, servers
from bench.measure import Workload, measure


def hottest(raw: Path, top: int = 15) -> list[tuple[float, str]]:
    """(share of samples, frame) for the frames most often on top of a sampled stack."""
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        leaves[stack.split(";")[-1]] += int(count)
    return [(count / total, frame) for frame, count in leaves.most_common(top)] if total else []


def own_share(raw: Path, markers: tuple[str, ...] = ("server/", "onnxruntime/")) -> float:
    """Share of samples inside this project's request handling or the model run: a frame of
    `markers` below the event loop's callback dispatch (entry points, on every stack, and the
    loop itself are not counted)."""
    total = ours = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        frames = stack.split(";")
        dispatch = next((i for i, f in enumerate(frames) if "asyncio/events.py" in f), None)
        handled = frames[dispatch + 1 :] if dispatch is not None else []
        if any(marker in frame for frame in handled for marker in markers):
            ours += int(count)
    return ours / total if total else 0.0


@click.command()
@model_option
@click.option(
    "--samples",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="reports/bench/samples.npz",
    show_default=True,
    help="written by `python -m bench`",
)
@click.option("--concurrency", type=int, default=64, show_default=True)
@click.option("--images", type=int, default=1, show_default=True, help="images per request")
@click.option("--seconds", type=float, default=5.0, show_default=True)
@click.option("--floor", "use_floor", is_flag=True, help="profile the bare grpc.aio floor")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default="reports/bench",
    show_default=True,
)
def main(
    model: Path, samples: Path, concurrency: int, images: int, seconds: float, use_floor: bool,
    out: Path,
) -> None:  # fmt: skip
    """Profile digit-server (or the floor) under Classify load with py-spy."""
    out.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).parent / "py-spy"
    pictures = np.load(samples)["images"]
    port = servers.free_port()
    server = (
        servers.floor(port)
        if use_floor
        else servers.ours("digit-server", model, "", port, "--workers", "1")
    )
    name = "floor" if use_floor else "digit-server"
    raw = out / f"profile-{name}-{images}x{concurrency}.txt"
    with servers.running(server, port, out / "logs", pictures) as running:
        record = [
            str(py_spy), "record", "--pid", str(running.proc.pid), "--gil", "--nonblocking",
            "--rate", "250", "--duration", str(int(seconds)),
        ]  # fmt: skip

        def sample() -> None:
            subprocess.run([*record, "--format", "raw", "--output", str(raw)], check=True,
                           capture_output=True)  # fmt: skip

        # py-spy starts once the load is past its warm-up; both run for `seconds`.
        timer = threading.Timer(1.5 + 1.0, sample)
        timer.start()
        result = measure(
            running, Workload("single" if images == 1 else "bulk", "classify", images, concurrency),
            samples=samples, clients=2, warmup_s=1.0, duration_s=seconds + 1.0, cores=2,
        )  # fmt: skip
        timer.join()
    click.echo(
        f"{name}, {concurrency} callers x {images} images: {result.requests_per_s:,.0f} req/s "
        f"(cpu server {result.server_cpu:.2f}, clients {result.client_cpu:.2f})"
    )
    markers = ("bench/floor.py",) if use_floor else ("server/", "onnxruntime/")
    click.echo(
        f"samples in the handlers' own code and the model run: {own_share(raw, markers):.0%}"
    )
    for share, frame in hottest(raw):
        click.echo(f"{share:6.1%}  {frame}")
    click.echo(f"wrote {raw} (folded stacks)")


if __name__ == "__main__":
    main()
