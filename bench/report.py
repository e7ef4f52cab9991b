"""The bench's verdicts (targets), its tables and its plot, all from the bench.json dict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.measure import Measurement

PEER_KEYS = ("kserve", "mlserver", "mlserver-0", "pytriton")
OURS = "default"  # --workers auto: what a user gets
ONE_PROCESS = "one-process"  # --workers 1: the per-request cost of one server process


def one_line(m: Measurement) -> str:
    batch = f", mean batch {m.mean_batch:.1f}" if m.mean_batch is not None else ""
    errors = f", errors {m.errors}" if m.errors else ""
    return (
        f"{m.requests_per_s:,.0f} req/s, {m.images_per_s:,.0f} images/s, p50 {m.p50_ms:.2f} ms, "
        f"p99 {m.p99_ms:.2f} ms{batch}; cpu server {m.server_cpu:.2f} clients "
        f"{m.client_cpu:.2f} ({m.limit}){errors}"
    )


def find(results: dict, key: str, workload: str, concurrency: int | None = None) -> dict | None:
    for run in results["runs"]:
        same = run["key"] == key and run["workload"] == workload
        if same and (concurrency is None or run["concurrency"] == concurrency):
            return run
    return None


def ceiling_images_per_s(results: dict, batch: int | None = None) -> float:
    """onnxruntime alone at the best thread setting: at `batch` images per run when that was
    measured, else the best of every batch size."""
    best = results["ceiling"]["best"]
    if batch is not None and str(batch) in best:
        return best[str(batch)]["images_per_s"]
    return max(row["images_per_s"] for row in best.values())


def targets(results: dict) -> list[dict]:
    """Each goal of the speed issue, with the measured ratio and whether it was met (None:
    not judged, because the machine itself was the limit; the `limit` column says which)."""
    goals: list[dict] = []

    def goal(name: str, value: float | None, wanted: str, met: bool | None) -> None:
        goals.append({"goal": name, "value": value, "wanted": wanted, "met": met})

    def best_peer(workload: str, concurrency: int | None = None) -> dict | None:
        runs = [run for key in PEER_KEYS if (run := find(results, key, workload, concurrency))]
        return max(runs, key=lambda run: run["images_per_s"]) if runs else None

    one64, floor64 = find(results, ONE_PROCESS, "single", 64), find(results, "floor", "single", 64)
    if one64 and floor64:
        ratio = one64["requests_per_s"] / floor64["requests_per_s"]
        goal("single Classify, 64 callers, one process: req/s vs floor", ratio, ">= 0.80",
             ratio >= 0.8)  # fmt: skip
    one1, floor1 = find(results, ONE_PROCESS, "single", 1), find(results, "floor", "single", 1)
    if one1 and floor1:
        extra = paired(one1, floor1, "p50_ms", lambda a, b: a - b)
        goal("idle p50 (1 caller), one process: ms above the floor's p50", extra, "<= 0.20",
             extra <= 0.2)  # fmt: skip
    ours64 = find(results, OURS, "single", 64)
    if ours64 and (peer := best_peer("single", 64)):
        ratio = ours64["requests_per_s"] / peer["requests_per_s"]
        goal(f"64 callers, default: req/s vs best peer ({peer['server']})", ratio, ">= 1.40",
             ratio >= 1.4)  # fmt: skip
    if ours64 and (tail := lowest_tail_peer(results, "single", 64)):
        ratio = paired_ratio(ours64, tail, "p99_ms")
        goal(f"64 callers, default: p99 vs the lowest peer p99 ({tail['server']}), same round",
             ratio, "<= 1.00", ratio <= 1.0)  # fmt: skip
        ratio = paired_ratio(ours64, tail, "p50_ms")
        goal("64 callers, default: p50 vs that peer's p50, same round", ratio, "< 1.00",
             ratio < 1.0)  # fmt: skip
    client = find(results, OURS, "one client", 64)
    if client and client.get("worker_spread") is not None:
        spread = client["worker_spread"]
        goal("one client process (64 callers), default: per-worker requests, (most - fewest) "
             "/ most", spread, "<= 0.20", spread <= 0.2)  # fmt: skip
    one_client = find(results, ONE_PROCESS, "one client", 64)
    workers = results.get("workers_auto", 1)
    if client and one_client and workers > 1:
        efficiency = client["requests_per_s"] / one_client["requests_per_s"] / workers
        bound = client["limit"] in ("cores", "clients")
        goal(f"one client process, default ({workers} workers) vs one process: speed-up per "
             "worker", efficiency, ">= 0.80", None if bound else efficiency >= 0.8)  # fmt: skip
    peer_bulk = best_peer("bulk")
    for workload, what in (
        ("bulk", "bulk Classify, 256 raw f32"),
        ("v2 bulk", "bulk ModelInfer (same protocol), 256 raw FP32"),
        ("bulk u8", "bulk Classify, 256 u8"),
        ("v2 bulk u8", "bulk ModelInfer, 256 UINT8"),
    ):
        run = find(results, OURS, workload)
        if run and peer_bulk:
            ratio = run["images_per_s"] / peer_bulk["images_per_s"]
            goal(f"{what}: images/s vs best peer's f32 ({peer_bulk['server']})", ratio, ">= 1.20",
                 ratio >= 1.2)  # fmt: skip
    bulk = find(results, OURS, "bulk")
    if bulk:
        ratio = bulk["images_per_s"] / ceiling_images_per_s(results, bulk["images"])
        goal(f"bulk {bulk['images']}-image raw requests: images/s vs onnxruntime ceiling",
             ratio, ">= 0.50", ratio >= 0.5)  # fmt: skip
    off = find(results, "batching-off", "single", 64)
    if one64 and off:
        ratio = one64["requests_per_s"] / off["requests_per_s"]
        goal("batching on vs off, 64 callers: req/s ratio", ratio, ">= 1.00", ratio >= 1.0)
    if ours64 and one64 and workers > 1:
        efficiency = ours64["requests_per_s"] / one64["requests_per_s"] / workers
        bound = ours64["limit"] in ("cores", "clients")  # the machine, not the server
        goal(f"--workers auto ({workers}) vs one process, 64 callers: speed-up per worker",
             efficiency, ">= 0.80", None if bound else efficiency >= 0.8)  # fmt: skip
    stream = find(results, OURS, "stream", 64)
    if stream and (peer := best_peer("single", 64)):
        ratio = stream["requests_per_s"] / peer["requests_per_s"]
        goal("ClassifyStream, 64 callers: msg/s vs best peer's unary req/s", ratio, "> 1.00",
             ratio > 1.0)  # fmt: skip
    return goals


def paired(ours: dict, other: dict, field: str, compare: Callable[[float, float], float]) -> float:
    """`compare(ours, other's)` round by round (both ran in every round, one after the
    other), the median of those: a slow moment of a shared machine hits one round of both.
    Runs without every round's figures: the median rounds' figures compared."""
    mine, theirs = ours.get(f"rounds_{field}"), other.get(f"rounds_{field}")
    if not mine or not theirs or len(mine) != len(theirs):
        return compare(ours[field], other[field])
    values = sorted(compare(a, b) for a, b in zip(mine, theirs, strict=True))
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def paired_ratio(ours: dict, peer: dict, field: str) -> float:
    return paired(ours, peer, field, lambda a, b: a / b)


def _tail(run: dict) -> float:
    """A run's p99 over its rounds (the median), or its median round's."""
    rounds = sorted(run.get("rounds_p99_ms") or [run["p99_ms"]])
    return rounds[len(rounds) // 2]


def lowest_tail_peer(results: dict, workload: str, concurrency: int) -> dict | None:
    """The peer run with the lowest p99 at this load: the tail to match."""
    runs = [run for key in PEER_KEYS if (run := find(results, key, workload, concurrency))]
    return min(runs, key=_tail) if runs else None


def peer_p99(results: dict, run: dict) -> float | None:
    """Beside each of our runs: the lowest p99 of any peer at the same load."""
    if run["key"] in PEER_KEYS:
        return None
    name = {"one client": "single"}.get(run["workload"], run["workload"])
    peer = lowest_tail_peer(results, name, run["concurrency"])
    return peer["p99_ms"] if peer else None


def _workers(run: dict) -> str:
    """Replies per server process, when there are several: "2,011/1,968"."""
    counts = list((run.get("per_worker") or {}).values())
    return "/".join(f"{count:,}" for count in counts) if len(counts) > 1 else "-"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def runs_table(results: dict) -> Table:
    table = Table(title="Load runs (single = 1 image per request; bulk = 256 raw f32 images)")
    for column in ("server", "load", "callers", "req/s", "images/s", "p50 ms", "p90 ms",
                   "p99 ms", "peer p99", "batch", "per worker", "cpu srv", "cpu cli", "limit",
                   "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("server", "load") else "right")
    for run in results["runs"]:
        errors = sum(run["errors"].values()) + run["wrong_digits"]
        table.add_row(
            run["server"],
            f"{run['workload']} ({run['call']})",
            str(run["concurrency"]),
            _fmt(run["requests_per_s"]),
            _fmt(run["images_per_s"]),
            _fmt(run["p50_ms"], 2),
            _fmt(run["p90_ms"], 2),
            _fmt(run["p99_ms"], 2),
            _fmt(peer_p99(results, run), 2),
            _fmt(run["mean_batch"], 1),
            _workers(run),
            _fmt(run["server_cpu"], 2),
            _fmt(run["client_cpu"], 2),
            run["limit"],
            str(errors),
        )
    return table


def ceiling_table(results: dict) -> Table:
    table = Table(title="Compute ceiling: onnxruntime in-process (images/s)")
    table.add_column("batch", justify="right")
    threads = _threads(results)
    for count in threads:
        table.add_column(f"{count} thread(s)", justify="right")
    for batch in results["ceiling"]["best"]:
        rates = {
            row["threads"]: row["images_per_s"]
            for row in results["ceiling"]["rows"]
            if str(row["batch"]) == batch
        }
        table.add_row(batch, *(_fmt(rates.get(count)) for count in threads))
    return table


def targets_table(results: dict) -> Table:
    table = Table(title="Targets")
    for column in ("goal", "measured", "wanted", "met"):
        table.add_column(column, justify="left" if column == "goal" else "right")
    for goal in results["targets"]:
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: "- (machine-bound)"}[goal["met"]]
        table.add_row(goal["goal"], _fmt(goal["value"], 2), goal["wanted"], met)
    return table


def print_all(results: dict, console: Console) -> None:
    m = results["machine"]
    console.print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; python {m['python']}, "
        f"grpcio {m['grpcio']}, onnxruntime {m['onnxruntime']}; {m['date']}"
    )
    console.print(ceiling_table(results))
    console.print(runs_table(results))
    console.print(targets_table(results))
    for key, why in results.get("skipped", {}).items():
        console.print(f"[red]skipped {key}[/]: {why}")


def plot(results: dict, path: Path) -> None:
    """Three panels: single-image req/s and p50/p99 latency vs callers, bulk images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate_ax, latency_ax, bulk_ax) = plt.subplots(1, 3, figsize=(17, 5.2))
    servers: dict[str, list[dict]] = {}
    for run in results["runs"]:
        if run["workload"] == "single":
            servers.setdefault(run["server"], []).append(run)
    for index, (name, runs) in enumerate(servers.items()):
        if len(runs) < 2:
            continue
        runs.sort(key=lambda run: run["concurrency"])
        callers = [run["concurrency"] for run in runs]
        color = f"C{index}"
        style = "--" if "floor" in name else "-"
        rate_ax.plot(callers, [r["requests_per_s"] for r in runs], style, marker="o",
                     color=color, label=name)  # fmt: skip
        latency_ax.plot(callers, [r["p50_ms"] for r in runs], style, marker="o", color=color,
                        label=f"{name} p50")  # fmt: skip
        latency_ax.plot(callers, [r["p99_ms"] for r in runs], ":", marker="x", color=color,
                        label=f"{name} p99")  # fmt: skip
    for ax in (rate_ax, latency_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers (single-image requests)")
        ax.grid(True, which="both", alpha=0.3)
    rate_ax.set_ylabel("requests/s")
    rate_ax.set_title("Throughput")
    rate_ax.legend(fontsize=8)
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.set_title("Latency p50 (solid) and p99 (dotted)")
    latency_ax.legend(fontsize=6, ncol=2)
    bulk = [run for run in results["runs"] if run["workload"] in ("bulk", "v2 bulk")]
    names = ["onnxruntime alone, batch 256"] + [
        run["server"] + (" ModelInfer" if run["workload"] == "v2 bulk" else "") for run in bulk
    ]
    rates = [ceiling_images_per_s(results, 256)] + [run["images_per_s"] for run in bulk]
    bulk_ax.barh(names, rates, color=["grey"] + [f"C{i % 10}" for i in range(len(bulk))])
    bulk_ax.invert_yaxis()
    bulk_ax.set_xlabel("images/s (256-image requests, 4 callers)")
    bulk_ax.set_title("Bulk")
    bulk_ax.tick_params(axis="y", labelsize=8)
    m = results["machine"]
    figure.suptitle(f"digit-recognizer bench: {m['cpu']}, {m['cores']} cores ({m['date'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict) -> str:
    """The same three tables for the README."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; "
        f"python {m['python']}, grpcio {m['grpcio']}, onnxruntime {m['onnxruntime']}; "
        f"{m['date']}. Medians of {results['settings']['rounds']} interleaved rounds of "
        f"{results['settings']['duration_s']:g} s; load from up to "
        f"{results['settings']['clients']} client processes on the same machine.",
        "",
        "| batch | " + " | ".join(f"ort {c} thread(s)" for c in _threads(results)) + " |",
        "| ---: |" + " ---: |" * len(_threads(results)),
    ]
    for batch in results["ceiling"]["best"]:
        rates = {
            row["threads"]: row["images_per_s"]
            for row in results["ceiling"]["rows"]
            if str(row["batch"]) == batch
        }
        cells = " | ".join(_fmt(rates.get(c)) for c in _threads(results))
        lines.append(f"| {batch} | {cells} |")
    lines += [
        "",
        "| server | load | callers | req/s | images/s | p50 ms | p90 ms | p99 ms | peer p99 "
        "| batch | per worker | cpu server | cpu clients | limit | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- | ---: |",
    ]
    for run in results["runs"]:
        errors = sum(run["errors"].values()) + run["wrong_digits"]
        lines.append(
            f"| {run['server']} | {run['workload']} ({run['call']}) | {run['concurrency']} "
            f"| {_fmt(run['requests_per_s'])} | {_fmt(run['images_per_s'])} "
            f"| {_fmt(run['p50_ms'], 2)} | {_fmt(run['p90_ms'], 2)} | {_fmt(run['p99_ms'], 2)} "
            f"| {_fmt(peer_p99(results, run), 2)} | {_fmt(run['mean_batch'], 1)} "
            f"| {_workers(run)} | {_fmt(run['server_cpu'], 2)} "
            f"| {_fmt(run['client_cpu'], 2)} | {run['limit']} | {errors} |"
        )
    lines += ["", "| goal | measured | wanted | met |", "| --- | ---: | ---: | --- |"]
    for goal in results["targets"]:
        met = {True: "yes", False: "**no**", None: "- (machine-bound)"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {_fmt(goal['value'], 2)} | {goal['wanted']} | {met} |")
    return "\n".join(lines) + "\n"


def _threads(results: dict) -> list[int]:
    return sorted({row["threads"] for row in results["ceiling"]["rows"]})
