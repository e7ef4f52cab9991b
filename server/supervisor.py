"""`--workers N`: N server processes sharing one port, and this process watching them.

What every worker would check at start is checked here once, before any worker exists: the
ports are bound (and held), the models loaded once (`probe`), so a busy port or a corrupt
model is one line, not one per worker after N model loads. Each worker then reports on a pipe
when it serves, or why it cannot; this process prints the one "serving" line (and the page's
address) once all of them serve, and one "not starting" line if any cannot.

Signals: the workers never take SIGINT (a terminal's Ctrl-C reaches the whole process group
while they may still be importing); this process turns SIGINT and SIGTERM into one SIGTERM for
each, which a worker holds until it can drain.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING, Any

from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.cpus import available_cpus

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("digit_recognizer.server")
Fields = dict[str, Any]


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM blocked (held pending, never lost) while the process starts, until
    the handler that will act on them is in place and calls `release_signals`; the mask
    before is back at the end (CliRunner in tests). Python's own actions used to end such a
    start with a traceback, or a bare exit code and no line. Enter it before any thread is
    started: threads inherit the block (grpc's, onnxruntime's, the metrics server's), so only
    the main thread, once released, ever takes these signals."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def release_signals(signals: frozenset[signal.Signals] = STOP_SIGNALS) -> None:
    """Their handlers are installed: take what came meanwhile, and what comes from now on."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


@dataclass(frozen=True)
class Report:
    """A worker's word to the supervisor: it serves (with its start-up line's fields and the
    page's address), or it cannot (and why, in one line)."""

    serving: bool
    fields: Fields
    page_url: str | None = None
    problem: str = ""


