from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("version", "replica_id", "config_digest", "incarnation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    replica_id: str
    config_digest: str
    incarnation: int
    def __init__(self, version: _Optional[int] = ..., replica_id: _Optional[str] = ..., config_digest: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class BlockRecord(_message.Message):
    __slots__ = ("endpoint", "hashes", "capacity", "age_us")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    AGE_US_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    capacity: int
    age_us: int
    def __init__(self, endpoint: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ..., capacity: _Optional[int] = ..., age_us: _Optional[int] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("endpoint", "requests", "tokens", "prefill_tokens", "output_tokens")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    requests: int
    tokens: int
    prefill_tokens: int
    output_tokens: int
    def __init__(self, endpoint: _Optional[str] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("kind", "endpoint", "prefill_tokens", "batch", "seconds")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TTFT: _ClassVar[Observation.Kind]
        TPOT: _ClassVar[Observation.Kind]
    TTFT: Observation.Kind
    TPOT: Observation.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: Observation.Kind
    endpoint: str
    prefill_tokens: int
    batch: int
    seconds: float
    def __init__(self, kind: _Optional[_Union[Observation.Kind, str]] = ..., endpoint: _Optional[str] = ..., prefill_tokens: _Optional[int] = ..., batch: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("hello", "blocks", "load", "load_snapshot", "dropped", "journal_next", "observations", "observation_seq")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_NEXT_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SEQ_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    blocks: _containers.RepeatedCompositeFieldContainer[BlockRecord]
    load: _containers.RepeatedCompositeFieldContainer[EndpointLoad]
    load_snapshot: bool
    dropped: int
    journal_next: int
    observations: _containers.RepeatedCompositeFieldContainer[Observation]
    observation_seq: int
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[BlockRecord, _Mapping]]] = ..., load: _Optional[_Iterable[_Union[EndpointLoad, _Mapping]]] = ..., load_snapshot: bool = ..., dropped: _Optional[int] = ..., journal_next: _Optional[int] = ..., observations: _Optional[_Iterable[_Union[Observation, _Mapping]]] = ..., observation_seq: _Optional[int] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: int
    def __init__(self, updates: _Optional[int] = ...) -> None: ...
