"""`digit-server` as a process: start-up refusals, SIGTERM drain, several workers."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digit_recognizer.protos import digits_pb2, digits_pb2_grpc
from digit_recognizer.server.cpus import available_cpus, cgroup_quota

from onnx_models import one_hot_image, save, slow_model
from processes import ServerProcess


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (None, 2, "--model {path}: no such file"),  # refused with the other flags
        (b"\x08\x01garbage", 1, "not a loadable ONNX model"),
        (b"", 1, "model file is empty"),
    ],
)
def test_bad_model_exits_with_one_line_and_never_serves(
    processes, tmp_path, content, code, message
):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    server = processes("--model", str(path))
    exit_code, log = server.finish()
    assert exit_code == code
    assert message.format(path=path) in log and "Traceback" not in log and " serving " not in log


def test_bad_flags_are_listed_one_per_line(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path), "--max-batch-size", "0", "--workers", "0")
    code, log = server.finish()
    assert code == 2
    assert "--max-batch-size must be at least 1, got 0" in log
    assert "--workers must be at least 1, got 0" in log


IMAGES_PER_CALL = 8


def _batch() -> bytes:
    digits = np.arange(IMAGES_PER_CALL) % 10
    return (np.stack([one_hot_image(d) for d in digits]) * 255).astype(np.uint8).tobytes()


async def _late_calls(port: int, count: int = 10) -> list:
    """Calls made on a new connection after SIGTERM: served like any other."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as late:
        stub = digits_pb2_grpc.DigitClassifierStub(late)
        request = digits_pb2.ClassifyRequest(pixels_u8=_batch())
        calls = [stub.Classify(request, timeout=60) for _ in range(count)]
        return await asyncio.gather(*calls, return_exceptions=True)


def _accepted_in_flight(server: ServerProcess) -> float:
    url = f"http://127.0.0.1:{server.metrics_port()}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("digits_requests_in_flight "):
                return float(line.split()[1])
    raise AssertionError("no digits_requests_in_flight gauge in /metrics")


async def _load_then_sigterm(server: ServerProcess, port: int, calls: int) -> list:
    """Send `calls` requests on several connections, SIGTERM once the first is answered."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    try:
        tasks = [
            asyncio.ensure_future(
                digits_pb2_grpc.DigitClassifierStub(channels[i % 4]).Classify(
                    digits_pb2.ClassifyRequest(request_id=str(i), pixels_u8=_batch()),
                    timeout=60,
                )
            )
            for i in range(calls)
        ]
        # SIGTERM once the server itself reports most of the burst accepted (bounded wait).
        for _ in range(300):
            if await asyncio.to_thread(_accepted_in_flight, server) >= 150:
                break
            await asyncio.sleep(0.05)
        in_flight = sum(not t.done() for t in tasks)
        server.proc.send_signal(signal.SIGTERM)
        late = await _late_calls(port)
        replies = await asyncio.gather(*tasks, return_exceptions=True)
        return [replies, in_flight, late]
    finally:
        for chan in channels:
            await chan.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_every_accepted_request_and_exits_0(processes, tmp_path, workers):
    model = save(slow_model(width=4096), tmp_path / "slow.onnx")  # requests pile up
    server = processes(
        *("--model", str(model), "--workers", str(workers), "--max-batch-size", "8"),
        *("--metrics-port", "0"),
    )
    port = server.wait_serving()  # one line once every worker serves
    replies, in_flight, late = await _load_then_sigterm(server, port, calls=200)
    code, log = server.finish()
    assert code == 0, log
    assert log.count(" draining") == workers and log.count(" stopped") == workers
    assert log.count("ended_calls=0") == workers
    accepted = sum(int(n) for n in re.findall(r"draining .*accepted_requests=(\d+)", log))
    # Draining serves: every call of the burst, accepted or still on the wire at SIGTERM, and
    # the calls made after it, are answered; nothing is refused for draining (it used to be
    # UNAVAILABLE, which made round-robin clients send a draining replica more traffic).
    assert in_flight >= 100 and accepted >= 100, (in_flight, accepted)
    failed = [r for r in replies + late if isinstance(r, Exception)]
    assert not failed, failed[:3]
    for reply in replies + late:
        assert [p.digit for p in reply.predictions] == [i % 10 for i in range(IMAGES_PER_CALL)]


async def test_health_reports_serving_from_a_process(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path))
    port = server.wait_serving()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGINT)
    code, _ = server.finish()
    assert code == 0


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("flag", "message"),
    [("--port", "cannot listen on 127.0.0.1:{port}"), ("--http-port", "cannot serve HTTP on port")],
)
def test_a_port_in_use_is_one_line_before_the_model_loads(
    processes, tiny_model_path, workers, flag, message
):
    """Checked before any model is loaded (and, with workers, before any is forked): no
    "loaded" line, no worker lines, and no grpc core line (E1207 ... add_port.cc) first."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = processes("--model", str(tiny_model_path), flag, str(port), "--workers", workers)
        code, log = server.finish()
    assert code == 1 and message.format(port=port) in log and "address already in use" in log
    assert log.count("\n") == 1 and "not starting" in log, log


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_port_another_server_shares_is_in_use_too(processes, tiny_model_path, flag):
    """Another digit-server listens with SO_REUSEPORT: joining it would take half its
    connections and answer with another model, so the port counts as taken."""
    import socket

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = processes("--model", str(tiny_model_path), flag, str(port), "--workers", "2")
        code, log = server.finish()
    assert code == 1 and "address already in use" in log and "not starting" in log, log