class WorkerLink:
    """A worker's end of its pipe to the supervisor."""

    def __init__(self, index: int, connection: multiprocessing.connection.Connection) -> None:
        self.index = index
        self._connection = connection

    def serving(self, fields: Fields, page_url: str | None) -> None:
        self._send(Report(True, fields, page_url))

    def failed(self, problem: str) -> None:
        self._send(Report(False, {}, problem=problem))

    @staticmethod
    def on_supervisor_exit(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """Call `callback` once if the supervisor dies (SIGKILL, OOM): a worker then drains
        and exits rather than serving on, orphaned, on a port nobody manages."""
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        sentinel = parent.sentinel

        def gone() -> None:
            loop.remove_reader(sentinel)
            log.warning("the supervisor is gone: stopping")
            callback()

        loop.add_reader(sentinel, gone)

    def _send(self, report: Report) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
            self._connection.send(report)


def supervise(
    config: ServerConfig,
    run_worker: Callable[[ServerConfig, WorkerLink], None],
    start_metrics: Callable[[ServerConfig], None],
    probe: Callable[[ServerConfig], None],
) -> int:
    """N processes running `run_worker` share the port through SO_REUSEPORT; the kernel spreads
    connections. `run_worker` must be a module-level function (spawned processes import it).
    `probe` raises what a worker's start would (StartupError, ModelError).

    Metrics: each worker writes to a shared PROMETHEUS_MULTIPROC_DIR and this process serves
    their sum, so one scrape sees the whole server.
    """
    http = (
        reserve_port(config.host, config.http_port, "serve HTTP on", shared=True)
        if config.http_port is not None
        else contextlib.nullcontext(None)
    )
    with (
        tempfile.TemporaryDirectory(prefix="digits-metrics-") as metrics_dir,
        reserve_port(config.host, config.port, "listen on", shared=True) as port,
        http as http_port,
    ):
        if config.metrics_port:  # busy: one line before the probe loads anything
            with reserve_port(config.metrics_host, config.metrics_port, "serve metrics on"):
                pass
        probe(config)
        # Read by the metrics endpoint (it serves the sum of the workers' files) and by the
        # workers; this process's own metrics were made in memory when it imported them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if config.metrics_port is not None:
            start_metrics(config)
        # onnxruntime's default is a thread per core in every worker: N workers would run
        # N x cores threads on large batches. Each gets its share of the cores instead.
        threads = config.intra_op_threads or max(1, available_cpus() // config.workers)
        worker_config = replace(
            config,
            port=port,
            http_port=http_port,
            workers=1,
            instances=config.workers,
            metrics_port=None,
            intra_op_threads=threads,
        )
        log.info(
            "workers", extra={"fields": {"count": config.workers, "intra_op_threads": threads}}
        )
        return _Workers(config.workers).run(worker_config, run_worker)


class _Workers:
    def __init__(self, count: int) -> None:
        self._count = count
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = False

    def run(
        self, config: ServerConfig, run_worker: Callable[[ServerConfig, WorkerLink], None]
    ) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        # multiprocessing's resource tracker, started with the first worker, unblocks SIGINT
        # and SIGTERM when it is up: started first, so what was held is taken now (by
        # _forward), and blocked again for the spawn.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if self._stopping:  # a signal came while this process started: no worker to stop
            log.info("stopped", extra={"fields": {"ended_calls": 0}})
            return 0
        context = multiprocessing.get_context("spawn")
        pipes: dict[multiprocessing.connection.Connection, multiprocessing.process.BaseProcess] = {}
        # The workers inherit the block (the mask survives exec): SIGINT stays held in them
        # for good, as only this process decides when they stop, and SIGTERM until their
        # handler is in place (serve()). Meanwhile, here, a signal waits for _forward.
        try:
            for index in range(self._count):
                receiver, sender = context.Pipe(duplex=False)
                worker = context.Process(
                    target=run_worker,
                    args=(replace(config, instance=index), WorkerLink(index, sender)),
                    name=f"worker-{index}",
                )
                worker.start()
                sender.close()
                self._processes.append(worker)
                pipes[receiver] = worker
        finally:
            release_signals()
        if self._stopping:  # a signal came while they were spawned
            self._forward(signal.SIGTERM, None)
        return self._watch(pipes)

    def _watch(
        self,
        pipes: dict[multiprocessing.connection.Connection, multiprocessing.process.BaseProcess],
    ) -> int:
        serving: dict[int, Report] = {}
        failed = False
        alive = list(self._processes)
        while alive:
            sentinels = [w.sentinel for w in alive]
            ready = multiprocessing.connection.wait([*pipes, *sentinels])
            for connection in [c for c in pipes if c in ready]:
                worker = pipes[connection]
                try:
                    report: Report = connection.recv()
                except (EOFError, OSError):  # the worker ended; its sentinel says how
                    del pipes[connection]
                    continue
                if not report.serving and not failed and not self._stopping:
                    failed = True
                    log.error("not starting: %s", report.problem)
                    self._forward(signal.SIGTERM, None)
                elif report.serving:
                    serving[self._processes.index(worker)] = report
                    if len(serving) == self._count and not self._stopping:
                        _log_serving(serving, self._processes)
            for worker in [w for w in alive if not w.is_alive()]:
                alive.remove(worker)
                if not self._clean(worker) and not self._stopping and not failed:
                    log.error(
                        "%s exited with %s; stopping the others", worker.name, worker.exitcode
                    )
                    self._forward(signal.SIGTERM, None)
        return 0 if not failed and all(self._clean(w) for w in self._processes) else 1

    def _clean(self, worker: multiprocessing.process.BaseProcess) -> bool:
        # Killed by the SIGTERM this process sent (were it ever not held, as _Workers.run
        # arranges, while the worker still imports): it never served, and was asked to stop.
        return worker.exitcode == 0 or (self._stopping and worker.exitcode == -signal.SIGTERM)

    def _forward(self, _signum: int, _frame: Any) -> None:
        self._stopping = True
        for worker in self._processes:
            if worker.pid and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)


def _log_serving(
    reports: dict[int, Report], processes: list[multiprocessing.process.BaseProcess]
) -> None:
    """One line for the whole server: the first worker's, with every worker's pid."""
    first = reports[0]
    fields = {key: value for key, value in first.fields.items() if key != "pid"}
    fields["workers"] = len(processes)
    fields["pids"] = ",".join(str(worker.pid) for worker in processes)
    log.info("serving", extra={"fields": fields})
    if first.page_url:
        log.info("page", extra={"fields": {"url": first.page_url}})


@contextlib.contextmanager
def reserve_port(host: str, port: int, purpose: str, *, shared: bool = False) -> Iterator[int]:
    """Bind `port` on `host` as the server will, or say in one line (StartupError) why not,
    before anything is loaded. `shared`: with SO_REUSEPORT, and held (bound, not listening)
    until the workers are done, so that port 0 means one port for all of them; otherwise
    released at once, for the server to bind."""
    address = host.strip("[]")
    try:
        if shared and port:
            # SO_REUSEPORT would let this server join another one's port (same user) and take
            # half its connections: an exclusive bind first finds anyone already there.
            _bound_socket(address, port, shared=False).close()
        holder = _bound_socket(address, port, shared)
    except OSError as exc:
        # Imported here: this module stays light for cli.py, which takes signals through it
        # before the heavy imports (grpc, onnxruntime) begin.
        from digit_recognizer.server.errors import StartupError

        shown = f"{host}:{port}" if purpose == "listen on" else f"port {port}"
        reason = (exc.strerror or str(exc)).lower()
        raise StartupError(f"cannot {purpose} {shown} ({reason})") from None
    bound = holder.getsockname()[1]
    if not shared:
        holder.close()
        yield bound
        return
    with holder:
        yield bound


def _bound_socket(address: str, port: int, shared: bool) -> socket.socket:
    candidates: list[tuple[socket.AddressFamily, str]]
    if address in ("", "::"):  # every interface: dual-stack where the kernel has IPv6
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
        if not socket.has_ipv6:
            candidates = candidates[1:]
    else:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        candidates = [(infos[0][0], str(infos[0][4][0]))]
    for position, (family, ip) in enumerate(candidates):
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            # As gRPC and aiohttp bind: a port left in TIME_WAIT by the last run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and ip == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((ip, port))
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            # No IPv6 here at all: the server falls back to IPv4 the same way.
            no_ipv6 = exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
            if not (no_ipv6 and position + 1 < len(candidates)):
                raise
    raise AssertionError("unreachable")  # pragma: no cover
