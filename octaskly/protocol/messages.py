"""The P2P messages between dispatcher and workers, validated on receipt.

Handshake: the dispatcher sends `challenge`; the worker answers `hello` with a proof that
it knows the cluster key; the dispatcher answers `welcome` with its own proof (or `reject`
and closes, or `redirect` when it is not the primary). After that, the worker sends
`heartbeat`, `output` and `result`; the dispatcher sends `assign`, `cancel`, `result_ack`
and `state` (its term, once a second: the worker's sign of life from the primary).

High availability: a worker also keeps a `witness` session (hello with purpose "witness")
with each other dispatcher it knows, reporting whether it still reaches the primary; a
standby promotes itself only if most witnesses lost the primary too. Every welcome,
redirect and state carries the sender's term: a worker never works for a lower term than
one it has seen. A standby dispatcher opens a replication session with `replica_hello`;
the primary answers `replica_welcome`, then sends `snapshot` chunks (when the standby
cannot continue from its position), `changes` and `replica_state`; the standby answers
`replica_ack` with the last transaction it has on disk.

Every run of a task carries its attempt number, a lease: a message about an attempt the
dispatcher already gave up on is answered with `cancel` and otherwise ignored.

Task output travels as the bytes the task wrote, base64 in the JSON frame (`output.data`,
`result.stdout`, `result.stderr`; protocol 5): never decoded, so nothing is lost on the way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pydantic

from octaskly import errors
from octaskly.domain import models

# 2: proofs bound to the TLS certificate; 3: assignments carry all limits; 4: HA (terms,
# redirects, witnesses, replication); 5: task output as bytes (base64), not text. Peers of
# another version are refused at the handshake ("unsupported protocol version N").
PROTOCOL_VERSION = 5
_ID = pydantic.Field(min_length=1, max_length=200)
_HEX = pydantic.Field(min_length=32, max_length=128, pattern=r"^[0-9a-f]+$")
# Integers a peer sends end up in SQLite, whose INTEGER is 64-bit: a bigger one would fail
# there (after the frame was taken), so it is refused as a protocol error on receipt.
_INT64 = 2**63 - 1
MAX_OUTPUT_CHUNK = 4 * 1024 * 1024
"""The most bytes one `output` message carries."""


def _from_base64(limit: int | None) -> Callable[[Any], bytes]:
    """A validator: base64 text from a frame (standard alphabet, padded, no newlines) to
    bytes, of at most `limit` bytes."""

    def decode(value: Any) -> bytes:
        if isinstance(value, bytes):  # built here, not received
            return value
        if not isinstance(value, str):
            raise ValueError("expected base64 text")
        if limit is not None and len(value) > (limit + 2) // 3 * 4:
            raise ValueError(f"more than {limit} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None

    return decode


def _to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_AS_BASE64 = pydantic.PlainSerializer(_to_base64, return_type=str, when_used="json")
OutputChunk = Annotated[
    bytes,
    pydantic.PlainValidator(_from_base64(MAX_OUTPUT_CHUNK), json_schema_input_type=str),
    _AS_BASE64,
]
"""Bytes in Python, base64 text in a frame."""
OutputTail = Annotated[
    bytes, pydantic.PlainValidator(_from_base64(None), json_schema_input_type=str), _AS_BASE64
]


class _Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class RunRef(_Message):
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1, le=_INT64)


class Challenge(_Message):
    type: Literal["challenge"] = "challenge"
    protocol: int
    nonce: Annotated[str, _HEX]


_NAME = pydantic.Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:\-]+$")
_ADDR = pydantic.Field(min_length=3, max_length=300, pattern=r"^[^\s,]+:[0-9]{1,5}$")
_TERM = pydantic.Field(default=0, ge=0, le=2**62)
_REASON = pydantic.Field(max_length=1000)


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol: int
    name: str = _NAME
    instance: Annotated[str, _HEX]
    nonce: Annotated[str, _HEX]
    proof: Annotated[str, _HEX]
    version: str = pydantic.Field(max_length=64)
    resources: models.Resources
    max_jobs: int = pydantic.Field(ge=1, le=10000)
    sandbox_level: models.SandboxLevel
    sandbox_unavailable: dict[models.SandboxLevel, Annotated[str, _REASON]] | None = None
    """The levels at or above `sandbox_level` this worker cannot provide, each with the
    reason (probed when it started); every other level from `sandbox_level` up it can.
    Not sent (None): the dispatcher assumes it provides `sandbox_level` and nothing above."""
    running: list[RunRef] = pydantic.Field(default_factory=list, max_length=10000)
    finished: list[RunRef] = pydantic.Field(default_factory=list, max_length=100000)
    purpose: Literal["work", "witness"] = "work"
    term: int = _TERM
    """The highest term this worker has seen (0: none yet)."""
    primary: Annotated[str, _ADDR] | None = None
    """Where the primary of that term was reached."""


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    worker_id: str
    proof: Annotated[str, _HEX]
    keepalive_interval: float
    abort: list[RunRef] = pydantic.Field(default_factory=list)
    term: int = _TERM
    role: Literal["primary", "standby"] = "primary"
    dispatchers: list[Annotated[str, _ADDR]] = pydantic.Field(default_factory=list, max_length=16)
    """Other dispatchers of this cluster (P2P HOST:PORT), for failover and witnessing."""


class Redirect(_Message):
    """Not the primary: go to `primary` (when known). Sent instead of a welcome."""

    type: Literal["redirect"] = "redirect"
    term: int = _TERM
    primary: Annotated[str, _ADDR] | None = None
    reason: str = pydantic.Field(max_length=1000)


class State(_Message):
    """The dispatcher's role and term (to workers, once a second, and to witnesses when
    they change)."""

    type: Literal["state"] = "state"
    term: int = _TERM
    role: Literal["primary", "standby"]
    lsn: int = pydantic.Field(default=0, ge=0)
    standby_synced: bool | None = None
    """Whether a standby holds every acknowledged write (None: no standby configured)."""
    dispatchers: list[Annotated[str, _ADDR]] = pydantic.Field(default_factory=list, max_length=16)
    seq: int = pydantic.Field(default=0, ge=0, le=_INT64)
    """The number of this State (a worker confirms each with a StateAck; 0: none asked)."""
    population: int = pydantic.Field(default=0, ge=0, le=1_000_000)
    """How many workers this primary counts as its witnesses (see domain.fencing)."""


class Witness(_Message):
    """A worker's view of the primary, sent to the other dispatchers it knows."""

    type: Literal["witness"] = "witness"
    term: int = _TERM
    primary: Annotated[str, _ADDR] | None = None
    reachable: bool
    silent_for: float = pydantic.Field(ge=0, le=1e9)
    """Seconds since the worker last heard from the primary."""
    primary_lsn: int = pydantic.Field(default=0, ge=0, le=_INT64)
    standby_synced: bool | None = None
    population: int = pydantic.Field(default=0, ge=0, le=1_000_000)
    """How many witnesses the primary counted in the last State this worker had from it."""


