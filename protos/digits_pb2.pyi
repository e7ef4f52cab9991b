from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "pixels", "pixels_f32le", "pixels_u8", "top_k", "model", "model_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_F32LE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_U8_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pixels: _containers.RepeatedScalarFieldContainer[float]
    pixels_f32le: bytes
    pixels_u8: bytes
    top_k: int
    model: str
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., pixels: _Optional[_Iterable[float]] = ..., pixels_f32le: _Optional[bytes] = ..., pixels_u8: _Optional[bytes] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("digit", "label", "probability")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    digit: int
    label: str
    probability: float
    def __init__(self, digit: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("digit", "label", "confidence", "probabilities", "top", "is_digit", "digit_score")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    IS_DIGIT_FIELD_NUMBER: _ClassVar[int]
    DIGIT_SCORE_FIELD_NUMBER: _ClassVar[int]
    digit: int
    label: str
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[Candidate]
    is_digit: bool
    digit_score: float
    def __init__(self, digit: _Optional[int] = ..., label: _Optional[str] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., is_digit: bool = ..., digit_score: _Optional[float] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("batch_size", "batches", "queue_us", "compute_us", "worker", "workers")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    batches: int
    queue_us: int
    compute_us: int
    worker: int
    workers: int
    def __init__(self, batch_size: _Optional[int] = ..., batches: _Optional[int] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., worker: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "predictions", "model_version", "telemetry")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    telemetry: Telemetry
    def __init__(self, request_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ClassifyResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("model", "version", "state", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("default_model", "models")
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    default_model: str
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    def __init__(self, default_model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ...) -> None: ...

class InputContract(_message.Message):
    __slots__ = ("name", "shape", "dtype", "layout", "min_value", "max_value", "background")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    layout: str
    min_value: float
    max_value: float
    background: float
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., background: _Optional[float] = ...) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_size", "max_delay_us", "max_queue_size", "max_images_per_request", "max_message_bytes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_delay_us: int
    max_queue_size: int
    max_images_per_request: int
    max_message_bytes: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "weights_sha256", "file_sha256", "test_accuracy", "test_loss", "labels", "dataset", "created_at", "input", "execution_provider", "batching", "training_config_json", "model", "model_version", "library_versions", "detector_json", "worker", "workers")
    class LibraryVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    weights_sha256: str
    file_sha256: str
    test_accuracy: float
    test_loss: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    dataset: str
    created_at: str
    input: InputContract
    execution_provider: str
    batching: BatchingLimits
    training_config_json: str
    model: str
    model_version: str
    library_versions: _containers.ScalarMap[str, str]
    detector_json: str
    worker: int
    workers: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., file_sha256: _Optional[str] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ..., dataset: _Optional[str] = ..., created_at: _Optional[str] = ..., input: _Optional[_Union[InputContract, _Mapping]] = ..., execution_provider: _Optional[str] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., training_config_json: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., library_versions: _Optional[_Mapping[str, str]] = ..., detector_json: _Optional[str] = ..., worker: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...
