"""Domain records: what a task and a worker are, independent of storage and transport.

Timestamps are float seconds since the epoch (UTC); the API renders them as RFC 3339.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid
from typing import Annotated, Any

import pydantic

MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 256
MAX_PATHS = 256
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")


class Priority(enum.IntEnum):
    """Scheduling priority; higher runs first (subject to aging)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: object) -> Priority:
        """Accept `low|normal|high|critical` (any case) or the integer 0-3."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return cls(value)
        raise ValueError("priority must be one of low, normal, high, critical")


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED}
)


class SandboxLevel(enum.StrEnum):
    NONE = "none"
    BASIC = "basic"
    STRICT = "strict"
    VERY_STRICT = "very-strict"

    @property
    def rank(self) -> int:
        return list(SandboxLevel).index(self)


def _priority(value: object) -> Priority:
    return Priority.parse(value)


PriorityField = Annotated[
    Priority,
    pydantic.BeforeValidator(_priority),
    pydantic.PlainSerializer(lambda p: p.label, return_type=str),
    pydantic.WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": ["low", "normal", "high", "critical"]},
                {"type": "integer", "minimum": 0, "maximum": 3},
            ],
            "description": "low, normal, high, critical (any case), or 0-3 (3: critical)",
        }
    ),
]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class LimitsPreset(enum.StrEnum):
    """Named sets of per-task limits (:data:`PRESETS`); a task's own limits override them."""

    STRICT = "strict"
    RELAXED = "relaxed"


@dataclasses.dataclass(frozen=True)
class Limits:
    """A run's resource limits, all set: what :func:`effective_limits` resolves."""

    cpu_seconds: int
    memory_limit_mb: int
    disk_limit_mb: int
    open_files_limit: int
    process_limit: int


#: Bounds of the per-task limits (inclusive); the upper ones keep values the kernel takes.
CPU_SECONDS_BOUNDS = (1, 86400)
MEMORY_MB_BOUNDS = (64, 16 * 1024 * 1024)
DISK_MB_BOUNDS = (100, 1024 * 1024 * 1024)
OPEN_FILES_BOUNDS = (64, 1024 * 1024)  # the kernel's default fs.nr_open
PROCESSES_BOUNDS = (4, 4 * 1024 * 1024)  # the largest pid_max
#: The limits of a task that sets none and names no preset.
DEFAULT_LIMITS = Limits(
    cpu_seconds=3600,
    memory_limit_mb=2048,
    disk_limit_mb=10000,
    open_files_limit=1024,
    process_limit=256,
)
PRESETS: dict[LimitsPreset, Limits] = {
    LimitsPreset.STRICT: Limits(
        cpu_seconds=300,
        memory_limit_mb=512,
        disk_limit_mb=1000,
        open_files_limit=100,
        process_limit=10,
    ),
    LimitsPreset.RELAXED: Limits(
        cpu_seconds=86400,
        memory_limit_mb=8192,
        disk_limit_mb=102400,
        open_files_limit=4096,
        process_limit=1024,
    ),
}
_LIMIT_FIELDS = (
    "cpu_seconds",
    "memory_limit_mb",
    "disk_limit_mb",
    "open_files_limit",
    "process_limit",
)


def effective_limits(
    *,
    preset: LimitsPreset | None = None,
    cpu_seconds: int | None = None,
    memory_limit_mb: int | None = None,
    disk_limit_mb: int | None = None,
    open_files_limit: int | None = None,
    process_limit: int | None = None,
) -> Limits:
    """A run's limits: each one the task set, else its preset's, else the default."""
    base = DEFAULT_LIMITS if preset is None else PRESETS[preset]
    return Limits(
        cpu_seconds=base.cpu_seconds if cpu_seconds is None else cpu_seconds,
        memory_limit_mb=base.memory_limit_mb if memory_limit_mb is None else memory_limit_mb,
        disk_limit_mb=base.disk_limit_mb if disk_limit_mb is None else disk_limit_mb,
        open_files_limit=base.open_files_limit if open_files_limit is None else open_files_limit,
        process_limit=base.process_limit if process_limit is None else process_limit,
    )


