from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Artifact(_message.Message):
    __slots__ = ("name", "format", "uri", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    uri: str
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Tokenizer(_message.Message):
    __slots__ = ("uri", "class_name", "vocab_size", "eos_token", "pad_token", "chat_template", "padding_side")
    URI_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PADDING_SIDE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    class_name: str
    vocab_size: int
    eos_token: str
    pad_token: str
    chat_template: str
    padding_side: str
    def __init__(self, uri: _Optional[str] = ..., class_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token: _Optional[str] = ..., pad_token: _Optional[str] = ..., chat_template: _Optional[str] = ..., padding_side: _Optional[str] = ...) -> None: ...

class Quantization(_message.Message):
    __slots__ = ("method", "bits", "type")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    method: str
    bits: int
    type: str
    def __init__(self, method: _Optional[str] = ..., bits: _Optional[int] = ..., type: _Optional[str] = ...) -> None: ...

class GenerationDefaults(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "eos_token_id", "pad_token_id")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ...) -> None: ...

class ResourceHints(_message.Message):
    __slots__ = ("gpus", "gpu_resource_name", "dtype", "parameter_count", "weights_bytes")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_RESOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    gpu_resource_name: str
    dtype: str
    parameter_count: int
    weights_bytes: int
    def __init__(self, gpus: _Optional[int] = ..., gpu_resource_name: _Optional[str] = ..., dtype: _Optional[str] = ..., parameter_count: _Optional[int] = ..., weights_bytes: _Optional[int] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_microseconds")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MICROSECONDS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_delay_microseconds: int
    def __init__(self, max_batch_size: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_delay_microseconds: _Optional[int] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("base_model", "base_model_revision", "dataset_fingerprint", "config_hash", "job", "namespace", "run", "method", "objective")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    base_model_revision: str
    dataset_fingerprint: str
    config_hash: str
    job: str
    namespace: str
    run: int
    method: str
    objective: str
    def __init__(self, base_model: _Optional[str] = ..., base_model_revision: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., config_hash: _Optional[str] = ..., job: _Optional[str] = ..., namespace: _Optional[str] = ..., run: _Optional[int] = ..., method: _Optional[str] = ..., objective: _Optional[str] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("model_name", "model_version", "runtime", "primary_format", "artifacts", "tokenizer", "max_sequence_length", "quantization", "generation", "resources", "lineage", "base_metrics", "tuned_metrics", "batching", "created_at")
    class BaseMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TunedMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    BASE_METRICS_FIELD_NUMBER: _ClassVar[int]
    TUNED_METRICS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    runtime: str
    primary_format: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    tokenizer: Tokenizer
    max_sequence_length: int
    quantization: Quantization
    generation: GenerationDefaults
    resources: ResourceHints
    lineage: Lineage
    base_metrics: _containers.ScalarMap[str, float]
    tuned_metrics: _containers.ScalarMap[str, float]
    batching: Batching
    created_at: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., runtime: _Optional[str] = ..., primary_format: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., tokenizer: _Optional[_Union[Tokenizer, _Mapping]] = ..., max_sequence_length: _Optional[int] = ..., quantization: _Optional[_Union[Quantization, _Mapping]] = ..., generation: _Optional[_Union[GenerationDefaults, _Mapping]] = ..., resources: _Optional[_Union[ResourceHints, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., base_metrics: _Optional[_Mapping[str, float]] = ..., tuned_metrics: _Optional[_Mapping[str, float]] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., created_at: _Optional[str] = ...) -> None: ...
