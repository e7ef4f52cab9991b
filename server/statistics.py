"""Per-version inference statistics in Triton's terms (its statistics extension: ModelStatistics
over gRPC, GET /v2/models[/{m}[/versions/{v}]]/stats over REST), from the data plane's own
accounting: every call a version computed (or failed to) and every run of its batcher.

Counted where the work happened, in this process: with --workers N each worker keeps its own,
and a call reaches the worker its connection landed on (the supervisor sums Prometheus metrics,
not these). Counting starts when a version is loaded, as in Triton.

What a call's times mean here: `success`/`fail` run from the call reaching the data plane to its
answer, `queue` from its arrival in the batcher's queue to its first model run, and
`compute_infer` is the time inside the model runs that computed it. Preparing the batch and
splitting its outputs are part of the run here, not measured apart: `compute_input` and
`compute_output` are counted with every call and run but always hold 0 ns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from digit_recognizer.server.batcher import BatchEvent, BatchResult


@dataclass
class Duration:
    """How many times something happened and how long it took in all (Triton's
    StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class VersionStatistics:
    last_inference_ms: int = 0  # the last call's end, ms since the epoch; 0: none yet
    inference_count: int = 0  # images computed by successful calls
    execution_count: int = 0  # successful model runs (batches)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # model time by executed size

    def ran(self, event: BatchEvent) -> None:
        """One model run of the batcher (a failed run is counted in its callers' `fail`)."""
        if not event.failed:
            self.execution_count += 1
            self.batches.setdefault(event.size, Duration()).add(event.compute_us * 1000)

    def succeeded(self, images: int, duration_ns: int, execution: BatchResult) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += images
        self.success.add(duration_ns)
        self.queue.add(execution.queue_us * 1000)
        self.compute_infer.add(execution.compute_us * 1000)

    def failed(self, duration_ns: int) -> None:
        """A call the batcher accepted or refused (queue full, deadline, failed run)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.fail.add(duration_ns)
