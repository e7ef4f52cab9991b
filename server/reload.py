"""Hot reload: watch the model file and switch to a new version without dropping a request.

Replace the file atomically (`os.replace`, as `digit-train` writes it) and within one poll
interval the new model is loaded, validated and warmed up off the event loop, then swapped in
between two model runs. A file that fails any check (corrupt, wrong shapes, other labels) is
refused with one log line and the current model keeps serving; the same file is not retried
until it changes again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from digit_recognizer.server import metrics
from digit_recognizer.server.batcher import Batcher
from digit_recognizer.server.errors import ModelError
from digit_recognizer.server.inference import InferenceOptions, load_model
from digit_recognizer.server.service import DigitClassifierService

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ModelReloader:
    def __init__(
        self,
        path: Path,
        options: InferenceOptions,
        batcher: Batcher,
        service: DigitClassifierService,
        interval_s: float,
    ) -> None:
        self._path = path
        self._options = options
        self._batcher = batcher
        self._service = service
        self._interval_s = interval_s
        self._seen = _signature(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="model-reloader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            signature = _signature(self._path)
            if signature is None or signature == self._seen:
                continue
            self._seen = signature
            await self.reload()

    async def reload(self) -> bool:
        current = self._service.model
        try:
            model = await asyncio.to_thread(load_model, self._path, self._options)
            if model.card.labels != current.card.labels:
                raise ModelError(
                    f"{self._path}: labels {list(model.card.labels)} differ from the served "
                    f"{list(current.card.labels)}; restart the server to change them"
                )
        except ModelError as exc:
            metrics.RELOADS.labels("refused").inc()
            log.error("reload refused; still serving version %s: %s", current.card.version, exc)
            return False
        self._batcher.swap(model.predict, model.card.version)
        self._service.use_model(model)
        metrics.RELOADS.labels("ok").inc()
        metrics.MODEL_INFO.labels(
            current.card.name, current.card.version, current.provider, current.file_sha256
        ).set(0)
        metrics.MODEL_INFO.labels(
            model.card.name, model.card.version, model.provider, model.file_sha256
        ).set(1)
        log.info(
            "reloaded",
            extra={
                "fields": {
                    "version": model.card.version,
                    "previous": current.card.version,
                    "sha256": model.file_sha256,
                }
            },
        )
        return True
