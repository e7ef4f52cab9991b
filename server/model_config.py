"""Per-model configuration: Triton's `config.pbtxt` beside a model's version folders.

`DIR/<name>/config.pbtxt` (optional, Triton's text format, parsed into the same ModelConfig
message Triton uses) sets that model's batching, queue, version policy and instance kind; the
server's flags are the defaults for every field it leaves out and for models without one.

Three kinds of field:
- honoured: name, platform/backend (must be ONNX Runtime's), max_batch_size, input/output
  (checked against the ONNX file), dynamic_batching's max_queue_delay_microseconds and
  default_queue_policy.max_queue_size, version_policy, instance_group's kind;
- not supported but harmless to skip (optimization, model_warmup, parameters, ...): named in
  one warning line when the file is read, and shown nowhere as if they applied (`describe`
  returns what is served, not what the file said);
- contradictory or unservable (another platform, sequence batching, an input that is not
  the ONNX file's, a max_batch_size the queue can never fill): the model is refused with
  the reason, and the rest of the repository keeps serving.

`describe` is the served configuration in the same schema: what the ModelConfig RPC and
`GET /v2/models/{m}/config` answer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format
from google.protobuf.message import Message

from digit_recognizer.protos import model_config_pb2 as mc
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE, SCORE_NAME
from digit_recognizer.server.batcher import BatcherLimits
from digit_recognizer.server.errors import ModelError

if TYPE_CHECKING:
    from digit_recognizer.server.dataplane import ServedVersion
    from digit_recognizer.server.inference import Model

log = logging.getLogger(__name__)
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
IS_DIGIT = "is_digit"  # the detector's verdict (openinference.py): an output of ours, BOOL
KINDS = {  # instance_group kind -> our --provider
    mc.ModelInstanceGroup.KIND_AUTO: "auto",
    mc.ModelInstanceGroup.KIND_CPU: "cpu",
    mc.ModelInstanceGroup.KIND_GPU: "cuda",
}
_CUDA_PROVIDER = "CUDAExecutionProvider"

# Fields read from config.pbtxt; every other field set in a file is reported as unsupported
# (or refuses the model, see _REFUSED). Paths as Triton's docs spell them.
_HONOURED = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "version_policy",
    "input",
    "output",
    "dynamic_batching",
    "instance_group",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.preferred_batch_size",
    "default_model_filename",
    "dynamic_batching.default_queue_policy",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "instance_group.name",
    "instance_group.kind",
    "instance_group.count",
    "input.name",
    "input.data_type",
    "input.dims",
    "output.name",
    "output.data_type",
    "output.dims",
    "output.reshape",  # digit_score's [1] -> [] (checked in _check_tensors)
}
# Set in a file, these change what the model computes or how it is scheduled in a way this
# server cannot follow: serving the model anyway would pretend.
_REFUSED = {
    "sequence_batching": "sequence batching (stateful models) is not served",
    "ensemble_scheduling": "ensembles are not served",
    "batch_input": "batch_input is not served",
    "batch_output": "batch_output is not served",
    "input.reshape": "input reshape is not served: give dims [784]",
    "input.is_shape_tensor": "shape tensors are not served",
    "input.format": "input format is for image tensors [C, H, W]; the model takes flat [784]",
}


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served: the `count` highest, all, or the ones listed
    (TF Serving's names; Triton's latest { num_versions } is latest:N)."""

    kind: str = "latest"
    versions: tuple[int, ...] = ()
    count: int = 1  # for latest

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or `specific:1,3`; ValueError saying what is accepted."""
        kind, _, listed = text.strip().partition(":")
        if kind == "all" and not listed:
            return cls(kind)
        if kind == "latest":
            if not listed:
                return cls(kind)
            if listed.strip().isdigit() and int(listed) >= 1:
                return cls(kind, count=int(listed))
        if kind == "specific":
            try:
                versions = tuple(sorted({int(v) for v in listed.split(",") if v.strip()}))
            except ValueError:
                versions = ()
            if versions and min(versions) >= 1:
                return cls(kind, versions)
        raise ValueError(
            f"{text!r} is not a version policy: use latest, all, or specific:V[,V...] with "
            "positive integer versions (specific:1,3); latest:N serves the N highest"
        )

    def select(self, available: Collection[int]) -> set[int]:
        if self.kind == "latest":
            return set(sorted(available)[-self.count :]) if available else set()
        if self.kind == "all":
            return set(available)
        return set(available) & set(self.versions)

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in self.versions)
        if self.kind == "latest" and self.count != 1:
            return f"latest:{self.count}"
        return self.kind


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as config.pbtxt declares it (dims without the batch dimension)."""

    name: str
    data_type: int  # model_config_pb2.DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelSettings:
    """How one model is served: its batcher, version policy and instance kind."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    version_policy: VersionPolicy
    inline_max_us: int = 250
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_kind: str = "auto"  # auto | cpu | cuda: the --provider this model loads with
    instance_count: int = 1  # as configured; what runs is one instance per worker process
    inputs: tuple[TensorSpec, ...] = ()  # as declared; empty: the ONNX file's
    outputs: tuple[TensorSpec, ...] = ()
    unsupported: tuple[str, ...] = ()  # fields set in the file and not honoured
    source: str = "flags"  # or the config.pbtxt it came from

    @classmethod
    def from_flags(
        cls, limits: BatcherLimits, policy: VersionPolicy, provider: str = "auto"
    ) -> ModelSettings:
        """The defaults: the server's flags, for models without a config.pbtxt."""
        return cls(
            max_batch_size=limits.max_batch_size,
            max_queue_delay_us=limits.max_delay_us,
            max_queue_size=limits.max_queue_size,
            version_policy=policy,
            inline_max_us=limits.inline_max_us,
            instance_kind=provider,
        )

    @property
    def batcher_limits(self) -> BatcherLimits:
        return BatcherLimits(
            self.max_batch_size,
            self.max_queue_delay_us,
            self.max_queue_size,
            self.inline_max_us,
            tuple(sorted(set(self.preferred_batch_sizes))),
        )

    def provider(self, default: str) -> str:
        """The --provider this model loads with: its instance kind, or `default` for auto."""
        return default if self.instance_kind == "auto" else self.instance_kind


