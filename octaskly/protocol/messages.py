"""The P2P messages between dispatcher and workers, validated on receipt.

Handshake: the dispatcher sends `challenge`; the worker answers `hello` with a proof that
it knows the cluster key; the dispatcher answers `welcome` with its own proof (or `reject`
and closes). After that, the worker sends `heartbeat`, `output` and `result`; the
dispatcher sends `assign`, `cancel` and `result_ack`.

Every run of a task carries its attempt number, a lease: a message about an attempt the
dispatcher already gave up on is answered with `cancel` and otherwise ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic

from octaskly import errors
from octaskly.domain import models

PROTOCOL_VERSION = 3  # 2: proofs bound to the TLS certificate; 3: assignments carry all limits
_ID = pydantic.Field(min_length=1, max_length=200)
_HEX = pydantic.Field(min_length=32, max_length=128, pattern=r"^[0-9a-f]+$")


class _Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class RunRef(_Message):
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1)


class Challenge(_Message):
    type: Literal["challenge"] = "challenge"
    protocol: int
    nonce: Annotated[str, _HEX]


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol: int
    name: str = pydantic.Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:\-]+$")
    instance: Annotated[str, _HEX]
    nonce: Annotated[str, _HEX]
    proof: Annotated[str, _HEX]
    version: str = pydantic.Field(max_length=64)
    resources: models.Resources
    max_jobs: int = pydantic.Field(ge=1, le=10000)
    sandbox_level: models.SandboxLevel
    running: list[RunRef] = pydantic.Field(default_factory=list, max_length=10000)
    finished: list[RunRef] = pydantic.Field(default_factory=list, max_length=100000)


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    worker_id: str
    proof: Annotated[str, _HEX]
    keepalive_interval: float
    abort: list[RunRef] = pydantic.Field(default_factory=list)


class Reject(_Message):
    type: Literal["reject"] = "reject"
    reason: str = pydantic.Field(max_length=1000)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    running: list[RunRef] = pydantic.Field(default_factory=list, max_length=10000)


class Output(_Message):
    type: Literal["output"] = "output"
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1)
    stream: Literal["stdout", "stderr"]
    data: str = pydantic.Field(max_length=4 * 1024 * 1024)


class Result(_Message):
    type: Literal["result"] = "result"
    task_id: Annotated[str, _ID]
    attempt: int = pydantic.Field(ge=1)
    status: Literal["completed", "failed", "timed_out", "cancelled"]
    exit_code: int | None = None
    duration_ms: int = pydantic.Field(ge=0)
    stdout: str = ""
    stderr: str = ""
    stdout_dropped: int = pydantic.Field(default=0, ge=0)
    stderr_dropped: int = pydantic.Field(default=0, ge=0)
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


WorkerMessage = Annotated[Hello | Heartbeat | Output | Result, pydantic.Field(discriminator="type")]
DispatcherMessage = Annotated[
    Challenge | Welcome | Reject | Assign | Cancel | ResultAck,
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
