"""The settings model: one frozen sub-model per TOML table, a description on every key.

Besides the models: the checks for HOST:PORT addresses and backup schedules, and the
derived values (secret bytes, data dir, database file) the entry points need.
`registry` lists the keys; `loading` builds a `Settings` from flags, env and file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field, SecretStr

from octaskly import errors, keyring
from octaskly.domain import models

DB_FILE = "octaskly.db"
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.\-]*[A-Za-z0-9_])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_FREQUENCY = re.compile(r"^([1-9][0-9]{0,5})([mh])$")
FREQUENCY_WORDS = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400}


class KeysError(ValueError):
    """A validation failure that involves several keys (e.g. two mutually exclusive ones)."""

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = keys


# -- value checks (shared by validators and the CLI) ----------------------------------------
def parse_host(text: str) -> str:
    """A host name or IP address; IPv6 may be written in brackets. Raises ValueError."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not host:
        raise ValueError("host must not be empty")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv6 address") from None
    if not _HOSTNAME.match(host):
        raise ValueError(f"{text!r} is not a valid host name or address")
    return host


def parse_addr(text: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:5555`) into (host, port). Raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (got {text!r})")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"IPv6 addresses need brackets, e.g. [::1]:5555 (got {text!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be between 1 and 65535 in {text!r}")
    return parse_host(host), int(port_text)


def _check_addr(text: str) -> str:
    parse_addr(text)
    return text


def backup_interval(frequency: str) -> int:
    """Seconds between backups for `hourly|daily|weekly` or `<N>h` / `<N>m`."""
    if frequency in FREQUENCY_WORDS:
        return FREQUENCY_WORDS[frequency]
    match = _FREQUENCY.match(frequency)
    if match is None:
        raise ValueError(
            f"must be hourly, daily, weekly, <N>h or <N>m (got {frequency!r})",
        )
    return int(match.group(1)) * (3600 if match.group(2) == "h" else 60)


# -- tables ---------------------------------------------------------------------------------
class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        """`~/x` in a path means the user's home, as in a shell."""
        return value.expanduser() if isinstance(value, Path) else value


class NetworkSettings(_Table):
    """[network]: where the dispatcher listens."""

    bind_address: str = Field(
        default="0.0.0.0", description="Interface to listen on (P2P and REST API)"
    )
    port: int = Field(
        default=5555, ge=1, le=65535, description="P2P port: workers and standby (TCP and QUIC)"
    )
    api_port: int = Field(
        default=3000, ge=1, le=65535, description="REST API, web UI and /metrics port"
    )
    quic_enabled: bool = Field(default=True, description="Also accept workers over QUIC (UDP)")

    @pydantic.field_validator("bind_address")
    @classmethod
    def _bind(cls, value: str) -> str:
        return parse_host(value)


class SecuritySettings(_Table):
    """[security]: the cluster secret and who may join."""

    secret_key: SecretStr | None = Field(
        default=None,
        description="Shared cluster secret (at least 16 characters)",
        examples=["change-me-to-a-long-random-string"],
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="File holding the cluster secret (instead of secret_key)",
        examples=["/etc/octaskly/secret"],
    )
    whitelist: tuple[str, ...] = Field(
        default=(), description="Worker names or ids allowed to join (empty: any)"
    )
    require_auth: bool = Field(default=True, description="Require a token on the REST API")
    audit_logging: bool = Field(default=True, description="Write the audit log")

    @pydantic.field_validator("secret_key")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @pydantic.field_validator("whitelist")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in value):
            raise ValueError("worker names must not be empty")
        return value

    @pydantic.model_validator(mode="after")
    def _one_secret(self) -> SecuritySettings:
        if self.secret_key is not None and self.secret_key_file is not None:
            raise KeysError(
                ("secret_key", "secret_key_file"),
                "secret_key and secret_key_file are mutually exclusive; set only one",
            )
        return self


class StorageSettings(_Table):
    """[storage]: the database and retention."""

    db_path: Path | None = Field(
        default=None,
        description="SQLite database file",
        examples=["/var/lib/octaskly/octaskly.db"],
    )
    db_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (instead of db_path)",
        examples=["postgresql://octaskly@db.example/octaskly"],
    )
    data_dir: Path | None = Field(
        default=None,
        description="Directory for the database, audit log, TLS files and local token",
        examples=["/var/lib/octaskly"],
    )
    db_backup_frequency: str = Field(
        default="daily", description="Backup schedule: hourly, daily, weekly, <N>h or <N>m"
    )
    log_retention_days: int = Field(
        default=30, ge=1, le=3650, description="Days to keep audit log entries"
    )
    task_retention_hours: float = Field(
        default=720,
        ge=0,
        le=87_600,
        allow_inf_nan=False,
        description="Hours a finished task (its output, its idempotency key) is kept before "
        "it is deleted (0: keep forever)",
    )
    sqlite_synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="SQLite fsync mode; 'normal' is faster but may lose the last commits "
        "on power loss",
    )

    @pydantic.field_validator("db_url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("postgresql://"):
            raise ValueError("must start with postgresql://")
        return value

    @pydantic.field_validator("db_backup_frequency")
    @classmethod
    def _frequency(cls, value: str) -> str:
        backup_interval(value)
        return value

    @pydantic.model_validator(mode="after")
    def _one_database(self) -> StorageSettings:
        if self.db_path is not None and self.db_url is not None:
            raise KeysError(
                ("db_path", "db_url"), "db_path and db_url are mutually exclusive; set only one"
            )
        return self


def _cpu_count() -> int:
    return min(os.cpu_count() or 1, 1024)


class PerformanceSettings(_Table):
    """[performance]: threads, queue bound and network timing."""

    worker_threads: int = Field(
        default_factory=_cpu_count, ge=1, le=1024, description="Threads for blocking work"
    )
    task_queue_size: int = Field(
        default=1_000_000, ge=1, le=100_000_000, description="Most tasks queued at once"
    )
    connection_timeout: float = Field(
        default=15.0,
        ge=0.5,
        le=3600,
        allow_inf_nan=False,
        description="Seconds before an unanswered connection or peer is given up",
    )
    keepalive_interval: float = Field(
        default=5.0,
        ge=0.1,
        le=600,
        allow_inf_nan=False,
        description="Seconds between worker heartbeats",
    )


class LimitsSettings(_Table):
    """[limits]: defaults for tasks that set no limits of their own."""

    default_cpu_seconds: int = Field(
        default=3600, ge=1, le=86400, description="CPU seconds a task may use"
    )
    default_memory_mb: int = Field(default=2048, ge=64, description="Memory (MB) a task may use")
    default_timeout: int = Field(
        default=3600, ge=1, le=86400, description="Wall-clock seconds before a task is killed"
    )


class DispatcherSettings(_Table):
    """[dispatcher]: high availability, and federation on PostgreSQL."""

    role: Literal["primary", "standby"] = Field(
        default="primary", description="primary serves; standby replicates the primary"
    )
    primary_addr: str | None = Field(
        default=None,
        description="The primary's P2P HOST:PORT (needed by a standby)",
        examples=["primary.example:5555"],
    )
    replication: Literal["sync", "async"] = Field(
        default="async", description="sync: acknowledge a task only once the standby has it"
    )
    failover_timeout: float = Field(
        default=5.0,
        ge=1,
        le=600,
        allow_inf_nan=False,
        description="Seconds without the primary before a standby may promote itself",
    )
    auto_failover: bool = Field(
        default=True,
        description="Whether a standby promotes itself (false: only `octaskly ha promote`, "
        "e.g. when an operator holds the leadership lease)",
    )
    node_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._@:\-]+$",
        description="This dispatcher's name among its peers (default: HOSTNAME:PORT)",
        examples=["dispatcher-a"],
    )
    lease_seconds: float = Field(
        default=15.0,
        ge=3,
        le=600,
        allow_inf_nan=False,
        description="With db_url: seconds a dispatcher's runs stay its own without a "
        "renewal; after that another dispatcher takes them over",
    )
    client_min_sandbox_level: models.SandboxLevel = Field(
        default=models.SandboxLevel.STRICT,
        description="Least sandbox level of a task submitted with a client token: one "
        "without sandbox_level gets it, one asking for less is refused (none: no minimum); "
        "such tasks go only to workers that can provide the level",
    )

    @pydantic.field_validator("primary_addr")
    @classmethod
    def _addr(cls, value: str | None) -> str | None:
        return None if value is None else _check_addr(value)

    @pydantic.model_validator(mode="after")
    def _standby_needs_primary(self) -> DispatcherSettings:
        if self.role == "standby" and self.primary_addr is None:
            raise KeysError(("role", "primary_addr"), "role standby needs primary_addr")
        return self


class WorkerSettings(_Table):
    """[worker]: the worker's own settings."""

    dispatcher_addr: tuple[str, ...] = Field(
        default=(), description="Dispatcher HOST:PORT list (empty: discover on the LAN)"
    )
    name: str | None = Field(
        default=None, description="Worker name", examples=["worker-1"], min_length=1
    )
    cpu_cores: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        allow_inf_nan=False,
        description="CPU cores offered",
        examples=[4.0],
    )
    memory: int | None = Field(
        default=None, ge=1, description="Memory (MB) offered", examples=[8192]
    )
    gpu: bool | None = Field(default=None, description="Whether a GPU is offered", examples=[False])
    max_jobs: int | None = Field(
        default=None, ge=1, le=10000, description="Tasks run at the same time", examples=[4]
    )
    drain_timeout: float = Field(
        default=0,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description="On SIGTERM, seconds running tasks may finish before they are handed "
        "back to the dispatcher (0: stop at once; they are re-queued)",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels tasks can require, as key=value"
    )
    sandbox_level: models.SandboxLevel = Field(
        default=models.SandboxLevel.BASIC,
        description="Least sandbox: none, basic, strict or very-strict",
    )
    transport: Literal["auto", "quic", "tcp"] = Field(
        default="auto", description="How to reach the dispatcher"
    )
    output_limit_kb: int = Field(
        default=1024, ge=1, le=1_048_576, description="Tail of stdout/stderr kept per task (KB)"
    )
    work_dir: Path | None = Field(
        default=None,
        description="Where task working directories are made (a tmpfs makes spawning faster)",
        examples=["/var/lib/octaskly/work"],
    )
    task_user: str | None = Field(
        default=None,
        description="User a root worker runs none/basic tasks as (name or uid; root: as "
        "itself); default nobody. strict and up always run as nobody",
        examples=["nobody"],
    )
    sandbox_read_only_paths: tuple[Path, ...] = Field(
        default=(),
        max_length=64,
        description="More absolute paths strict tasks see read-only, besides the system "
        "directories (/usr, /etc, ...): e.g. /opt/tools",
        examples=[["/opt/tools"]],
    )
    containment: Literal["auto", "cgroup-v2", "cgroup-v1", "pid-namespace", "process-group"] = (
        Field(
            default="auto",
            description="How none/basic tasks are kept whole (everything they start dies "
            "with them): auto picks the best that works here; process-group lets setsid escape",
        )
    )

    @pydantic.field_validator("sandbox_read_only_paths")
    @classmethod
    def _read_only_paths(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            text = str(path)
            if not path.is_absolute() or "\0" in text:
                raise ValueError(f"{text!r} is not an absolute path")
            normal = Path(os.path.normpath(text))
            if normal == Path("/"):
                raise ValueError("'/' would show strict tasks the whole machine")
        return tuple(Path(os.path.normpath(str(p))) for p in value)

    @pydantic.field_validator("task_user")
    @classmethod
    def _task_user(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", value):
            raise ValueError(f"{value!r} is not a user name or uid")
        return value

    @pydantic.field_validator("dispatcher_addr")
    @classmethod
    def _addrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_addr(a) for a in value)

    @pydantic.field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r} must match {_LABEL_KEY.pattern}")
        return value


class LoggingSettings(_Table):
    """[logging]: how much to log and in which format."""

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severity logged: debug, info, warning or error"
    )
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto", description="auto: text on a terminal, JSON lines otherwise"
    )

    @pydantic.field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return "warning" if value == "warn" else value
        return value


class ApiSettings(_Table):
    """[api]: TLS for the server; URL and token for the client commands."""

    tls_cert: Path | None = Field(
        default=None, description="TLS certificate (PEM)", examples=["/etc/octaskly/tls.crt"]
    )
    tls_key: Path | None = Field(
        default=None, description="TLS private key (PEM)", examples=["/etc/octaskly/tls.key"]
    )
    api_url: str = Field(
        default="http://127.0.0.1:3000",
        description="Dispatcher API the client commands use; several, comma-separated "
        "(primary and standby): the commands find the primary and retry across a failover",
    )
    token: SecretStr | None = Field(
        default=None, description="API token for the client commands", examples=["eyJhbGciOi..."]
    )

    @pydantic.field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",")]
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"must be an http:// or https:// URL (got {url!r})")
        return ",".join(u.rstrip("/") for u in urls)

    @pydantic.model_validator(mode="after")
    def _pair(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise KeysError(("tls_cert", "tls_key"), "tls_cert and tls_key go together")
        return self


class Settings(_Table):
    """Everything one octaskly process is configured with; built once by `loading.load`."""

    network: NetworkSettings = Field(default_factory=NetworkSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    def secret_bytes(self) -> bytes | None:
        """The cluster secret from `secret_key` or `secret_key_file`; None if neither is set.

        One trailing newline of the file is dropped. A missing, unreadable or empty file is
        a ConfigError naming the file.
        """
        sec = self.security
        if sec.secret_key is not None:
            return sec.secret_key.get_secret_value().encode()
        if sec.secret_key_file is None:
            return None
        path = sec.secret_key_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise errors.ConfigError(
                f"secret_key_file {path}: cannot read: {exc.strerror or exc}"
            ) from None
        return keyring.parse(data, f"secret_key_file {path}")[0]

    def secret_keys(self) -> list[bytes] | None:
        """Every key of `secret_key` / `secret_key_file` (one per line: the current key
        first, then keys still accepted during a rotation); None if neither is set."""
        sec = self.security
        if sec.secret_key is not None or sec.secret_key_file is None:
            key = self.secret_bytes()
            return None if key is None else [key]
        return keyring.parse(
            sec.secret_key_file.read_bytes(), f"secret_key_file {sec.secret_key_file}"
        )

    def secret_file_or(self, default: Path) -> Path:
        """`secret_key_file` if set, else `default` (where a generated secret is kept)."""
        return self.security.secret_key_file or default

    def data_dir(self, home: Path | None = None) -> Path:
        """`data_dir`, else the directory of `db_path`, else `~/.octaskly/`."""
        storage = self.storage
        if storage.data_dir is not None:
            return storage.data_dir
        if storage.db_path is not None:
            return storage.db_path.parent
        return (home if home is not None else Path.home()) / ".octaskly"

    def db_file(self, home: Path | None = None) -> Path:
        """The SQLite file: `db_path`, else `<data dir>/octaskly.db` (unused with db_url)."""
        return self.storage.db_path or self.data_dir(home) / DB_FILE