class Reject(_Message):
    type: Literal["reject"] = "reject"
    reason: str = pydantic.Field(max_length=1000)


class StateAck(_Message):
    """A worker received the primary's State `seq` (the primary's proof it is heard)."""

    type: Literal["state_ack"] = "state_ack"
    seq: int = pydantic.Field(ge=1, le=_INT64)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    running: list[RunRef] = pydantic.Field(default_factory=list, max_length=10000)


class Drain(_Message):
    """The worker is stopping: assign it nothing more (its running tasks may finish)."""

    type: Literal["drain"] = "drain"


class Release(_Message):
    """The worker hands these runs back unfinished (its drain time ran out): re-queue them
    without counting them as lost."""

    type: Literal["release"] = "release"
    runs: list[RunRef] = pydantic.Field(max_length=10000)


class Output(_Message):
    type: Literal["output"] = "output"
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1, le=_INT64)
    stream: Literal["stdout", "stderr"]
    data: OutputChunk


class Result(_Message):
    type: Literal["result"] = "result"
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1, le=_INT64)
    status: Literal["completed", "failed", "timed_out", "cancelled"]
    exit_code: int | None = pydantic.Field(default=None, ge=-_INT64 - 1, le=_INT64)
    duration_ms: int = pydantic.Field(ge=0, le=_INT64)
    stdout: OutputTail = b""
    stderr: OutputTail = b""
    stdout_dropped: int = pydantic.Field(default=0, ge=0, le=_INT64)
    stderr_dropped: int = pydantic.Field(default=0, ge=0, le=_INT64)
    error: str | None = pydantic.Field(default=None, max_length=4000)


class TaskAssignment(_Message):
    task_id: str
    attempt: int
    command: str
    env: dict[str, str]
    timeout: int
    sandbox_level: models.SandboxLevel | None = None
    memory_limit_mb: int | None = None
    cpu_seconds: int | None = None
    disk_limit_mb: int | None = None
    open_files_limit: int | None = None
    process_limit: int | None = None
    limits_preset: models.LimitsPreset | None = None
    request_id: str | None = None


class Assign(_Message):
    type: Literal["assign"] = "assign"
    task: TaskAssignment


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    task_id: str
    attempt: int


class ResultAck(_Message):
    type: Literal["result_ack"] = "result_ack"
    task_id: str
    attempt: int


