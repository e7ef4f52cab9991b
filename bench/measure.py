"""One measured load against a running server: several load processes, merged timings, CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.servers import Running

STARTUP_S = 1.5  # for the load processes to import grpc and connect before the shared start
SATURATED = 0.9  # a process using this share of one core or more is the bottleneck


@dataclass(frozen=True)
class Workload:
    name: str  # "single", "bulk", "stream", "v2 rest bulk", ...
    call: str  # as bench.load understands it (rest, rest-binary: to the HTTP port)
    images: int  # per request
    concurrency: int  # callers, all processes together
    encoding: str = "f32"  # pixels as raw float32, or u8 (0-255 bytes, a quarter the size)
    # TCP connections per load process: --workers N servers share the port through
    # SO_REUSEPORT, which spreads connections (not calls) over the workers. For the
    # "client" call (AsyncDigitClient), 0 = its default pool: one to each worker.
    connections: int = 2
    processes: int = 0  # load processes; 0 = the bench's --clients


@dataclass(frozen=True)
class Measurement:
    server: str
    workload: str
    call: str
    images: int
    concurrency: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float | None  # executed batch size from reply telemetry (digits.v1 only)
    errors: dict[str, int]
    wrong_digits: int
    checked_replies: int
    server_cpu: float  # cores
    client_cpu: float  # cores, all load processes
    client_processes: int
    limit: str  # which side saturated: "cores", "server", "clients" or "neither"
    # Replies per server process (--workers N), of those parsed (digits.v1 only: the reply's
    # Telemetry.worker); "spread" = (most - fewest) / most.
    per_worker: dict[str, int] = field(default_factory=dict)

    @property
    def worker_spread(self) -> float | None:
        counts = list(self.per_worker.values())
        if len(counts) < 2:
            return None
        return (max(counts) - min(counts)) / max(counts)

    def as_dict(self) -> dict:
        return {**asdict(self), "worker_spread": self.worker_spread}


def split(concurrency: int, processes: int) -> list[int]:
    """Callers per load process: as even as possible, no process without callers."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return [base + (i < extra) for i in range(processes)]


def measure(
    server: Running,
    workload: Workload,
    *,
    samples: Path,
    clients: int,
    warmup_s: float,
    duration_s: float,
    cores: int,
) -> Measurement:
    start_at = time.time() + STARTUP_S
    target = server.http_target if workload.call.startswith("rest") else server.target
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "--target",
                target,
                "--call",
                workload.call,
                "--images",
                str(workload.images),
                "--concurrency",
                str(callers),
                "--warmup",
                str(warmup_s),
                "--duration",
                str(duration_s),
                "--start-at",
                repr(start_at),
                "--samples",
                str(samples),
                "--model-name",
                server.server.model_name,
                "--encoding",
                workload.encoding,
                "--connections",
                str(workload.connections),
                *([] if server.server.answers else ["--no-check"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for callers in split(workload.concurrency, workload.processes or clients)
    ]
    time.sleep(max(0.0, start_at + warmup_s - time.time()))
    server_cpu_start = server.cpu_s()
    time.sleep(duration_s)
    server_cpu = (server.cpu_s() - server_cpu_start) / duration_s
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration_s + warmup_s + 120)
        if proc.returncode:
            raise RuntimeError(f"load process failed on {server.server.name}: {err[-800:]}")
        results.append(json.loads(out))
    latencies = np.concatenate([np.asarray(r["latencies_s"]) for r in results]) * 1e3
    errors: dict[str, int] = {}
    for result in results:
        for code, count in result["errors"].items():
            errors[code] = errors.get(code, 0) + count
    batch_sizes = [size for r in results for size in r["batch_sizes"]]
    per_worker: dict[str, int] = {}
    for result in results:
        for worker, count in result.get("sampled_workers", {}).items():
            per_worker[worker] = per_worker.get(worker, 0) + count
    per_client = [r["cpu_s"] / duration_s for r in results]
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if len(latencies) else (np.nan,) * 3
    requests_per_s = len(latencies) / duration_s
    return Measurement(
        server=server.server.name,
        workload=workload.name,
        call=workload.call,
        images=workload.images,
        concurrency=workload.concurrency,
        requests_per_s=requests_per_s,
        images_per_s=requests_per_s * workload.images,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_batch=float(np.mean(batch_sizes)) if batch_sizes else None,
        errors=errors,
        wrong_digits=sum(r["wrong_digits"] for r in results),
        checked_replies=sum(r["checked_replies"] for r in results),
        server_cpu=server_cpu,
        client_cpu=sum(per_client),
        client_processes=len(procs),
        limit=limit(server_cpu, per_client, cores),
        per_worker=dict(sorted(per_worker.items())),
    )


def limit(server_cpu: float, per_client: list[float], cores: int) -> str:
    """Which side ran out of CPU: every core busy, the server's core, a load process's core,
    or neither (the chain is latency-bound: idle time between calls)."""
    if server_cpu + sum(per_client) >= SATURATED * cores:
        return "cores"
    if server_cpu >= SATURATED:
        return "server"
    if per_client and max(per_client) >= SATURATED:
        return "clients"
    return "neither"
