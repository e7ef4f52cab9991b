"""The data plane: what every front (digits.v1, Open Inference Protocol gRPC, HTTP) calls.

Protocol-neutral: numpy arrays and plain objects in and out, never protobuf or HTTP types. It
holds the served model versions (each with its own batcher), picks the version a call asks
for, turns a call's remaining time into a deadline, counts accepted calls for draining, and
runs every call through `observed`, which times it, records its metrics and maps its failure
through errors.py to one `Status` that each front turns into its own wire error.

Draining serves: a call that reaches a draining server is computed like any other, because
refusing it (fast) is what made round-robin clients send a draining replica ever more
traffic. The server leaves once calls have stopped arriving for a quiet window and all
accepted work is done, or when the grace period ends (app.py, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import Batcher, BatcherLimits, BatchEvent, BatchResult
from digit_recognizer.server.errors import (
    InvalidInput,
    ModelNotFound,
    ServingError,
    Status,
    cut,
    to_status,
)
from digit_recognizer.server.inference import Model
from digit_recognizer.server.model_config import ModelSettings
from digit_recognizer.server.statistics import VersionStatistics
from digit_recognizer.server.tracing import Carrier, Tracing

log = logging.getLogger(__name__)
DRAIN_QUIET_S = 0.25  # no call for this long: the clients have moved to other replicas
READY, UNAVAILABLE = "READY", "UNAVAILABLE"
T = TypeVar("T")


@dataclass(frozen=True)
class RequestLimits:
    max_images_per_request: int
    max_message_bytes: int


class ServedVersion:
    """One loaded model version, served by its own batcher under (name, version)."""

    def __init__(self, name: str, version: str, model: Model, settings: ModelSettings) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.settings = settings  # its model's config.pbtxt over the flags (model_config.py)
        self.series = metrics.VersionSeries.of(name, version)
        self.statistics = VersionStatistics()  # Triton's ModelStatistics of this version
        self.tracing = Tracing()  # the data plane's, once it serves this version
        self.batcher = Batcher(
            model.predict,
            settings.batcher_limits,
            on_batch=self._record_batch,
            on_skip=lambda reason: self.series.skipped[reason].inc(),
            version=version,
        )

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    def swap(self, model: Model, version: str) -> None:
        """Another file for the same place: queued work runs on it from the next model run."""
        self.model, self.version = model, version
        self.series = metrics.VersionSeries.of(self.name, version)
        self.statistics = VersionStatistics()
        self.batcher.swap(model.predict, version)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.card.labels

    def _record_batch(self, event: BatchEvent) -> None:
        self.statistics.ran(event)
        self.series.batch_size.observe(event.size)
        self.series.batch_compute.observe(event.compute_us / 1e6)
        self.series.queue_depth.set(self.batcher.queued_images)  # sampled at every model run
        if event.failed:
            self.series.failed_batches.inc()
        if self.tracing.enabled:
            self.tracing.batch(event.started_s, event.compute_us / 1e6, event.size, event.callers)


@dataclass(frozen=True)
class VersionStatus:
    model: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str = ""


@dataclass(frozen=True)
class Classified:
    """What the model said about each image, and how the call was executed."""

    probabilities: np.ndarray  # (N, classes)
    digit_scores: np.ndarray | None  # (N,) in [0, 1]; None: the model has no detector
    is_digit: np.ndarray | None  # (N,) bool, score >= the card's threshold; None: unknown
    execution: BatchResult  # telemetry: batch size, batches, queue and compute time

    @property
    def version(self) -> str:
        return self.execution.version

    @classmethod
    def of(cls, result: BatchResult, classes: int, threshold: float | None) -> Classified:
        outputs = result.outputs
        scores = outputs[:, classes] if outputs.shape[1] > classes else None
        is_digit = scores >= threshold if scores is not None and threshold is not None else None
        return cls(outputs[:, :classes], scores, is_digit, result)


class ControlRefused(ServingError):
    """A model load or unload that cannot be done: not in explicit model control mode, or
    the model cannot be served (the message says why; what served before still does)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelControl(Protocol):
    """What answers explicit load and unload requests: the repository (repository.py)."""

    async def load_named(self, name: str) -> None: ...

    async def unload_named(self, name: str) -> None: ...


class CallFailed(Exception):
    """A call ended in an error status; the front sends `status` in its own wire format."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.message)
        self.status = status


class Call:
    """One call in progress: which version served it, for its metrics' labels."""

    __slots__ = ("served", "span")

    def __init__(self) -> None:
        self.served: ServedVersion | None = None
        self.span: Any = None  # its trace span, when tracing is on