def settings_from_pbtxt(
    path: Path, defaults: ModelSettings, *, max_images_per_request: int = 1
) -> ModelSettings:
    """`path` (DIR/<name>/config.pbtxt) over `defaults`; ModelError with the reason when the
    file cannot be served as written. Unsupported fields: one warning line naming them all."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelError(f"{path}: not a Triton model configuration ({exc})") from None
    settings = _settings(path, config, defaults, max_images_per_request)
    if settings.unsupported:
        log.warning(
            "%s: not supported, ignored: %s",
            path,
            ", ".join(settings.unsupported),
            extra={"fields": {"model": path.parent.name, "ignored": list(settings.unsupported)}},
        )
    return settings


def _settings(
    path: Path, config: mc.ModelConfig, defaults: ModelSettings, max_images_per_request: int
) -> ModelSettings:
    def refuse(reason: str) -> ModelError:
        return ModelError(f"{path}: {reason}")

    model_name = path.parent.name
    if config.name and config.name != model_name:
        raise refuse(
            f"name {config.name!r} is not the model's folder name {model_name!r} "
            "(Triton requires them to match)"
        )
    if config.platform and config.platform != PLATFORM:
        raise refuse(f"platform {config.platform!r}: this server serves {PLATFORM!r} models only")
    if config.backend and config.backend != BACKEND:
        raise refuse(f"backend {config.backend!r}: this server serves {BACKEND!r} models only")
    if config.default_model_filename not in ("", MODEL_FILE):
        raise refuse(
            f"default_model_filename {config.default_model_filename!r}: this server loads "
            f"<version>/{MODEL_FILE}"
        )
    fields = _set_fields(config)
    for field, reason in _REFUSED.items():
        if field in fields:
            raise refuse(reason)
    unsupported = [f for f in fields if f not in _HONOURED and not _covered(f, fields)]

    settings = defaults
    if config.max_batch_size < 0:
        raise refuse(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size > 0:
        settings = replace(settings, max_batch_size=config.max_batch_size)
    else:  # Triton's "no batching": this server always batches along the first dimension
        unsupported.append(f"max_batch_size 0 (served with {defaults.max_batch_size})")
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        queue_size = batching.default_queue_policy.max_queue_size  # 0: Triton's unbounded
        settings = replace(
            settings,
            max_queue_delay_us=batching.max_queue_delay_microseconds,
            preferred_batch_sizes=tuple(batching.preferred_batch_size),
            max_queue_size=queue_size or defaults.max_queue_size,
        )
    if settings.max_queue_size < settings.max_batch_size:
        raise refuse(
            f"max_batch_size {settings.max_batch_size} is above the queue's "
            f"{settings.max_queue_size} images (dynamic_batching.default_queue_policy."
            "max_queue_size, or --max-queue-size): such a batch could never form"
        )
    if settings.max_queue_size < max_images_per_request:
        raise refuse(
            f"max_queue_size {settings.max_queue_size} is below the server's "
            f"--max-images-per-request {max_images_per_request}: such requests could never "
            "be queued"
        )
    for size in settings.preferred_batch_sizes:
        if not 1 <= size <= settings.max_batch_size:
            raise refuse(
                f"preferred_batch_size {size} is not in 1..max_batch_size "
                f"({settings.max_batch_size})"
            )

    policy = _version_policy(path, config)
    if policy is not None:
        settings = replace(settings, version_policy=policy)
    settings = _instances(path, config, settings, unsupported)
    # Without batching (max_batch_size 0) Triton's dims include the batch dimension: it must
    # be variable (-1), and is dropped so that every check below sees per-image dims.
    batched = config.max_batch_size > 0
    inputs = [_spec(path, t, batched) for t in config.input]
    outputs = [_spec(path, t, batched) for t in config.output]
    if len(inputs) > 1:
        raise refuse(f"{len(inputs)} inputs declared; the model takes one, [{PIXELS_PER_IMAGE}]")
    for tensor in inputs:
        if tensor.data_type != mc.TYPE_FP32:
            raise refuse(
                f"input {tensor.name!r} is {_type_name(tensor.data_type)}; the ONNX model "
                "takes TYPE_FP32 (UINT8 pixels are still accepted on the wire)"
            )
        if tensor.dims not in ((PIXELS_PER_IMAGE,), (-1,)):
            raise refuse(
                f"input {tensor.name!r} dims {list(tensor.dims)}: the model takes "
                f"[{PIXELS_PER_IMAGE}] per image"
            )
    return replace(
        settings,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        unsupported=tuple(dict.fromkeys(unsupported)),
        source=str(path),
    )


def _instances(
    path: Path, config: mc.ModelConfig, settings: ModelSettings, unsupported: list[str]
) -> ModelSettings:
    groups = list(config.instance_group)
    if not groups:
        return settings
    kinds = {KINDS.get(group.kind, "model") for group in groups}
    if "model" in kinds:
        unsupported.append("instance_group.kind KIND_MODEL (served as KIND_AUTO)")
        kinds = (kinds - {"model"}) or {"auto"}
    if len(kinds) > 1:
        raise ModelError(
            f"{path}: instance_group mixes kinds "
            + ", ".join(sorted(kinds))
            + "; this server runs a model on one kind"
        )
    count = sum(group.count or 1 for group in groups)
    if count != 1:
        unsupported.append(
            f"instance_group.count {count} (one instance per worker process: --workers)"
        )
    return replace(settings, instance_kind=kinds.pop(), instance_count=count)


def _version_policy(path: Path, config: mc.ModelConfig) -> VersionPolicy | None:
    if not config.HasField("version_policy"):
        return None
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        versions = tuple(sorted({int(v) for v in policy.specific.versions}))
        if not versions or min(versions) < 1:
            raise ModelError(
                f"{path}: version_policy specific needs versions >= 1, got {list(versions)}"
            )
        return VersionPolicy("specific", versions)
    return VersionPolicy("latest", count=max(1, policy.latest.num_versions))


def check_model(settings: ModelSettings, model: Model, where: Path) -> None:
    """ModelError unless the inputs and outputs the config declares are the ONNX file's."""
    for tensor in settings.inputs:
        if tensor.name != model.input_name:
            raise ModelError(
                f"{where}: input {tensor.name!r} is not the ONNX model's input "
                f"{model.input_name!r} (name the input {model.input_name!r} in config.pbtxt, "
                "or leave input out)"
            )
    known = _output_specs(model)
    for tensor in settings.outputs:
        expected = known.get(tensor.name)
        if expected is None:
            raise ModelError(
                f"{where}: output {tensor.name!r} is not one of the ONNX model's outputs "
                + ", ".join(repr(name) for name in known)
            )
        data_type, dims = expected
        if tensor.data_type != data_type or not _same_dims(tensor, dims):
            raise ModelError(
                f"{where}: output {tensor.name!r} is {_type_name(tensor.data_type)} "
                f"{list(tensor.dims)}; the model gives {_type_name(data_type)} {list(dims)}"
            )