def test_json_logs_are_one_object_per_line(processes, tiny_model_path):
    import json

    server = processes("--model", str(tiny_model_path), "--log-format", "json")
    lines = []
    for _ in range(100):  # bounded: the serving line comes within a few lines
        line = server._lines.get(timeout=60)
        assert line is not None, "".join(server.log)
        lines.append(json.loads(line))
        if lines[-1]["message"] == "serving":
            break
    serving = lines[-1]
    assert (
        serving["level"] == "INFO" and serving["name"] == "tiny" and serving["models"] == "tiny:1"
    )
    server.proc.send_signal(signal.SIGTERM)
    code, log = server.finish()
    assert code == 0
    assert [json.loads(line)["message"] for line in log.splitlines()][-2:] == [
        "draining",
        "stopped",
    ]


def test_a_crashing_worker_stops_the_others_and_exits_1(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path), "--workers", "2")
    server.wait_serving()
    pids = _worker_pids(server)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    code, log = server.finish()
    assert code == 1 and "exited with -9; stopping the others" in log
    assert log.count(" stopped") == 1  # the other worker drained and stopped cleanly


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_corrupt_model_is_the_only_line_even_with_metrics_on(processes, tmp_path, workers):
    """With workers, the model is checked once before any worker exists: not one ERROR line
    per worker, then "worker-1 exited with 1; stopping the others"."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x01garbage")
    server = processes("--model", str(path), "--metrics-port", "0", "--workers", workers)
    code, log = server.finish()
    assert code == 1 and log.count("\n") == 1 and "not starting" in log, log
    assert "not a loadable ONNX model" in log


def test_what_every_worker_refuses_is_said_once(processes, tiny_model_path):
    """--provider cuda where onnxruntime has no CUDA: only the workers find out (the probe
    loads on the CPU); each tells the supervisor, which prints the one line."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here: the workers start")
    server = processes("--model", str(tiny_model_path), "--workers", "2", "--provider", "cuda")
    code, log = server.finish()
    assert code == 1 and "provider 'cuda' requested" in log, log
    assert log.count("not starting") == 1 and "exited with" not in log, log


def test_an_unserved_default_model_is_one_line_before_any_worker(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path), "--workers", "2", "--default-model", "x")
    code, log = server.finish()
    assert code == 1 and log.count("\n") == 1, log
    assert "--default-model 'x' is not served" in log


def _worker_pids(server: ServerProcess) -> list[int]:
    (pids,) = re.findall(r" serving .*pids=([\d,]+)", "".join(server.log))
    return [int(pid) for pid in pids.split(",")]


def _wait_for_line(server: ServerProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in server.log):
        line = server._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert line is not None, "".join(server.log)