class DataPlane:
    def __init__(self, limits: RequestLimits, batcher_limits: BatcherLimits) -> None:
        self.limits = limits
        self.batcher_limits = batcher_limits
        self.default_model = ""
        self.tracing = Tracing()  # off; app.py turns it on from the OTEL_* environment
        self.control: ModelControl | None = None  # the repository sets itself here
        self._models: dict[str, dict[str, ServedVersion]] = {}
        self._latest: dict[str, ServedVersion] = {}
        self._unavailable: dict[tuple[str, str], str] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._draining = False
        self._last_arrival = 0.0
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # The served versions: changed by the repository, read by every call.

    def serve(self, served: ServedVersion) -> None:
        """Serve `served` from now on, in place of a version of the same name and number."""
        versions = self._models.setdefault(served.name, {})
        replaced = versions.get(served.version)
        versions[served.version] = served
        self._unavailable.pop(served.key, None)
        served.tracing = self.tracing
        served.batcher.start()
        if replaced is not None:
            # First: the same file under the same labels would zero the series set below.
            self._close_later(replaced)
        self._model_info(served, 1)
        self._update_latest(served.name)

    def swap(self, served: ServedVersion, model: Model, version: str) -> None:
        """Replace `served`'s model in place (its file changed), under `version` from now on:
        what is queued runs on the new model, so no reply goes back to the old one."""
        self._model_info(served, 0)
        versions = self._models[served.name]
        if versions.get(served.version) is served:
            del versions[served.version]
        served.swap(model, version)
        replaced = versions.get(version)
        versions[version] = served
        self._unavailable.pop(served.key, None)
        self._model_info(served, 1)
        self._update_latest(served.name)
        if replaced is not None:
            self._close_later(replaced)

    def retire(self, served: ServedVersion) -> asyncio.Task[None] | None:
        """Stop choosing `served`; what its batcher already accepted is still computed, and
        the task returned ends when it has been (None: `served` was not being served)."""
        versions = self._models.get(served.name, {})
        if versions.get(served.version) is not served:
            return None
        del versions[served.version]
        if not versions:
            del self._models[served.name]
        self._update_latest(served.name)
        return self._close_later(served)

    async def load_model(self, name: str, parameters: Collection[str] = ()) -> None:
        """Explicit model control: serve model `name` as the repository holds it now (read,
        warmed up, then served). ControlRefused, ModelNotFound or InvalidInput say why not.
        `parameters`: the names a load request carried; Triton's `config` override and
        `file:` contents are not served, and are refused rather than ignored."""
        if not name:
            raise InvalidInput("name the model to load")
        if parameters:
            raise InvalidInput(
                f"load parameters {', '.join(sorted(parameters))} are not supported: this server "
                "loads what the repository holds (edit <name>/config.pbtxt and the version "
                "folders, then load)"
            )
        await self._control("load").load_named(name)

    async def unload_model(self, name: str, parameters: Collection[str] = ()) -> None:
        """Explicit model control: stop serving `name`, once what it accepted is answered.
        `unload_dependents` is accepted (nothing here depends on another model)."""
        if not name:
            raise InvalidInput("name the model to unload")
        if unsupported := sorted(set(parameters) - {"unload_dependents"}):
            raise InvalidInput(f"unload parameters {', '.join(unsupported)} are not supported")
        await self._control("unload").unload_named(name)

    def _control(self, action: str) -> ModelControl:
        if self.control is None:
            raise ControlRefused(f"explicit model {action} is not served here")
        return self.control

    def mark_unavailable(self, name: str, version: str, reason: str) -> None:
        self._unavailable[(name, version)] = reason

    def forget_unavailable(self, name: str, version: str) -> None:
        self._unavailable.pop((name, version), None)

    def served(self) -> list[ServedVersion]:
        """Every served version, by model name, then version."""
        return [
            self._models[name][version]
            for name in sorted(self._models)
            for version in sorted(self._models[name], key=_version_order)
        ]

    def statuses(self, ready_only: bool = False) -> list[VersionStatus]:
        states = [VersionStatus(s.name, s.version, READY) for s in self.served()]
        if not ready_only:
            states += [
                VersionStatus(name, version, UNAVAILABLE, reason)
                for (name, version), reason in self._unavailable.items()
            ]
        return sorted(states, key=lambda s: (s.model, _version_order(s.version)))

    def resolve(self, model: str = "", version: str = "") -> ServedVersion:
        """The version a caller asks for: empty model = the default model, empty version =
        its latest served version. ModelNotFound (listing what is served) otherwise."""
        name = model or self.default_model
        versions = self._models.get(name, {})
        served = versions.get(version) if version else self._latest.get(name)
        if served is None:
            raise self._not_found(model, version)
        return served

    def is_served(self, model: str, version: str = "") -> bool:
        try:
            self.resolve(model, version)
        except ModelNotFound:
            return False
        return True

    @property
    def queued_images(self) -> int:
        return sum(served.batcher.queued_images for served in self.served())

    # Calls.

    async def observed(
        self,
        method: str,
        work: Callable[..., Awaitable[T]],
        *args: Any,
        carrier: Carrier = None,
    ) -> T:
        """Run `work(call, *args)` as one call of `method`: timed, counted by status code and
        served version, traced (continuing the trace context in `carrier`: gRPC metadata or
        HTTP headers, read only when tracing is on); any failure becomes CallFailed."""
        started = time.perf_counter()
        self._last_arrival = started
        call = Call()
        with self.tracing.call(method, carrier) as call.span:
            try:
                value = await work(call, *args)
            except Exception as exc:
                status = to_status(exc)
                if not isinstance(exc, ServingError):  # a bug: the details go to the log only
                    log.error("%s failed", method, exc_info=exc)
                elif status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and call.served:
                    call.served.series.rejected.inc()
                self._record(method, status.code, call, started)
                raise CallFailed(status) from None
            self._record(method, grpc.StatusCode.OK, call, started)
            return value

    def choose(self, call: Call, model: str = "", version: str = "") -> ServedVersion:
        """The version that will compute this call (drawing no distinction while draining)."""
        call.served = self.resolve(model, version)
        return call.served

    async def classify(
        self, served: ServedVersion, pixels: np.ndarray, remaining: float | None
    ) -> Classified:
        """Validated (N, 784) pixels through `served`'s batcher within `remaining` seconds
        (None: no deadline)."""
        arrived = time.monotonic()
        deadline = None if remaining is None else arrived + remaining
        span = self.tracing.current_span()
        self._active += 1
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        try:
            result = await served.batcher.submit(pixels, deadline, span and span.get_span_context())
        except Exception:
            served.statistics.failed(round((time.monotonic() - arrived) * 1e9))
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        served.series.images.inc(len(pixels))
        served.statistics.succeeded(len(pixels), round((time.monotonic() - arrived) * 1e9), result)
        served.series.queue_wait.observe(result.queue_us / 1e6)
        if span is not None:
            self.tracing.stages(span, arrived, result.queue_us, result.compute_us)
        return Classified.of(result, len(served.labels), served.model.card.digit_threshold)

    # Draining and shutdown.

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def active_requests(self) -> int:
        return self._active

    def start_draining(self) -> None:
        """Readiness turns false (probes, OIP ServerReady); calls are still served."""
        self._draining = True

    async def drain(self, grace_s: float, quiet_s: float = DRAIN_QUIET_S) -> int:
        """Serve until calls have stopped arriving for `quiet_s` and none is in progress, or
        until `grace_s` has passed; returns how many calls were still in progress then."""
        self._draining = True
        give_up = time.perf_counter() + grace_s
        while True:
            now = time.perf_counter()
            if now >= give_up:
                return self._active
            if self._active:
                try:
                    await asyncio.wait_for(self._idle.wait(), give_up - now)
                except TimeoutError:
                    return self._active
                continue
            quiet_for = now - self._last_arrival
            if quiet_for >= quiet_s:
                return 0
            await asyncio.sleep(min(quiet_s - quiet_for, give_up - now))

    async def close(self) -> None:
        """Finish what every batcher accepted, then stop them."""
        for served in self.served():
            self._close_later(served)
        self._models.clear()
        self._latest.clear()
        await asyncio.gather(*self._closing)

    # Internals.

    def _update_latest(self, name: str) -> None:
        versions = self._models.get(name)
        if versions:
            self._latest[name] = versions[max(versions, key=_version_order)]
        else:
            self._latest.pop(name, None)

    def _close_later(self, served: ServedVersion) -> asyncio.Task[None]:
        self._model_info(served, 0)
        task = asyncio.get_running_loop().create_task(served.batcher.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    @staticmethod
    def _model_info(served: ServedVersion, value: int) -> None:
        model = served.model
        metrics.MODEL_INFO.labels(
            served.name, served.version, model.provider, model.file_sha256
        ).set(value)

    def _record(self, method: str, code: grpc.StatusCode, call: Call, started: float) -> None:
        served = call.served
        model, version = (served.name, served.version) if served else ("", "")
        count, latency = metrics.request_series(method, code.name, model, version)
        count.inc()
        latency.observe(time.perf_counter() - started)
        if call.span is not None:
            self.tracing.finish_call(call.span, model, version, code.name)

    def _not_found(self, model: str, version: str) -> ModelNotFound:
        model, version = cut(model), cut(version)  # the caller's words, echoed: bounded
        served = "; ".join(
            f"{name!r} version{'s' if len(versions) > 1 else ''} "
            + ", ".join(repr(v) for v in sorted(versions, key=_version_order))
            for name, versions in sorted(self._models.items())
        )
        if not model:
            default = f"the default model {self.default_model!r}"
            asked = f"version {version!r} of {default}" if version else f"version of {default}"
            return ModelNotFound(f"no {asked} here; this server serves {served or 'nothing'}")
        asked = f"{model!r}" + (f" version {version!r}" if version else "")
        return ModelNotFound(f"no model {asked} here; this server serves {served or 'nothing'}")


def _version_order(version: str) -> tuple[int, int, str]:
    """Numeric versions by value (2 before 10), then any others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
