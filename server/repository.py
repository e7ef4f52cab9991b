"""The model repository on disk, watched: what it holds, under the version policy, is served.

Two layouts:
- `--model-repository DIR`: Triton's `DIR/<name>/<version>/model.onnx`, versions positive
  integers. The version policy (TF Serving's: latest, all, specific:1,3) chooses which
  versions of each model are served. Publish a version by renaming a complete directory into
  place (`os.replace`): names that are not positive integers (`.3.tmp`) are never looked at.
- `--model FILE`: a repository of one model, named and versioned by its model card; replacing
  the file (atomically, as `digit-train` writes it) replaces the version.

Every poll interval the files are compared with what is served: a new or changed version is
loaded, validated and warmed up off the event loop and only then served (a changed file is
swapped into its version's batcher between two model runs, so work queued for it runs on the
new file and no reply goes back to the old one); a version that
fails any check is refused with one log line and a `refused` reload metric, not retried
until its file changes, and never displaces what is serving (with `latest`, the newest
version that loads is the one served). A version removed from DIR stops being chosen at once
and finishes the work it accepted. A new version must keep the labels of the model's served
versions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.dataplane import DataPlane, ServedVersion
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.inference import InferenceOptions, Model, load_model

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
_MAX_PASSES = 32

Signature = tuple[int, int, int]


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served: the highest, all, or the ones listed."""

    kind: str = "latest"
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `all` or `specific:1,3`; ValueError saying what is accepted otherwise."""
        kind, _, listed = text.strip().partition(":")
        if kind in ("latest", "all") and not listed:
            return cls(kind)
        if kind == "specific":
            try:
                versions = tuple(sorted({int(v) for v in listed.split(",") if v.strip()}))
            except ValueError:
                versions = ()
            if versions and min(versions) >= 1:
                return cls(kind, versions)
        raise ValueError(
            f"{text!r} is not a version policy: use latest, all, or specific:V[,V...] with "
            "positive integer versions (specific:1,3)"
        )

    def select(self, available: Collection[int]) -> set[int]:
        if self.kind == "latest":
            return {max(available)} if available else set()
        if self.kind == "all":
            return set(available)
        return set(available) & set(self.versions)

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in self.versions)
        return self.kind


@dataclass(frozen=True)
class _Found:
    """A model file on disk: where it is and which version of which model it would be."""

    name: str  # "" for --model FILE until its card is read
    version: str
    path: Path
    signature: Signature


class ModelRepository:
    def __init__(
        self,
        plane: DataPlane,
        source: Path,
        *,
        is_directory: bool,
        policy: VersionPolicy,
        options: InferenceOptions,
        batcher_limits: BatcherLimits,
        interval_s: float,
    ) -> None:
        self._plane = plane
        self._source = source
        self._is_directory = is_directory
        self._policy = policy
        self._options = options
        self._batcher_limits = batcher_limits
        self._interval_s = interval_s
        self._loaded: dict[Path, tuple[Signature, ServedVersion]] = {}
        self._refused: dict[Path, Signature] = {}  # not retried until the file changes
        self._task: asyncio.Task[None] | None = None

    async def load(self, model: Model | None = None) -> None:
        """The first scan, before anything is served: ModelError when nothing can be.
        `model`: the already-loaded model of --model FILE (tests inject fakes this way)."""
        if not self._is_directory:
            signature = _signature(self._source) or (0, 0, 0)
            if model is None:
                model = await asyncio.to_thread(load_model, self._source, self._options)
            self._add(_Found("", "", self._source, signature), model)
            return
        await self.poll()
        if not self._plane.served():
            reasons = [s.reason for s in self._plane.statuses() if s.reason]
            raise ModelError(
                f"no servable model in {self._source} (expected {self._source}/<name>/"
                f"<version>/{MODEL_FILE}, versions {self._policy})"
                + (": " + "; ".join(reasons) if reasons else "")
            )

    def start(self) -> None:
        if self._interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="repository")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def poll(self) -> None:
        """Bring what is served in line with what the files and the policy say."""
        # Every pass loads or refuses at least one file, and refused ones leave the wanted
        # list (with `latest`, the next lower version is wanted instead); the cap only matters
        # for files rewritten faster than they load, which the next poll picks up.
        wanted = self._wanted()
        for _ in range(_MAX_PASSES):
            changed = [
                found
                for found in wanted
                if (loaded := self._loaded.get(found.path)) is None or loaded[0] != found.signature
            ]
            if not changed:
                break
            for found in changed:
                await self._load(found)
            wanted = self._wanted()
        if self._is_directory:  # a vanished --model FILE is mid-replacement: keep serving it
            kept = {found.path for found in wanted}
            for path in [p for p in self._loaded if p not in kept]:
                self._unload(path)
            for path in [p for p in self._refused if _signature(p) is None]:
                del self._refused[path]  # a refused version removed: no longer listed
                self._plane.forget_unavailable(path.parent.parent.name, path.parent.name)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll()
            except Exception:  # never let one bad scan stop the watching
                log.exception("repository scan failed; retrying in %s s", self._interval_s)

    def _wanted(self) -> list[_Found]:
        if not self._is_directory:
            signature = _signature(self._source)
            found = [] if signature is None else [_Found("", "", self._source, signature)]
            return [f for f in found if not self._was_refused(f)]
        wanted = []
        for _, versions in sorted(_scan(self._source).items()):
            loadable = {n: f for n, f in versions.items() if not self._was_refused(f)}
            wanted += [loadable[number] for number in sorted(self._policy.select(loadable))]
        return wanted

    def _was_refused(self, found: _Found) -> bool:
        return self._refused.get(found.path) == found.signature

    async def _load(self, found: _Found) -> None:
        try:
            model = await asyncio.to_thread(load_model, found.path, self._options)
        except ModelError as exc:
            self._refuse(found, str(exc))
            return
        self._add(found, model)

    def _add(self, found: _Found, model: Model) -> None:
        previous = self._loaded.get(found.path)
        replaced_version = previous[1].version if previous else ""
        name = found.name or (previous[1].name if previous else model.card.name)
        version = found.version or model.card.version
        others = [s for s in self._plane.served() if s.name == name and s.version != version]
        if others and others[0].labels != model.card.labels:
            self._refuse(
                found,
                f"{found.path}: labels {list(model.card.labels)} differ from the served "
                f"{list(others[0].labels)}; serve it under another model name (or restart)",
                name,
                version,
            )
            return
        if previous is None:
            served = ServedVersion(name, version, model, self._batcher_limits)
            self._plane.serve(served)
        else:  # the same file replaced: swapped in place, between two model runs
            served = previous[1]
            self._plane.swap(served, model, version)
        self._loaded[found.path] = (found.signature, served)
        self._refused.pop(found.path, None)
        metrics.RELOADS.labels("ok", name, version).inc()
        log.info(
            "loaded",
            extra={
                "fields": {
                    "model": name,
                    "version": version,
                    "path": str(found.path),
                    "sha256": model.file_sha256,
                    "provider": model.provider,
                    **({"replaces": replaced_version} if previous else {}),
                }
            },
        )

    def _refuse(self, found: _Found, reason: str, name: str = "", version: str = "") -> None:
        name, version = name or found.name, version or found.version
        self._refused[found.path] = found.signature
        if self._is_directory:
            self._plane.mark_unavailable(name, version, reason)
        metrics.RELOADS.labels("refused", name, version).inc()
        serving = ", ".join(f"{s.name} {s.version}" for s in self._plane.served()) or "nothing"
        log.error("model refused (still serving %s): %s", serving, reason)

    def _unload(self, path: Path) -> None:
        _, served = self._loaded.pop(path)
        self._plane.retire(served)
        metrics.RELOADS.labels("unloaded", served.name, served.version).inc()
        log.info("unloaded", extra={"fields": {"model": served.name, "version": served.version}})


def _scan(root: Path) -> dict[str, dict[int, _Found]]:
    """{model name: {version: file}} for every DIR/<name>/<version>/model.onnx there now."""
    found: dict[str, dict[int, _Found]] = {}
    for model_dir in _subdirectories(root):
        if model_dir.name.startswith("."):
            continue
        for version_dir in _subdirectories(model_dir):
            number = version_dir.name
            if not (number.isdigit() and str(int(number)) == number and int(number) >= 1):
                continue  # not a published version: a temporary name, "0", "007"
            path = version_dir / MODEL_FILE
            signature = _signature(path)
            if signature is not None:
                found.setdefault(model_dir.name, {})[int(number)] = _Found(
                    model_dir.name, number, path, signature
                )
    return found


def _subdirectories(path: Path) -> list[Path]:
    try:
        return sorted(entry for entry in path.iterdir() if entry.is_dir())
    except OSError:  # removed or unreadable while we looked
        return []


def _signature(path: Path) -> Signature | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
