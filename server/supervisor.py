"""`--workers N`: N server processes sharing one port, and this process watching them."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from digit_recognizer.server.config import ServerConfig
from digit_recognizer.server.cpus import available_cpus

log = logging.getLogger("digit_recognizer.server")


def supervise(
    config: ServerConfig,
    run_worker: Callable[[ServerConfig], None],
    start_metrics: Callable[[ServerConfig], None],
) -> int:
    """N processes running `run_worker` share the port through SO_REUSEPORT; the kernel spreads
    connections. `run_worker` must be a module-level function (spawned processes import it).

    Metrics: each worker writes to a shared PROMETHEUS_MULTIPROC_DIR and this process serves
    their sum, so one scrape sees the whole server.
    """
    with (
        tempfile.TemporaryDirectory(prefix="digits-metrics-") as metrics_dir,
        _reserve_port(config) as port,
    ):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if config.metrics_port is not None:
            start_metrics(config)
        # onnxruntime's default is a thread per core in every worker: N workers would run
        # N x cores threads on large batches. Each gets its share of the cores instead.
        threads = config.intra_op_threads or max(1, available_cpus() // config.workers)
        worker_config = replace(
            config, port=port, workers=1, metrics_port=None, intra_op_threads=threads
        )
        log.info(
            "workers", extra={"fields": {"count": config.workers, "intra_op_threads": threads}}
        )
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=run_worker, args=(worker_config,), name=f"worker-{i}")
            for i in range(config.workers)
        ]
        for worker in workers:
            worker.start()
        stopping = False

        def forward(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True
            for worker in workers:
                if worker.pid and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        alive = list(workers)
        while alive:
            multiprocessing.connection.wait([w.sentinel for w in alive])
            for worker in [w for w in alive if not w.is_alive()]:
                alive.remove(worker)
                if worker.exitcode != 0 and not stopping:
                    log.error(
                        "%s exited with %s; stopping the others", worker.name, worker.exitcode
                    )
                    forward(signal.SIGTERM, None)
        return 0 if all(w.exitcode == 0 for w in workers) else 1


@contextlib.contextmanager
def _reserve_port(config: ServerConfig) -> Iterator[int]:
    """Port 0 means "any free port"; every worker must get the same one, so pick it here and
    hold it (bound, not listening) with SO_REUSEPORT until the workers are done."""
    if config.port != 0:
        yield config.port
        return
    host = config.host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, 0))
        yield holder.getsockname()[1]
