"""The model repository on disk: what it holds, under each model's version policy, is served.

Two layouts:
- `--model-repository DIR`: Triton's `DIR/<name>/<version>/model.onnx`, versions positive
  integers, and optionally `DIR/<name>/config.pbtxt` (model_config.py: that model's batching,
  queue, version policy and instance kind; the flags are the defaults). The version policy
  (TF Serving's: latest, all, specific:1,3) chooses which versions of each model are served.
  Publish a version by renaming a complete directory into place (`os.replace`): names that
  are not positive integers (`.3.tmp`) are never looked at.
- `--model FILE`: a repository of one model, named and versioned by its model card; replacing
  the file (atomically, as `digit-train` writes it) replaces the version.

Model control (Triton's --model-control-mode):
- `poll` (the default): every poll interval the files are compared with what is served.
- `none`: what is there at start is served, and nothing changes until a restart.
- `explicit`: only the models named by --load-model (`*`: all) are served at start; then
  `load(name)` (re)reads one model's files and config and `unload(name)` drops it, as the
  RepositoryModelLoad/Unload calls ask. Nothing is watched.

Whatever asks for it, a new or changed version is loaded, validated and warmed up off the
event loop and only then served (a changed file is swapped into its version's batcher between
two model runs, so work queued for it runs on the new file and no reply goes back to the old
one; a changed config.pbtxt gives the version a new batcher, and the old one finishes what it
accepted); a version that fails any check is refused with one log line and a `refused`
reload metric, not retried until its file or config changes, and never displaces what is
serving (with `latest`, the newest version that loads is the one served). A config.pbtxt that
cannot be served refuses its model the same way. A version no longer wanted stops being
chosen at once and finishes the work it accepted (`unload` answers once it has). A new
version must keep the labels of the model's served versions.

Bounds (Triton has none; a repository is a directory anyone with write access can fill):
- At most `max_models` versions are served (each is a session and a batcher in memory). What
  serves keeps its place, then new versions of served models, then new models by name; the
  rest is listed UNAVAILABLE with the reason (one WARNING line each time more are left out)
  and loaded once there is room (a model removed).
- A model file over `max_model_bytes` is refused by its size on disk, before it is read.
  Measured (2 cores): onnxruntime holds the GIL while it creates a session from bytes, about
  1 ms per MB (404 ms for a 424 MB file, twice per load: the main and the one-thread
  session), so the size limit is also what bounds how long a load can stall other callers.
- A config.pbtxt over 64 KiB is refused (parsed on the event loop: ~0.5 ms per KB).
- A model folder, version folder, model.onnx or config.pbtxt that resolves outside the
  repository (a symbolic link out of it) is refused with the reason; links that stay inside
  are followed. Checked before reading; a link swapped in between is not (a TOCTOU window
  that only someone who can write the repository has).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.config import CONTROL_MODES
from digit_recognizer.server.dataplane import ControlRefused, DataPlane, ServedVersion
from digit_recognizer.server.errors import ModelError, ModelNotFound
from digit_recognizer.server.inference import InferenceOptions, Model, load_model
from digit_recognizer.server.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    ModelSettings,
    VersionPolicy,
    check_model,
    settings_from_pbtxt,
)

__all__ = ["CONTROL_MODES", "MODEL_FILE", "ModelRepository", "VersionPolicy"]

log = logging.getLogger(__name__)
ALL_MODELS = "*"  # --load-model '*': every model in the repository (Triton's spelling)
_MAX_PASSES = 32
_NO_FILE = (0, 0, 0)
MAX_CONFIG_BYTES = 64 << 10  # Triton's configs are a few KB; parsing 1 MB took 496 ms
_LISTED = 5  # versions named in the --max-models warning

Signature = tuple[int, ...]  # the model file's (inode, size, mtime), then its config's


@dataclass(frozen=True)
class RepositoryLimits:
    max_models: int = 64  # model versions served at once
    max_model_bytes: int = 128 << 20  # per model file: ~130 ms of GIL held to load it

    def problems(self) -> list[tuple[str, str]]:
        """(field, problem) for each limit that cannot work."""
        return [
            (field, f"must be at least 1, got {getattr(self, field)}")
            for field in ("max_models", "max_model_bytes")
            if getattr(self, field) < 1
        ]


@dataclass(frozen=True)
class _Found:
    """A model file on disk: where it is and which version of which model it would be."""

    name: str  # "" for --model FILE until its card is read
    version: str
    path: Path
    signature: Signature
    settings: ModelSettings | None = None  # None: the flags'


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
        control_mode: str = "poll",
        load_models: Sequence[str] = (),
        honour_instance_kind: bool = True,
        limits: RepositoryLimits = RepositoryLimits(),
    ) -> None:
        """`control_mode`: none | poll | explicit; `load_models`: explicit mode's models at
        start. `honour_instance_kind` False: every model on `options.provider`, whatever its
        config says (the start-up probe, which must not open CUDA). `limits`: module doc."""
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {', '.join(CONTROL_MODES)}")
        self._plane = plane
        self._source = source
        self._is_directory = is_directory
        self._options = options
        self._defaults = ModelSettings.from_flags(batcher_limits, policy)
        self._interval_s = interval_s
        self._mode = control_mode
        self._load_models = tuple(load_models)
        self._honour_kind = honour_instance_kind
        self._limits = limits
        self._real_root = Path(os.path.realpath(source))
        # explicit mode: the models to serve (filled at start); other modes: all there are.
        self._chosen: set[str] | None = set() if control_mode == "explicit" else None
        self._loaded: dict[Path, tuple[Signature, ServedVersion]] = {}
        self._refused: dict[Path, Signature] = {}  # not retried until the file changes
        # Per model: its config.pbtxt's signature, why its folder is refused ("" when it is
        # not), and its settings or why it is refused.
        self._configs: dict[str, tuple[Signature | None, str, ModelSettings | str]] = {}
        self._over_cap: set[tuple[str, str]] = set()  # (model, version) left out: max_models
        self._lock = asyncio.Lock()  # one scan, load or unload at a time
        self._task: asyncio.Task[None] | None = None
        plane.control = self

    @property
    def mode(self) -> str:
        return self._mode

    async def load(self, model: Model | None = None) -> None:
        """The first scan, before anything is served: ModelError when nothing can be.
        `model`: the already-loaded model of --model FILE (tests inject fakes this way)."""
        if not self._is_directory:
            signature = _signature(self._source) or _NO_FILE
            if model is None:
                if reason := self._unreadable(self._source):
                    raise ModelError(reason)
                model = await asyncio.to_thread(load_model, self._source, self._options)
            self._add(_Found("", "", self._source, signature), model)
            return
        if self._chosen is not None:
            names = set(_scan(self._source))
            if ALL_MODELS in self._load_models and len(set(self._load_models)) > 1:
                raise ModelError(f"--load-model '{ALL_MODELS}' means every model: give it alone")
            if ALL_MODELS in self._load_models:
                self._chosen = names
            else:
                missing = sorted(set(self._load_models) - names)
                if missing:
                    raise ModelError(
                        f"--load-model {', '.join(missing)}: no such model in {self._source} "
                        f"(it has {', '.join(sorted(names)) or 'none'})"
                    )
                self._chosen = set(self._load_models)
            if not self._chosen:
                raise ModelError(
                    "--model-control-mode explicit: name the models to serve at start with "
                    f"--load-model NAME (or --load-model '{ALL_MODELS}' for all)"
                )
        await self.poll()
        if not self._plane.served():
            reasons = [s.reason for s in self._plane.statuses() if s.reason]
            raise ModelError(
                f"no servable model in {self._source} (expected {self._source}/<name>/"
                f"<version>/{MODEL_FILE}, versions {self._defaults.version_policy})"
                + (": " + "; ".join(reasons) if reasons else "")
            )

    def start(self) -> None:
        if self._mode == "poll" and self._interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="repository")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def poll(self, names: Collection[str] | None = None) -> None:
        """Bring what is served in line with what the files, configs and policies say (for
        the models `names`, or all)."""
        async with self._lock:
            await self._poll(names)

    # Explicit model control: what RepositoryModelLoad / RepositoryModelUnload ask for.

    async def load_named(self, name: str) -> None:
        """Serve model `name` as its files and config say now: loaded, warmed up, then
        served (in place of what its versions were). ControlRefused says why not."""
        self._check_explicit("load")
        async with self._lock:
            if name not in (names := _scan(self._source)):
                raise ModelNotFound(
                    f"no model {name!r} in the repository (it has "
                    f"{', '.join(sorted(names)) or 'none'}; expected <name>/<version>/{MODEL_FILE})"
                )
            assert self._chosen is not None
            self._chosen.add(name)
            for path in [p for p in self._refused if p.parent.parent.name == name]:
                del self._refused[path]  # asked for explicitly: read again, whatever failed
            await self._poll({name})
            settings = self._configs.get(name, (None, "", ""))[2]
        if isinstance(settings, str):
            raise ControlRefused(f"failed to load {name!r}: {settings}")
        if not any(s.name == name for s in self._plane.served()):
            reasons = [s.reason for s in self._plane.statuses() if s.model == name and s.reason]
            raise ControlRefused(
                f"failed to load {name!r}: "
                + ("; ".join(reasons) or f"no version wanted by {settings.version_policy}")
            )

    async def unload_named(self, name: str) -> None:
        """Stop serving model `name`: no call chooses it from now on, and this returns once
        every call it accepted has been answered. Unloading what is not loaded is no error."""
        self._check_explicit("unload")
        async with self._lock:
            assert self._chosen is not None
            self._chosen.discard(name)
            paths = [p for p, (_, served) in self._loaded.items() if served.name == name]
            closing = [self._unload(path, reason="unloaded") for path in paths]
            for path in [p for p in self._refused if p.parent.parent.name == name]:
                del self._refused[path]
                self._plane.forget_unavailable(name, path.parent.name)
            for key in [k for k in self._over_cap if k[0] == name]:
                self._over_cap.discard(key)
                self._plane.forget_unavailable(*key)
            self._plane.forget_unavailable(name, "")
        await asyncio.gather(*[task for task in closing if task is not None])

    def _check_explicit(self, action: str) -> None:
        if self._mode != "explicit" or not self._is_directory:
            raise ControlRefused(
                f"explicit model {action} is not allowed: this server runs "
                + (
                    f"--model-control-mode {self._mode}"
                    if self._is_directory
                    else "one --model FILE"
                )
                + " (start it with --model-repository DIR --model-control-mode explicit)"
            )

    # Scanning.

    async def _poll(self, names: Collection[str] | None) -> None:
        # Every pass loads or refuses at least one file, and refused ones leave the wanted
        # list (with `latest`, the next lower version is wanted instead); the cap only matters
        # for files rewritten faster than they load, which the next poll picks up.
        wanted = self._wanted(names)
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
            wanted = self._wanted(names)
        if self._is_directory:  # a vanished --model FILE is mid-replacement: keep serving it
            kept = {found.path for found in wanted}
            for path in [p for p in self._loaded if p not in kept and _within(p, names)]:
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

    def _wanted(self, names: Collection[str] | None) -> list[_Found]:
        if not self._is_directory:
            signature = _signature(self._source)
            found = [] if signature is None else [_Found("", "", self._source, signature)]
            return [f for f in found if not self._was_refused(f)]
        wanted = []
        for name, versions in sorted(_scan(self._source).items()):
            if (names is not None and name not in names) or (
                self._chosen is not None and name not in self._chosen
            ):
                continue
            config_signature, settings = self._settings(name)
            if isinstance(settings, str):  # refused: what serves keeps serving, as it is
                wanted += [
                    replace(found, signature=self._loaded[found.path][0])
                    for found in versions.values()
                    if found.path in self._loaded
                ]
                continue
            versions = {
                number: replace(
                    found,
                    signature=found.signature + (config_signature or _NO_FILE),
                    settings=settings,
                )
                for number, found in versions.items()
            }
            loadable = {n: f for n, f in versions.items() if not self._was_refused(f)}
            policy = settings.version_policy
            wanted += [loadable[number] for number in sorted(policy.select(loadable))]
        return self._capped(wanted, names)

    def _capped(self, wanted: list[_Found], names: Collection[str] | None) -> list[_Found]:
        """`wanted` (for the models `names`, or all) within max_models versions: what serves
        keeps its place, then new versions of served models, then new models in name order;
        the rest is listed UNAVAILABLE with the reason, and logged once."""
        if not self._is_directory:
            return wanted
        limit = self._limits.max_models
        room = max(0, limit - sum(1 for path in self._loaded if not _within(path, names)))
        serving = {served.name for _, served in self._loaded.values()}
        ranked = sorted(wanted, key=lambda f: (f.path not in self._loaded, f.name not in serving))
        kept = {found.path for found in ranked[:room]}
        over = {(found.name, found.version) for found in ranked[room:]}
        before = {key for key in self._over_cap if names is None or key[0] in names}
        for key in before - over:  # loaded now, removed, or no longer wanted by its policy
            self._over_cap.discard(key)
            self._plane.forget_unavailable(*key)
        reason = (
            f"not loaded: this server serves at most --max-models {limit} model versions "
            "(raise it, or remove models from the repository)"
        )
        for key in over:
            self._plane.mark_unavailable(*key, reason)
        if added := sorted(over - before):
            self._over_cap.update(added)
            metrics.RELOADS.labels("refused", "", "").inc(len(added))  # no series per name
            listed = ", ".join(f"{name}/{version}" for name, version in added[:_LISTED])
            more = f" and {len(added) - _LISTED} more" if len(added) > _LISTED else ""
            log.warning(
                "%d model versions not loaded, over --max-models %d: %s%s",
                len(added),
                limit,
                listed,
                more,
            )
        return [found for found in wanted if found.path in kept]

    def _settings(self, name: str) -> tuple[Signature | None, ModelSettings | str]:
        """Model `name`'s settings (its config.pbtxt over the flags), or why it is refused;
        read again only when the file or the folder's place changed, so its warning is logged
        once."""
        path = self._source / name / CONFIG_FILE
        signature = _signature(path)
        outside = self._outside(path if signature is not None else path.parent)
        cached = self._configs.get(name)
        if cached is not None and cached[:2] == (signature, outside):
            return signature, cached[2]
        settings: ModelSettings | str = self._defaults
        if outside:
            settings = outside
        elif signature is not None and signature[1] > MAX_CONFIG_BYTES:
            settings = (
                f"{path}: {signature[1]:,} bytes, over the {MAX_CONFIG_BYTES:,} a model "
                "configuration may have"
            )
        elif signature is not None:
            try:
                settings = settings_from_pbtxt(
                    path,
                    self._defaults,
                    max_images_per_request=self._plane.limits.max_images_per_request,
                )
            except ModelError as exc:
                settings = str(exc)
        if isinstance(settings, str):
            self._plane.mark_unavailable(name, "", settings)
            self._count("refused", name)
            log.error("model refused (%s): %s", self._serving(), settings)
        else:
            self._plane.forget_unavailable(name, "")
        self._configs[name] = (signature, outside, settings)
        return signature, settings

    def _outside(self, path: Path) -> str:
        """Why `path` (in the repository) is refused: the first of its parts that resolves
        outside the repository (a symbolic link out of it); "" when every part stays in."""
        part = self._source
        for name in path.relative_to(self._source).parts:
            part = part / name
            if not os.path.islink(part):  # one lstat: a plain entry stays where its parent is
                continue
            real = Path(os.path.realpath(part))
            if not real.is_relative_to(self._real_root):
                return (
                    f"{part} resolves to {real}, outside the repository {self._source} "
                    "(symbolic links are followed only within it)"
                )
        return ""

    def _unreadable(self, path: Path) -> str:
        """Why the model file at `path` is refused before it is read; "" when it may be."""
        if self._is_directory and (outside := self._outside(path)):
            return outside
        size = (_signature(path) or _NO_FILE)[1]
        if size > self._limits.max_model_bytes:
            return (
                f"{path}: {size:,} bytes, over --max-model-bytes {self._limits.max_model_bytes:,}"
                " (raise it to serve this model)"
            )
        return ""

    def _was_refused(self, found: _Found) -> bool:
        return self._refused.get(found.path) == found.signature

    # Loading and unloading.

    async def _load(self, found: _Found) -> None:
        settings = found.settings or self._defaults
        options = self._options
        if self._honour_kind:
            options = replace(options, provider=settings.provider(options.provider))
        if reason := self._unreadable(found.path):
            self._refuse(found, reason)
            return
        try:
            model = await asyncio.to_thread(load_model, found.path, options)
            check_model(settings, model, found.path.parent.parent / CONFIG_FILE)
        except ModelError as exc:
            self._refuse(found, str(exc))
            return
        self._add(found, model)

    def _add(self, found: _Found, model: Model) -> None:
        settings = found.settings or self._defaults
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
        if previous is not None and previous[1].settings == settings:
            # The same file replaced: swapped in place, between two model runs.
            served = previous[1]
            old = served.model
            self._plane.swap(served, model, version)
            if replaced_version != version:
                self._forget(name, replaced_version)
            elif (old.provider, old.file_sha256) != (model.provider, model.file_sha256):
                metrics.forget_model_info(name, version, old.provider, old.file_sha256)
        else:  # new, or new settings: a new batcher; a replaced one finishes what it has
            served = ServedVersion(name, version, model, settings)
            self._plane.serve(served)
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
                    "max_batch_size": settings.max_batch_size,
                    "max_delay_us": settings.max_queue_delay_us,
                    "max_queue_size": settings.max_queue_size,
                    "config": settings.source,
                    **({"replaces": replaced_version} if previous else {}),
                }
            },
        )

    def _refuse(self, found: _Found, reason: str, name: str = "", version: str = "") -> None:
        name, version = name or found.name, version or found.version
        self._refused[found.path] = found.signature
        if self._is_directory:
            self._plane.mark_unavailable(name, version, reason)
        self._count("refused", name)
        log.error("model refused (%s): %s", self._serving(), reason)

    def _unload(self, path: Path, reason: str = "") -> asyncio.Task[None] | None:
        """Stop choosing the version at `path`; the task ends once it has answered every call
        it accepted. `reason`: listed as UNAVAILABLE with it (an explicit unload)."""
        _, served = self._loaded.pop(path)
        closing = self._plane.retire(served)
        if reason:
            self._plane.mark_unavailable(served.name, served.version, reason)
        self._count("unloaded", served.name)
        log.info("unloaded", extra={"fields": {"model": served.name, "version": served.version}})
        name, version = served.key
        if closing is None:
            self._forget(name, version)
        else:  # once its last calls are answered (and counted)
            closing.add_done_callback(lambda _: self._forget(name, version))
        return closing

    def _count(self, result: str, name: str) -> None:
        """A refusal or unload, under its model's name only while that model serves: names
        that never served must not make metric series (a repository can hold any number)."""
        serves = any(served.name == name for _, served in self._loaded.values())
        metrics.RELOADS.labels(result, name if serves else "", "").inc()

    def _forget(self, name: str, version: str) -> None:
        """Remove the metric series of a version that no longer serves (and of its model, if
        none of its versions does), unless it serves again already."""
        served = self._plane.served()
        if any(s.key == (name, version) for s in served):
            return
        metrics.forget_version(name, version)
        if not any(s.name == name for s in served):
            metrics.forget_model(name)

    def _serving(self) -> str:
        served = ", ".join(f"{s.name} {s.version}" for s in self._plane.served())
        return f"still serving {served or 'nothing'}"


def _within(path: Path, names: Collection[str] | None) -> bool:
    """Whether the version file at DIR/<name>/<version>/model.onnx is one of `names`' models."""
    return names is None or path.parent.parent.name in names


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