class PositionModel(_Message):
    db_id: str = pydantic.Field(max_length=64)
    term: int = pydantic.Field(ge=0, le=2**62)
    lsn: int = pydantic.Field(ge=0, le=2**62)


class ReplicaHello(_Message):
    """A standby (or a restarted dispatcher checking its peer) asks to replicate."""

    type: Literal["replica_hello"] = "replica_hello"
    protocol: int
    name: str = _NAME
    nonce: Annotated[str, _HEX]
    proof: Annotated[str, _HEX]
    version: str = pydantic.Field(max_length=64)
    position: PositionModel
    port: int = pydantic.Field(ge=0, le=65535)
    """The P2P port the standby listens on; 0: not listening (a probe)."""
    host: str | None = pydantic.Field(
        default=None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-]+$"
    )
    """Its address when it listens on one (else the connection's source address is used)."""


class ReplicaWelcome(_Message):
    type: Literal["replica_welcome"] = "replica_welcome"
    proof: Annotated[str, _HEX]
    term: int = pydantic.Field(ge=1)
    history: list[tuple[int, int]] = pydantic.Field(max_length=100000)
    mode: Literal["stream", "snapshot"]
    sync: bool
    advertise: Annotated[str, _ADDR] | None = None
    """How the standby is reached (for the other side's records)."""


class Snapshot(_Message):
    type: Literal["snapshot"] = "snapshot"
    data: str = pydantic.Field(max_length=8 * 1024 * 1024)
    """Base64 of the next piece of the database file."""
    done: bool = False
    position: PositionModel | None = None


class Changes(_Message):
    type: Literal["changes"] = "changes"
    changes: list[dict[str, Any]] = pydantic.Field(max_length=100000)
    lsn: int = pydantic.Field(ge=0)
    synced: bool
    sent: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    """The primary's monotonic clock when it sent this (echoed in the standby's ack)."""


class ReplicaState(_Message):
    type: Literal["replica_state"] = "replica_state"
    term: int = pydantic.Field(ge=1)
    lsn: int = pydantic.Field(ge=0)
    synced: bool
    at: float
    sent: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    """The primary's monotonic clock when it sent this (echoed in the standby's ack)."""


class ReplicaAck(_Message):
    type: Literal["replica_ack"] = "replica_ack"
    lsn: int = pydantic.Field(ge=0, le=_INT64)
    sent: float = pydantic.Field(default=0.0, ge=0, allow_inf_nan=False)
    """`sent` of the newest frame of the primary this standby received (its proof it hears
    the primary; 0: an older standby)."""


class Switchover(_Message):
    """The primary hands over: promote to `term` once you have applied `lsn`."""

    type: Literal["switchover"] = "switchover"
    term: int = pydantic.Field(ge=2)
    lsn: int = pydantic.Field(ge=0)


class SwitchoverDone(_Message):
    type: Literal["switchover_done"] = "switchover_done"
    term: int = pydantic.Field(ge=2)


WorkerMessage = Annotated[
    Hello
    | Heartbeat
    | StateAck
    | Output
    | Result
    | Drain
    | Release
    | Witness
    | ReplicaHello
    | ReplicaAck
    | SwitchoverDone,
    pydantic.Field(discriminator="type"),
]
DispatcherMessage = Annotated[
    Challenge
    | Welcome
    | Reject
    | Redirect
    | State
    | Assign
    | Cancel
    | ResultAck
    | ReplicaWelcome
    | Snapshot
    | Changes
    | ReplicaState
    | Switchover,
    pydantic.Field(discriminator="type"),
]
_worker_adapter: pydantic.TypeAdapter[WorkerMessage] = pydantic.TypeAdapter(WorkerMessage)
_dispatcher_adapter: pydantic.TypeAdapter[DispatcherMessage] = pydantic.TypeAdapter(
    DispatcherMessage
)


def _parse(adapter: pydantic.TypeAdapter[Any], raw: dict[str, Any]) -> Any:
    try:
        return adapter.validate_python(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.ProtocolError(
            f"invalid {raw.get('type')!r} message: {where}: {first['msg']}"
        ) from None


def parse_worker_message(raw: dict[str, Any]) -> WorkerMessage:
    """Validate a frame a worker sent; raise ProtocolError if it is not a valid message."""
    result: WorkerMessage = _parse(_worker_adapter, raw)
    return result


def parse_dispatcher_message(raw: dict[str, Any]) -> DispatcherMessage:
    """Validate a frame the dispatcher sent; raise ProtocolError if it is not valid."""
    result: DispatcherMessage = _parse(_dispatcher_adapter, raw)
    return result


def to_wire(message: pydantic.BaseModel) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_none=False)