def describe(
    served: ServedVersion,
    settings: ModelSettings | None = None,
    workers: int = 1,
    provider: str | None = None,
) -> mc.ModelConfig:
    """The configuration `served` runs with, in Triton's ModelConfig schema: what is served
    (the batcher's real limits, the provider actually in use), never what a file asked for
    and was not honoured."""
    settings = settings or served.settings
    model = served.model
    provider = provider or model.provider
    config = mc.ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=settings.max_batch_size,
        input=[
            mc.ModelInput(name=model.input_name, data_type=mc.TYPE_FP32, dims=[PIXELS_PER_IMAGE])
        ],
        output=[
            mc.ModelOutput(name=name, data_type=data_type, dims=list(dims) or [1])
            for name, (data_type, dims) in _output_specs(model).items()
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=settings.max_queue_delay_us,
            preferred_batch_size=list(settings.preferred_batch_sizes),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=settings.max_queue_size),
        ),
        version_policy=_policy_message(settings.version_policy),
        instance_group=[
            mc.ModelInstanceGroup(
                name=served.name,
                kind=(
                    mc.ModelInstanceGroup.KIND_GPU
                    if provider in (_CUDA_PROVIDER, "cuda")
                    else mc.ModelInstanceGroup.KIND_CPU
                ),
                count=workers,
            )
        ],
        default_model_filename=MODEL_FILE,
    )
    for output in config.output:
        if _output_specs(model)[output.name][1] == ():  # one value per image: [1] -> []
            output.reshape.SetInParent()
    return config