def test_workers_print_the_start_up_lines_once(processes, tiny_model_path, tmp_path):
    """They used to come once per worker: serving, page, and every model loaded or refused."""
    for version, data in (("1", tiny_model_path.read_bytes()), ("2", b"\x08\x01garbage")):
        (tmp_path / "repo" / "tiny" / version).mkdir(parents=True)
        (tmp_path / "repo" / "tiny" / version / "model.onnx").write_bytes(data)
    server = processes(
        *("--model-repository", str(tmp_path / "repo"), "--version-policy", "all"),
        *("--workers", "2", "--http-port", "0"),
    )
    server.wait_serving()
    _wait_for_line(server, " page url=")
    log = "".join(server.log)
    assert log.count("] serving ") == 1 and log.count("] page ") == 1, log
    # The other worker loads (and refuses) them too, silently.
    assert log.count(" loaded ") == 1 and log.count("not a loadable ONNX model") == 1, log
    assert " workers=2 " in log and len(_worker_pids(server)) == 2
    server.proc.send_signal(signal.SIGTERM)
    code, log = server.finish()
    assert code == 0 and log.count(" stopped") == 2, log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_right_after_serving_stops_cleanly(processes, tiny_model_path, workers):
    """A terminal's Ctrl-C reaches every process of the group at once. It used to exit 1
    with no error line (2 of 7 tries): the first worker printed "serving" while the second
    was still starting, and the supervisor's SIGTERM killed that one before it had handlers."""
    for _ in range(4):
        server = processes("--model", str(tiny_model_path), "--workers", workers)
        server.wait_serving()
        pids = _worker_pids(server) if workers == "2" else []
        for pid in [server.proc.pid, *pids]:
            os.kill(pid, signal.SIGINT)
        code, log = server.finish()
        assert code == 0 and "Traceback" not in log and " stopped" in log, log


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_stop_when_the_supervisor_dies(processes, tiny_model_path):
    """SIGKILL (or the OOM killer) on the supervisor: its workers drain and exit instead of
    serving on as orphans that hold the port."""
    server = processes("--model", str(tiny_model_path), "--workers", "2", "--grace-period", "1")
    server.wait_serving()
    pids = _worker_pids(server)
    server.proc.kill()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their supervisor"
        time.sleep(0.05)
    server.finish()
    assert "the supervisor is gone: stopping" in "".join(server.log)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_workers_start_is_a_clean_stop(processes, tiny_model_path, signum):
    server = processes("--model", str(tiny_model_path), "--workers", "2")
    _wait_for_line(server, " workers count=2")  # spawned now, importing for a second
    server.proc.send_signal(signum)
    code, log = server.finish()
    assert code == 0 and "Traceback" not in log and "exited with" not in log, log


def test_the_page_url_is_printed_at_start(processes, tiny_model_path):
    server = processes("--model", str(tiny_model_path), "--http-port", "0")
    server.wait_serving()
    port = server.http_port()
    deadline = time.monotonic() + 10
    while f"page url=http://127.0.0.1:{port}/" not in "".join(server.log):
        assert time.monotonic() < deadline, "".join(server.log)
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    assert server.finish()[0] == 0


def test_workers_auto_is_one_per_usable_cpu_with_its_share_of_threads(processes, tiny_model_path):
    cpus = available_cpus()
    server = processes("--model", str(tiny_model_path), "--workers", "auto")
    port = server.wait_serving()
    log = "".join(server.log)
    if cpus > 1:  # one process needs no supervisor; several split the cores for onnxruntime
        assert f" workers count={cpus} intra_op_threads=1" in log, log
        assert len(_worker_pids(server)) == cpus
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = digits_pb2_grpc.DigitClassifierStub(channel)
        request = digits_pb2.ClassifyRequest(pixels=one_hot_image(5).tolist())
        assert stub.Classify(request, timeout=10).predictions[0].digit == 5
    server.proc.send_signal(signal.SIGTERM)
    assert server.finish()[0] == 0


def test_workers_must_be_a_number_or_auto(processes, tiny_model_path):
    code, log = processes("--model", str(tiny_model_path), "--workers", "many").finish()
    assert code == 2 and "must be a whole number or auto, got 'many'" in log


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(tmp_path) == quota
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    assert available_cpus(tmp_path) == expected
