"""The benchmark harness itself: load generator, floor, report logic, and one quick end-to-end
run of `python -m bench` against this server (no peers: they install into venvs of their own,
which `make bench` does and CI does not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import report, servers
from bench.__main__ import median_run
from bench.measure import Measurement, Workload, limit, measure, split
from bench.venvs import VenvError, peer_python

REPO = Path(__file__).parent.parent


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "samples.npz"
    np.savez(path, images=rng.random((8, 784), dtype=np.float32), expected=np.zeros(8, int))
    return path


def test_callers_are_split_evenly_over_at_most_that_many_processes():
    assert split(64, 2) == [32, 32]
    assert split(5, 2) == [3, 2]
    assert split(1, 4) == [1]


def test_the_saturated_side_is_named():
    assert limit(1.2, [0.5, 0.4], cores=2) == "cores"
    assert limit(0.95, [0.2], cores=2) == "server"
    assert limit(0.3, [0.92], cores=2) == "clients"
    assert limit(0.3, [0.2], cores=2) == "neither"


def test_the_floor_answers_every_call_of_several_load_processes(samples, tmp_path):
    images = np.load(samples)["images"]
    port = servers.free_port()
    with servers.running(servers.floor(port), port, tmp_path, images) as floor:
        result = measure(
            floor, Workload("single", "classify", 1, 6), samples=samples, clients=2,
            warmup_s=0.2, duration_s=0.8, cores=2,
        )  # fmt: skip
        stream = measure(
            floor, Workload("stream", "stream", 2, 2), samples=samples, clients=1,
            warmup_s=0.2, duration_s=0.5, cores=2,
        )  # fmt: skip
    assert result.client_processes == 2 and result.errors == {}
    assert result.requests_per_s > 50 and 0 < result.p50_ms <= result.p99_ms
    assert result.checked_replies == 0  # the floor's fixed reply is never checked
    assert stream.requests_per_s > 20 and stream.images_per_s == 2 * stream.requests_per_s
    assert floor.proc.returncode is not None  # stopped, process tree and all


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path):
    broken = servers.Server(
        "broken", (sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"),
        "digits", "",
    )  # fmt: skip
    with (
        pytest.raises(servers.ServerFailed, match="broken exited: no model here"),
        servers.running(broken, servers.free_port(), tmp_path, np.zeros((1, 784), np.float32)),
    ):
        pass


def test_a_peer_that_cannot_be_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.venvs.CACHE", tmp_path)
    with pytest.raises(VenvError, match="cannot install no-such-package-digits-bench"):
        peer_python("nothing", "no-such-package-digits-bench==0.0.1", "--no-index")


def _run(
    key: str, workload: str, concurrency: int, rate: float, p99: float = 10.0, limit: str = "server"
) -> dict:
    images = 256 if "bulk" in workload else 1
    return {
        "key": key, "server": key, "workload": workload, "concurrency": concurrency,
        "images": images, "requests_per_s": rate, "images_per_s": rate * images,
        "p50_ms": 1.0, "p99_ms": p99, "limit": limit,
    }  # fmt: skip


def test_targets_compare_within_one_run():
    results = {
        "ceiling": {"best": {"256": {"images_per_s": 100_000.0}, "1024": {"images_per_s": 1e6}}},
        "workers_auto": 2,
        "runs": [
            _run("floor", "single", 64, 2000), _run("one-process", "single", 64, 1900),
            _run("default", "single", 64, 3000, p99=40, limit="cores"),
            _run("floor", "single", 1, 1000), _run("one-process", "single", 1, 900),
            _run("batching-off", "single", 64, 1500), _run("default", "bulk", 4, 250),
            _run("default", "bulk u8", 4, 300), _run("default", "v2 bulk", 4, 110),
            _run("kserve", "single", 64, 1000, p99=90), _run("pytriton", "single", 64, 1400),
            _run("kserve", "bulk", 4, 100), _run("default", "stream", 64, 4000),
            {**_run("default", "one client", 64, 2000), "worker_spread": 0.1},
        ],
    }  # fmt: skip
    by_name = {goal["goal"]: goal for goal in report.targets(results)}
    floor = by_name["single Classify, 64 callers, one process: req/s vs floor"]
    assert floor["value"] == pytest.approx(0.95) and floor["met"]
    assert by_name["idle p50 (1 caller), one process: ms above the floor's p50"]["met"]
    assert by_name["bulk 256-image raw requests: images/s vs onnxruntime ceiling"][
        "value"
    ] == pytest.approx(0.64)
    best_peer = by_name["64 callers, default: req/s vs best peer (pytriton)"]
    assert best_peer["value"] == pytest.approx(3000 / 1400) and best_peer["met"]
    tail = by_name["64 callers, default: p99 vs the lowest peer p99 (pytriton), same round"]
    assert tail["value"] == pytest.approx(4.0) and not tail["met"]  # 40 vs 10 ms
    spread = "one client process (64 callers), default: per-worker requests, (most - fewest) / most"
    assert by_name[spread]["met"]
    bulk = by_name["bulk Classify, 256 raw f32: images/s vs best peer's f32 (kserve)"]
    assert bulk["value"] == pytest.approx(2.5) and bulk["met"]
    assert not by_name[
        "bulk ModelInfer (same protocol), 256 raw FP32: images/s vs best peer's f32 (kserve)"
    ]["met"]  # 1.1
    scaling = by_name["--workers auto (2) vs one process, 64 callers: speed-up per worker"]
    assert scaling["value"] == pytest.approx(3000 / 1900 / 2)
    assert scaling["met"] is None  # every core was busy: the machine, not the server, decided


def test_the_median_round_is_reported_with_all_rounds():
    def run(rate: float) -> Measurement:
        return Measurement(
            "s", "single", "classify", 1, 1, rate, rate, 1, 1, 1, None, {}, 0, 0, 0, 0, 1, "n"
        )

    chosen = median_run([run(3), run(1), run(2)])
    assert chosen["requests_per_s"] == 2 and chosen["rounds_requests_per_s"] == [3, 1, 2]


def test_make_bench_quick_run_without_peers(mnist_dir, trained_model, tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench", "--model", str(trained_model), "--out", str(out),
            "--data-dir", str(mnist_dir), "--quick", "--no-peers", "--only", "floor",
            "--only", "default", "--only", "one-process", "--rounds", "1", "--duration", "2",
            "--warmup", "0.2",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| goal | measured |" in (out / "bench.md").read_text()
    ours = [r for r in results["runs"] if r["key"] == "default"]
    assert {r["workload"] for r in ours} == {
        "single", "one client", "bulk", "bulk u8", "stream", "v2", "v2 bulk", "v2 bulk u8",
        "v2 rest bulk", "v2 rest bulk binary",
    }  # fmt: skip
    for run_result in ours:
        assert run_result["errors"] == {} and run_result["wrong_digits"] == 0, run_result
        # 2 s: a 256-image REST JSON call costs ~85 ms of server CPU, ~10x that on a busy CI box
        assert run_result["checked_replies"] > 0, run_result["workload"]
    goals = [goal["goal"] for goal in results["targets"]]
    assert any("vs floor" in goal for goal in goals) and any("ceiling" in goal for goal in goals)
    assert "Targets" in run.stdout and "Compute ceiling" in run.stdout