def _output_specs(model: Model) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (data type, dims without the batch dimension)} of what the model answers."""
    specs: dict[str, tuple[int, tuple[int, ...]]] = {
        model.output_name: (mc.TYPE_FP32, (len(model.card.labels),))
    }
    if model.score_name is not None:
        specs[SCORE_NAME] = (mc.TYPE_FP32, ())
        if model.card.digit_threshold is not None:
            specs[IS_DIGIT] = (mc.TYPE_BOOL, ())
    return specs


def _policy_message(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    if policy.kind == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.kind == "specific":
        return mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=list(policy.versions))
        )
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=policy.count))


def _spec(path: Path, tensor: mc.ModelInput | mc.ModelOutput, batched: bool) -> TensorSpec:
    dims = tuple(tensor.dims)
    reshape = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
    if not batched:
        if not dims or dims[0] != -1:
            raise ModelError(
                f"{path}: {tensor.name!r} dims {list(dims)}: with max_batch_size 0 the first "
                "dimension is the batch and must be -1 (or set max_batch_size and leave it out)"
            )
        dims = dims[1:]
        reshape = reshape[1:] if reshape else reshape
    return TensorSpec(tensor.name, tensor.data_type, dims, reshape)


def _same_dims(tensor: TensorSpec, dims: tuple[int, ...]) -> bool:
    """Declared dims (per image) fit the model's: equal up to -1 (variable); one value per
    image is Triton's [1] (with reshape { shape: [] }) or [] without batching."""
    declared = tensor.dims
    if dims == ():
        return declared in ((), (1,), (-1,))
    return len(declared) == len(dims) and all(
        d in (-1, e) for d, e in zip(declared, dims, strict=True)
    )


def _type_name(data_type: int) -> str:
    return mc.DataType.Name(data_type) if data_type in mc.DataType.values() else str(data_type)


def _set_fields(message: Message, prefix: str = "") -> list[str]:
    """Dotted paths of every field set in `message` (repeated messages: each element's)."""
    paths: list[str] = []
    for field, value in message.ListFields():
        path = prefix + field.name
        paths.append(path)
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = [value] if isinstance(value, Message) else list(value)  # repeated
        for item in items:
            paths += [p for p in _set_fields(item, path + ".") if p not in paths]
    return list(dict.fromkeys(paths))


def _covered(field: str, fields: list[str]) -> bool:
    """A field inside one already reported (optimization.cuda inside optimization) is not
    named again."""
    parent = field.rpartition(".")[0]
    while parent:
        if parent not in _HONOURED and parent in fields:
            return True
        parent = parent.rpartition(".")[0]
    return False