def _json_number(value: object) -> object:
    """A JSON number as the API documents it: lax parsing would read true as 1 and "60"
    as 60 (a number with no fraction, like 60.0, is a JSON Schema integer: kept)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str | bytes):
        raise ValueError("must be a valid integer or number, not a string")
    return value


class Requirements(_Strict):
    """What a task needs from the worker that runs it."""

    cpu_cores: float = pydantic.Field(default=0, ge=0, le=4096)
    memory_mb: int = pydantic.Field(default=0, ge=0, le=16 * 1024 * 1024)
    # a JSON boolean, not what lax parsing makes of 0 or "yes" (schemathesis sent "gpu": 0)
    gpu: bool = pydantic.Field(default=False, strict=True)
    labels: dict[str, str] = pydantic.Field(default_factory=dict, max_length=64)

    @pydantic.field_validator("cpu_cores", "memory_mb", mode="before")
    @classmethod
    def _numbers(cls, value: object) -> object:
        return _json_number(value)

    @pydantic.field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r} is not a valid label name")
            if len(val) > 256:
                raise ValueError(f"label {key!r} value is longer than 256 characters")
        return value


class TaskSpec(_Strict):
    """A task as a client submits it. Unknown fields and out-of-range values are rejected."""

    command: str = pydantic.Field(min_length=1)
    timeout: int | None = pydantic.Field(default=None, ge=1, le=86400)
    priority: PriorityField = Priority.NORMAL
    retry_count: int = pydantic.Field(default=0, ge=0, le=10)
    memory_limit_mb: int | None = pydantic.Field(
        default=None, ge=MEMORY_MB_BOUNDS[0], le=MEMORY_MB_BOUNDS[1]
    )
    cpu_seconds: int | None = pydantic.Field(
        default=None, ge=CPU_SECONDS_BOUNDS[0], le=CPU_SECONDS_BOUNDS[1]
    )
    disk_limit_mb: int | None = pydantic.Field(
        default=None, ge=DISK_MB_BOUNDS[0], le=DISK_MB_BOUNDS[1]
    )
    open_files_limit: int | None = pydantic.Field(
        default=None, ge=OPEN_FILES_BOUNDS[0], le=OPEN_FILES_BOUNDS[1]
    )
    process_limit: int | None = pydantic.Field(
        default=None, ge=PROCESSES_BOUNDS[0], le=PROCESSES_BOUNDS[1]
    )
    limits_preset: LimitsPreset | None = None
    sandbox_level: SandboxLevel | None = None
    env: dict[str, str] = pydantic.Field(default_factory=dict, max_length=MAX_ENV_ENTRIES)
    inputs: list[str] = pydantic.Field(default_factory=list, max_length=MAX_PATHS)
    outputs: list[str] = pydantic.Field(default_factory=list, max_length=MAX_PATHS)
    requirements: Requirements = pydantic.Field(default_factory=Requirements)

    @pydantic.field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("command must not be blank")
        if "\x00" in value:
            raise ValueError("command must not contain NUL bytes")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
            raise ValueError(f"command is longer than {MAX_COMMAND_BYTES} bytes")
        return value

    @pydantic.field_validator("timeout", "retry_count", *_LIMIT_FIELDS, mode="before")
    @classmethod
    def _limit_is_a_number(cls, value: object) -> object:
        return _json_number(value)

    def limits(self) -> Limits:
        """The limits a run of this task gets (its own, else its preset's, else defaults)."""
        return effective_limits(
            preset=self.limits_preset, **{name: getattr(self, name) for name in _LIMIT_FIELDS}
        )

    def with_min_sandbox_level(self, minimum: SandboxLevel) -> TaskSpec:
        """This spec held to at least `minimum`: without a level it gets `minimum` (kept in
        the spec, so the record, the standby and every scheduler see it); a lower level
        is refused with ValueError."""
        if self.sandbox_level is None:
            return self.model_copy(update={"sandbox_level": minimum})
        if self.sandbox_level.rank < minimum.rank:
            raise ValueError(
                f"{self.sandbox_level.value} is below {minimum.value}, the least sandbox "
                "level of a task submitted with a client token (client_min_sandbox_level)"
            )
        return self

    @pydantic.field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\x00" in val:
                raise ValueError(f"environment variable {key!r} contains a NUL byte")
            if len(val) > 32 * 1024:
                raise ValueError(f"environment variable {key!r} is longer than 32 KiB")
        return value

    @pydantic.field_validator("inputs", "outputs")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path or "\x00" in path or len(path) > 4096:
                raise ValueError("paths must be non-empty, without NUL, at most 4096 chars")
        return value


class Task(pydantic.BaseModel):
    """The full record of a task: its spec plus everything that happened to it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    id: str
    queue_seq: int = 0
    spec: TaskSpec
    timeout: int
    status: TaskStatus = TaskStatus.QUEUED
    attempts: int = 0
    worker_id: str | None = None
    exit_code: int | None = None
    stdout: bytes = b""
    """The kept tail of the last attempt's stdout, exactly as written (see `output`)."""
    stderr: bytes = b""
    stdout_dropped: int = 0
    """Bytes cut from the head of `stdout` (the task wrote more than the output limit)."""
    stderr_dropped: int = 0
    duration_ms: int | None = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    not_before: float | None = None
    lost_count: int = 0
    owner: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None

    @property
    def priority(self) -> Priority:
        return self.spec.priority

    @property
    def command(self) -> str:
        return self.spec.command


def new_task_id() -> str:
    return str(uuid.uuid4())


class Resources(_Strict):
    """What a worker offers; auto-detected unless overridden on its command line."""

    cpu_cores: float = pydantic.Field(ge=0, le=4096)
    memory_mb: int = pydantic.Field(ge=0, le=16 * 1024 * 1024)
    gpu: bool = False
    labels: dict[str, str] = pydantic.Field(default_factory=dict, max_length=64)


class WorkerState(enum.StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"


def as_json(model: pydantic.BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
