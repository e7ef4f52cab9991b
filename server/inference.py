"""The onnxruntime session: provider choice, model validation, warm-up, the model card."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from digit_recognizer.protos.contract import (
    PIXELS_PER_IMAGE,
    SCORE_NAME,
    CardError,
    ModelCard,
)
from digit_recognizer.server.errors import ModelError, first_line

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": CUDA}
SMALL_RUN_IMAGES = 8  # runs this small take the one-thread session (see Model.small_session)


@dataclass(frozen=True)
class InferenceOptions:
    provider: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    # Spinning threads shave microseconds off each run but burn the cores the gRPC layer
    # needs: measured on 2 cores, off gave +25% requests/s for single images, -9% images/s
    # for 256-image requests; with short runs on the loop thread, spinning showed no bulk gain
    # beyond noise and -8% at 64 single-image callers (docs/performance.md).
    spin_wait: bool = False
    # onnxruntime's CUDA provider multiplies in TF32 by default: measured on an H100,
    # max |p_cuda - p_cpu| 6.6e-4 with it, 1.1e-6 without, while exports are verified to 1e-5.
    allow_tf32: bool = False


@dataclass(frozen=True)
class Model:
    """A loaded, validated and warmed-up model. `predict` is thread-safe (onnxruntime)."""

    session: ort.InferenceSession
    card: ModelCard
    path: Path
    file_sha256: str
    provider: str
    input_name: str
    output_name: str
    # CPU, several intra-op threads: a one-thread session of the same model for small runs,
    # where waking the other threads costs CPU and saves no time (notebook MLP, 2 cores:
    # batch 1 30 us of CPU on one thread, 59 us on two, same wall time; from 16 images up
    # the threads win).
    small_session: ort.InferenceSession | None = None
    score_name: str | None = None  # the not-a-digit detector's output, when the model has one

    @property
    def num_classes(self) -> int:
        return len(self.card.labels)

    @property
    def columns(self) -> int:
        """Columns of `predict`'s rows: the class probabilities, then the digit score."""
        return self.num_classes + (self.score_name is not None)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 784) -> (N, columns): one row per image, so the batcher can split runs by row."""
        session = self.session
        if self.small_session is not None and len(pixels) <= SMALL_RUN_IMAGES:
            session = self.small_session
        if self.score_name is None:
            (probabilities,) = session.run([self.output_name], {self.input_name: pixels})
            return probabilities
        probabilities, scores = session.run(
            [self.output_name, self.score_name], {self.input_name: pixels}
        )
        return np.concatenate([probabilities, scores.reshape(-1, 1)], axis=1)


def load_model(path: Path, options: InferenceOptions) -> Model:
    """Load and check a model, or raise ModelError with one line saying what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model ({exc.strerror or exc})") from None
    if not data:
        raise ModelError(f"{path}: model file is empty")
    for provider in _provider_candidates(options.provider):
        try:
            model = _open(path, data, provider, options)
        except ModelError:
            raise
        except Exception as exc:
            if options.provider == "auto" and provider == CUDA:
                log.warning("CUDA provider failed (%s); using the CPU", first_line(exc))
                continue
            raise ModelError(f"{path}: cannot load with {provider} ({first_line(exc)})") from None
        return model
    raise AssertionError("the CPU provider is always a candidate")  # pragma: no cover


def provider_options(provider: str, options: InferenceOptions) -> dict[str, str]:
    """Settings for the execution provider; CUDA computes in full float32 unless allowed."""
    if provider == CUDA:
        return {"use_tf32": "1" if options.allow_tf32 else "0"}
    return {}


def _provider_candidates(choice: str) -> list[str]:
    available = ort.get_available_providers()
    if choice == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if choice not in PROVIDERS:
        raise ModelError(f"unknown provider {choice!r}; choose auto, cpu or cuda")
    wanted = PROVIDERS[choice]
    if wanted not in available:
        raise ModelError(
            f"provider {choice!r} requested but onnxruntime offers only {', '.join(available)}"
            + (
                "; install the [gpu] extra (onnxruntime-gpu) and a CUDA driver"
                if choice == "cuda"
                else ""
            )
        )
    return [wanted]


def _session(
    data: bytes, provider: str, options: InferenceOptions, threads: int
) -> ort.InferenceSession:
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if options.spin_wait else "0"
    )
    settings.log_severity_level = 3  # errors only: ort's warnings are not actionable here
    return ort.InferenceSession(
        data, settings, providers=[(provider, provider_options(provider, options))]
    )


def _open(path: Path, data: bytes, provider: str, options: InferenceOptions) -> Model:
    try:
        session = _session(data, provider, options, options.intra_op_threads)
    except Exception as exc:
        if provider == CUDA:
            raise
        raise ModelError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
    if session.get_providers()[0] != provider:
        # onnxruntime silently falls back to the CPU when CUDA cannot start: never serve that
        # under a `cuda` label.
        raise RuntimeError(f"onnxruntime started {session.get_providers()[0]} instead")
    try:
        card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    except CardError as exc:
        raise ModelError(f"{path}: {exc} (was it exported by digit-train?)") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (
        len(inputs) != 1
        or inputs[0].type != "tensor(float)"
        or len(inputs[0].shape) != 2
        or (inputs[0].shape[1] != PIXELS_PER_IMAGE)
    ):
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelError(
            f"{path}: expected one float input [batch, {PIXELS_PER_IMAGE}], found {found}"
        )
    scores = [o for o in outputs if o.name == SCORE_NAME and len(o.shape) == 1]
    classes = [o for o in outputs if o not in scores]
    if (
        len(classes) != 1
        or len(scores) > 1
        or len(classes[0].shape) != 2
        or (classes[0].shape[1] != len(card.labels))
    ):
        found = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs)
        raise ModelError(
            f"{path}: expected one output [batch, {len(card.labels)}] (one column per label), "
            f"and optionally {SCORE_NAME} [batch]; found {found}"
        )
    model = Model(
        session=session,
        card=card,
        path=path,
        file_sha256=hashlib.sha256(data).hexdigest(),
        provider=provider,
        input_name=inputs[0].name,
        output_name=classes[0].name,
        score_name=SCORE_NAME if scores else None,
        small_session=(
            _session(data, provider, options, 1)
            if provider == CPU and options.intra_op_threads != 1
            else None
        ),
    )
    _warm_up(model)
    return model


def _warm_up(model: Model) -> None:
    """One real inference before anyone is told the server is SERVING."""
    try:
        model.predict(np.zeros((SMALL_RUN_IMAGES + 1, PIXELS_PER_IMAGE), np.float32))
        probabilities = model.predict(np.zeros((2, PIXELS_PER_IMAGE), np.float32))
    except Exception as exc:
        raise ModelError(f"{model.path}: warm-up inference failed ({first_line(exc)})") from None
    if probabilities.shape != (2, model.columns) or not np.isfinite(probabilities).all():
        raise ModelError(
            f"{model.path}: warm-up inference returned {probabilities.shape} "
            f"(expected (2, {model.columns}) finite values)"
        )
