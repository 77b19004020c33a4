"""Configuration loading as tables: precedence, sources, discovery and every error class.

No real /etc, home or environment: cwd, home, the system file and env are injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from octaskly import errors
from octaskly.config import loading, registry, settings
from octaskly.domain import models

SECRET = "s3cret-value-0123456789"


@dataclass
class Env:
    """A sandbox for `loading.load`: fake cwd, home and system config under tmp_path."""

    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def system(self) -> Path:
        return self.root / "etc" / "octaskly.toml"

    def write(self, text: str, name: str = "c.toml") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def load(
        self,
        text: str | None = None,
        *,
        flags: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        config_file: str | None = None,
    ) -> loading.Loaded:
        if text is not None:
            config_file = str(self.write(text))
        return loading.load(
            flags=flags or {},
            env=env or {},
            config_file=config_file,
            cwd=self.cwd,
            home=self.home,
            system_config=self.system,
        )

    def error(self, text: str | None = None, **kwargs: Any) -> str:
        with pytest.raises(errors.ConfigError) as info:
            self.load(text, **kwargs)
        return str(info.value)


@pytest.fixture
def sandbox(tmp_path: Path) -> Env:
    box = Env(tmp_path)
    box.cwd.mkdir()
    box.home.mkdir()
    return box


def test_defaults_without_any_source(sandbox: Env) -> None:
    loaded = sandbox.load()
    assert loaded.settings == settings.Settings()
    assert loaded.config_file is None
    assert set(loaded.sources) == set(registry.KEYS)
    assert set(loaded.sources.values()) == {"default"}
    s = loaded.settings
    assert (s.network.port, s.network.api_port, s.network.bind_address) == (5555, 3000, "0.0.0.0")
    assert s.worker.sandbox_level is models.SandboxLevel.BASIC
    assert s.dispatcher.client_min_sandbox_level is models.SandboxLevel.STRICT
    assert s.storage.sqlite_synchronous == "full"
    assert s.storage.task_retention_hours == 720  # 30 days; 0 keeps tasks for ever
    assert s.performance.worker_threads >= 1


# -- precedence -----------------------------------------------------------------------------
# key, TOML value, env text, flag value (as argparse gives it), and the three parsed values.
PRECEDENCE = [
    ("port", "6000", "6001", "6002", 6000, 6001, 6002),
    ("require_auth", "false", "true", "false", False, True, False),
    ("connection_timeout", "2.5", "3", "4.5", 2.5, 3.0, 4.5),
    (
        "dispatcher_addr",
        '["a:1"]',
        "b:2,c:3",
        ["d:4", "e:5,f:6"],
        ("a:1",),
        ("b:2", "c:3"),
        ("d:4", "e:5", "f:6"),
    ),
    ("labels", '{ zone = "a" }', "zone=b,gpu=x", ["zone=c"],
     {"zone": "a"}, {"zone": "b", "gpu": "x"}, {"zone": "c"}),
    ("sandbox_level", '"strict"', "none", "very-strict", "strict", "none", "very-strict"),
    ("client_min_sandbox_level", '"basic"', "none", "very-strict",
     "basic", "none", "very-strict"),
    ("db_path", '"/f/a.db"', "/e/a.db", "/g/a.db",
     Path("/f/a.db"), Path("/e/a.db"), Path("/g/a.db")),
    ("whitelist", '["w1"]', "w2, w3", ["w4"], ("w1",), ("w2", "w3"), ("w4",)),
    ("log_level", '"error"', "WARN", "debug", "error", "warning", "debug"),
    ("task_retention_hours", "0", "0.5", "48", 0.0, 0.5, 48.0),
    ("task_user", '"octaskly"', "root", "1001", "octaskly", "root", "1001"),
    ("sandbox_read_only_paths", '["/opt/tools/"]', "/srv/a,/srv/b", ["/data//x"],
     (Path("/opt/tools"),), (Path("/srv/a"), Path("/srv/b")), (Path("/data/x"),)),
    ("containment", '"pid-namespace"', "cgroup-v1", "process-group",
     "pid-namespace", "cgroup-v1", "process-group"),
]  # fmt: skip


def _get(loaded: loading.Loaded, name: str) -> Any:
    return getattr(getattr(loaded.settings, registry.KEYS[name].table), name)


@pytest.mark.parametrize(
    ("name", "toml", "env_text", "flag", "from_file", "from_env", "from_flag"), PRECEDENCE
)
def test_flag_beats_env_beats_file_beats_default(
    sandbox: Env,
    name: str,
    toml: str,
    env_text: str,
    flag: Any,
    from_file: Any,
    from_env: Any,
    from_flag: Any,
) -> None:
    key = registry.KEYS[name]
    path = sandbox.write(f"# comment\n[{key.table}]\n\n{name} = {toml}\n")
    env = {key.env: env_text}
    flag_name = loading.flag_names(key)[0]

    loaded = sandbox.load(config_file=str(path))
    assert _get(loaded, name) == from_file
    assert loaded.sources[name] == f"file {path}:4"

    loaded = sandbox.load(config_file=str(path), env=env)
    assert _get(loaded, name) == from_env
    assert loaded.sources[name] == f"env {key.env}"

    loaded = sandbox.load(config_file=str(path), env=env, flags={name: flag})
    assert _get(loaded, name) == from_flag
    assert loaded.sources[name] == f"flag {flag_name}"
    others = {k: v for k, v in loaded.sources.items() if k != name}
    assert set(others.values()) == {"default"}


def test_typed_flag_values_are_accepted(sandbox: Env) -> None:
    """Callers (e.g. `octaskly dev`) may pass already-typed values as flags."""
    loaded = sandbox.load(
        flags={"port": 7000, "data_dir": ".octaskly", "gpu": True, "labels": {"a": "b"}}
    )
    s = loaded.settings
    assert (s.network.port, s.storage.data_dir, s.worker.gpu) == (7000, Path(".octaskly"), True)
    assert s.worker.labels == {"a": "b"}


def test_empty_env_value_unsets_an_optional_key(sandbox: Env) -> None:
    loaded = sandbox.load("[worker]\nname = 'w1'\n", env={"OCTASKLY_NAME": ""})
    assert loaded.settings.worker.name is None
    assert loaded.sources["name"] == "env OCTASKLY_NAME"


def test_dotted_and_quoted_keys_report_their_line(sandbox: Env) -> None:
    path = sandbox.write('network.port = 6000\n\n[worker]\n"name" = "w"\n')
    loaded = sandbox.load(config_file=str(path))
    assert loaded.sources["port"] == f"file {path}:1"
    assert loaded.sources["name"] == f"file {path}:4"


def test_paths_expand_home(sandbox: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(sandbox.home))
    loaded = sandbox.load("[storage]\ndb_path = '~/q.db'\n")
    assert loaded.settings.storage.db_path == sandbox.home / "q.db"


# -- mutually exclusive keys ----------------------------------------------------------------
def test_higher_level_wins_over_exclusive_key_from_lower_level(sandbox: Env) -> None:
    loaded = sandbox.load(
        "[security]\nsecret_key_file = '/nonexistent'\n", flags={"secret_key": SECRET}
    )
    assert loaded.settings.security.secret_key_file is None
    assert loaded.settings.secret_bytes() == SECRET.encode()
    assert "overridden by secret_key" in loaded.sources["secret_key_file"]


@pytest.mark.parametrize(
    ("text", "env", "flags", "needles"),
    [
        (
            f"[security]\nsecret_key = '{SECRET}'\nsecret_key_file = '/k'\n",
            {},
            {},
            ["secret_key and secret_key_file", "c.toml:2", "c.toml:3"],
        ),
        (
            None,
            {"OCTASKLY_SECRET_KEY": SECRET, "OCTASKLY_SECRET_KEY_FILE": "/k"},
            {},
            ["mutually exclusive", "env OCTASKLY_SECRET_KEY", "env OCTASKLY_SECRET_KEY_FILE"],
        ),
        (
            None,
            {},
            {"db_path": "/a.db", "db_url": "postgresql://h/db"},
            ["db_path and db_url", "flag --db-path", "flag --db-url"],
        ),
    ],
)
def test_exclusive_keys_at_the_same_level_are_an_error(
    sandbox: Env, text: str | None, env: dict[str, str], flags: dict[str, Any], needles: list[str]
) -> None:
    message = sandbox.error(text, env=env, flags=flags)
    assert all(n in message for n in needles), message
    assert SECRET not in message


# -- errors ---------------------------------------------------------------------------------
FILE_ERRORS = [
    ("[network]\nport = 70000\n", ["c.toml:2:", "[network] port", "between 1 and 65535", "70000"]),
    ("[network]\nport = \"5555\"\n", ["c.toml:2:", "port", "expected an integer"]),
    ("[network]\nport = true\n", ["c.toml:2:", "port", "expected an integer", "true"]),
    ("[network]\napi_port = 1.5\n", ["c.toml:2:", "api_port", "expected an integer"]),
    ("[network]\n\nprot = 5555\n", ["c.toml:3:", 'unknown key "prot"', '"port"']),
    ("[network]\nworker_thread = 1\n", ['"worker_threads" (in [performance])']),
    ("[network]\ndb_path = '/x'\n", ["c.toml:2:", '"db_path" belongs in [storage]', "[network]"]),
    ("port = 5555\n", ["c.toml:1:", '"port" must be in the [network] table']),
    ("[netwrk]\nport = 1\n", ["c.toml:1:", "unknown table [netwrk]", "[network]"]),
    ("[nonsense]\n", ["unknown table [nonsense]"]),
    ("network = 5\n", ["c.toml:1:", "network must be a table"]),
    ("[network\nport = 1\n", ["c.toml:1:9:", "invalid TOML"]),
    ("[network]\nport = 1\nport = 2\n", ["c.toml:3:", "invalid TOML"]),
    ("[network]\nbind_address = ''\n", ["bind_address", "must not be empty"]),
    ("[network]\nbind_address = 'two words'\n", ["bind_address", "not a valid host"]),
    ("[network]\nquic_enabled = 'yes'\n", ["quic_enabled", "expected true or false"]),
    ("[security]\nsecret_key = 'short'\n", ["c.toml:2:", "secret_key", "at least 16"]),
    ("[security]\nwhitelist = 'w1'\n", ["whitelist", "expected a list of strings"]),
    ("[security]\nwhitelist = ['w1', 2]\n", ["whitelist", "expected a list of strings"]),
    ("[storage]\ndb_url = 'mysql://h/db'\n", ["db_url", "postgresql://"]),
    ("[storage]\ndb_backup_frequency = 'sometimes'\n", ["db_backup_frequency", "hourly"]),
    ("[storage]\ndb_backup_frequency = '0h'\n", ["db_backup_frequency"]),
    ("[storage]\nlog_retention_days = 0\n", ["log_retention_days", "between 1 and 3650"]),
    ("[storage]\ntask_retention_hours = -1\n", ["task_retention_hours", "between 0 and 87600"]),
    ("[storage]\ntask_retention_hours = 87601\n", ["task_retention_hours", "between 0 and 87600"]),
    ("[storage]\ntask_retention_hours = nan\n", ["task_retention_hours", "finite"]),
    ("[storage]\ntask_retention_hours = inf\n", ["task_retention_hours", "finite"]),
    ("[storage]\ntask_retention_hours = '720'\n", ["task_retention_hours", "expected a number"]),
    ("[storage]\ntask_retention_hours = true\n", ["task_retention_hours", "expected a number"]),
    ("[storage]\nsqlite_synchronous = 'off'\n", ["sqlite_synchronous", "'full' or 'normal'"]),
    ("[performance]\nworker_threads = 0\n", ["worker_threads", "between 1 and 1024"]),
    ("[performance]\ntask_queue_size = -1\n", ["task_queue_size", "between 1 and 100000000"]),
    ("[performance]\nconnection_timeout = 0.1\n", ["connection_timeout", "between 0.5 and 3600"]),
    ("[performance]\nkeepalive_interval = nan\n", ["keepalive_interval", "finite"]),
    ("[limits]\ndefault_memory_mb = 63\n", ["default_memory_mb", "at least 64"]),
    ("[limits]\ndefault_timeout = 86401\n", ["default_timeout", "between 1 and 86400"]),
    ("[dispatcher]\nrole = 'leader'\n", ["role", "'primary' or 'standby'"]),
    ("[dispatcher]\nrole = 'standby'\n", ["role standby needs primary_addr", "c.toml:2"]),
    ("[dispatcher]\nprimary_addr = 'host'\n", ["primary_addr", "HOST:PORT"]),
    ("[dispatcher]\nreplication = 'eventual'\n", ["replication", "'sync' or 'async'"]),
    # a security minimum: every value that is not exactly a level is refused, never defaulted
    ("[dispatcher]\nclient_min_sandbox_level = 'paranoid'\n",
     ["c.toml:2:", "[dispatcher] client_min_sandbox_level", "'very-strict'", "paranoid"]),
    ("[dispatcher]\nclient_min_sandbox_level = ''\n",
     ["client_min_sandbox_level", "must be 'none', 'basic', 'strict' or 'very-strict'"]),
    ("[dispatcher]\nclient_min_sandbox_level = 'STRICT'\n", ["client_min_sandbox_level", "STRICT"]),
    ("[dispatcher]\nclient_min_sandbox_level = 'strict '\n", ["client_min_sandbox_level"]),
    ("[dispatcher]\nclient_min_sandbox_level = 2\n",
     ["client_min_sandbox_level", "expected a string"]),
    ("[dispatcher]\nclient_min_sandbox_level = true\n",
     ["client_min_sandbox_level", "expected a string"]),
    ("[dispatcher]\nclient_min_sandbox_level = ['strict']\n",
     ["client_min_sandbox_level", "expected a string"]),
    ("[worker]\nclient_min_sandbox_level = 'basic'\n",
     ['"client_min_sandbox_level" belongs in [dispatcher]']),
    ("[worker]\ndispatcher_addr = ['h:0']\n", ["dispatcher_addr", "between 1 and 65535"]),
    ("[worker]\ndispatcher_addr = [':5555']\n", ["dispatcher_addr", "HOST:PORT"]),
    ("[worker]\ndispatcher_addr = ['::1:5555']\n", ["dispatcher_addr", "brackets"]),
    ("[worker]\ndispatcher_addr = ['[::g]:5555']\n", ["dispatcher_addr", "IPv6"]),
    ("[worker]\ndispatcher_addr = 'h:1'\n", ["dispatcher_addr", "expected a list"]),
    ("[worker]\nlabels = { zone = 1 }\n", ["labels", "expected a table of strings"]),
    ("[worker]\nlabels = { 'bad key' = 'x' }\n", ["labels", "'bad key'"]),
    ("[worker]\nname = ''\n", ["name", "must not be empty"]),
    ("[worker]\ncpu_cores = 0\n", ["cpu_cores", "more than 0"]),
    ("[worker]\nmax_jobs = 10001\n", ["max_jobs", "between 1 and 10000"]),
    ("[worker]\nsandbox_level = 'paranoid'\n", ["sandbox_level", "'very-strict'"]),
    ("[worker]\ntransport = 'udp'\n", ["transport", "'quic'"]),
    ("[worker]\noutput_limit_kb = 0\n", ["output_limit_kb", "between 1 and 1048576"]),
    ("[worker]\ntask_user = 'a b'\n", ["task_user", "'a b' is not a user name or uid"]),
    ("[worker]\ntask_user = '-root'\n", ["task_user", "not a user name"]),
    ("[worker]\ntask_user = 0\n", ["task_user", "expected a string"]),
    ("[worker]\nsandbox_read_only_paths = ['/']\n",
     ["sandbox_read_only_paths", "the whole machine"]),
    ("[worker]\nsandbox_read_only_paths = ['/usr/..']\n",
     ["sandbox_read_only_paths", "the whole machine"]),
    ("[worker]\nsandbox_read_only_paths = ['opt/tools']\n",
     ["sandbox_read_only_paths", "'opt/tools' is not an absolute path"]),
    ("[worker]\nsandbox_read_only_paths = '/opt'\n",
     ["sandbox_read_only_paths", "expected a list"]),
    ("[worker]\ncontainment = 'docker'\n", ["containment", "'process-group'"]),
    ("[dispatcher]\ncontainment = 'auto'\n", ['"containment" belongs in [worker]']),
    ("[logging]\nlog_level = 'loud'\n", ["log_level", "'debug'"]),
    ("[logging]\nlog_format = 'xml'\n", ["log_format", "'json'"]),
    ("[api]\napi_url = 'ftp://h'\n", ["api_url", "http://"]),
    ("[api]\ntls_cert = '/c.pem'\n", ["tls_cert and tls_key", "c.toml:2"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "needles"), FILE_ERRORS)
def test_file_errors_name_file_line_and_key(sandbox: Env, text: str, needles: list[str]) -> None:
    message = sandbox.error(text)
    assert str(sandbox.root / "c.toml") in message
    assert all(n in message for n in needles), message
    assert "\n" not in message


def test_undecodable_file_is_an_error(sandbox: Env) -> None:
    path = sandbox.root / "bad.toml"
    path.write_bytes(b"[network]\nport = \xff\n")
    message = sandbox.error(config_file=str(path))
    assert str(path) in message and "UTF-8" in message


ENV_ERRORS = [
    ({"OCTASKLY_PORT": "abc"}, "OCTASKLY_PORT=abc: expected an integer"),
    ({"OCTASKLY_PORT": "70000"}, "OCTASKLY_PORT=70000: must be between 1 and 65535"),
    ({"OCTASKLY_API_PORT": ""}, "OCTASKLY_API_PORT=: expected an integer"),
    ({"OCTASKLY_GPU": "maybe"}, "OCTASKLY_GPU=maybe: expected true or false"),
    ({"OCTASKLY_CPU_CORES": "inf"}, "OCTASKLY_CPU_CORES=inf: expected a finite number"),
    ({"OCTASKLY_KEEPALIVE_INTERVAL": "x"}, "OCTASKLY_KEEPALIVE_INTERVAL=x: expected a number"),
    ({"OCTASKLY_LABELS": "a=b,novalue"}, "OCTASKLY_LABELS=a=b,novalue: expected KEY=VALUE"),
    ({"OCTASKLY_LABELS": "a=b,a=c"}, "OCTASKLY_LABELS=a=b,a=c: 'a' given twice"),
    ({"OCTASKLY_DISPATCHER_ADDR": "a:1,b"}, "OCTASKLY_DISPATCHER_ADDR=a:1,b: expected HOST:PORT"),
    ({"OCTASKLY_ROLE": "boss"}, "OCTASKLY_ROLE=boss: must be 'primary' or 'standby'"),
    ({"OCTASKLY_LOG_LEVEL": "loud"}, "OCTASKLY_LOG_LEVEL=loud: must be"),
    ({"OCTASKLY_DB_URL": "sqlite:///x"}, "OCTASKLY_DB_URL=sqlite:///x: must start with postgresql"),
    ({"OCTASKLY_TASK_RETENTION_HOURS": "abc"},
     "OCTASKLY_TASK_RETENTION_HOURS=abc: expected a number"),
    ({"OCTASKLY_TASK_RETENTION_HOURS": "-1"},
     "OCTASKLY_TASK_RETENTION_HOURS=-1: must be between 0 and 87600"),
    ({"OCTASKLY_TASK_RETENTION_HOURS": "nan"},
     "OCTASKLY_TASK_RETENTION_HOURS=nan: expected a finite number"),
    ({"OCTASKLY_TASK_RETENTION_HOURS": "1e9"},
     "OCTASKLY_TASK_RETENTION_HOURS=1e9: must be between 0 and 87600"),
    ({"OCTASKLY_LEASE_SECONDS": "2"}, "OCTASKLY_LEASE_SECONDS=2: must be between 3 and 600"),
    ({"OCTASKLY_LEASE_SECONDS": "inf"}, "OCTASKLY_LEASE_SECONDS=inf: expected a finite number"),
    ({"OCTASKLY_LEASE_SECONDS": "soon"}, "OCTASKLY_LEASE_SECONDS=soon: expected a number"),
    ({"OCTASKLY_DB_URL": "postgres://x@y/z"},
     "OCTASKLY_DB_URL=postgres://x@y/z: must start with postgresql"),
    ({"OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL": "max"},
     "OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL=max: must be 'none', 'basic', 'strict' or 'very-strict'"),
    # empty is not "unset": the key is not optional, and a security minimum is never guessed
    ({"OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL": ""}, "OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL=: must be"),
    ({"OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL": "very_strict"},
     "OCTASKLY_CLIENT_MIN_SANDBOX_LEVEL=very_strict: must be"),
    ({"OCTASKLY_TASK_USER": "root;id"}, "OCTASKLY_TASK_USER=root;id: 'root;id' is not a user"),
    ({"OCTASKLY_CONTAINMENT": "none"}, "OCTASKLY_CONTAINMENT=none: must be"),
    ({"OCTASKLY_SANDBOX_READ_ONLY_PATHS": "/opt,rel"},
     "OCTASKLY_SANDBOX_READ_ONLY_PATHS=/opt,rel: 'rel' is not an absolute path"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "expected"), ENV_ERRORS)
def test_env_errors_name_the_variable(sandbox: Env, env: dict[str, str], expected: str) -> None:
    assert sandbox.error(env=env).startswith(expected)


FLAG_ERRORS = [
    ({"port": "notanumber"}, "--port=notanumber: expected an integer"),
    ({"port": "0"}, "--port=0: must be between 1 and 65535"),
    ({"api_port": 1.5}, "--api-port=1.5: expected an integer"),
    ({"port": ["6000"]}, "--port=6000: expected an integer"),
    ({"labels": ["novalue"]}, "--label=novalue: expected KEY=VALUE"),
    ({"labels": ["=v"]}, "--label==v: expected KEY=VALUE"),
    ({"dispatcher_addr": ["nohostport"]}, "--dispatcher-addr=nohostport: expected HOST:PORT"),
    ({"require_auth": "maybe"}, "--require-auth=maybe: expected true or false"),
    ({"bind_address": "not an address"}, "--bind=not an address: "),
    ({"sandbox_level": "max"}, "--sandbox-level=max: must be"),
    ({"task_retention_hours": "abc"}, "--task-retention-hours=abc: expected a number"),
    ({"task_retention_hours": "-0.5"}, "--task-retention-hours=-0.5: must be between 0 and 87600"),
    ({"task_retention_hours": "NaN"}, "--task-retention-hours=NaN: expected a finite number"),
    ({"task_retention_hours": "99999"},
     "--task-retention-hours=99999: must be between 0 and 87600"),
    ({"lease_seconds": "601"}, "--lease-seconds=601: must be between 3 and 600"),
    ({"lease_seconds": "-5"}, "--lease-seconds=-5: must be between 3 and 600"),
    ({"db_url": "file:///etc/passwd"}, "--db-url=file:///etc/passwd: must start with postgresql"),
    ({"client_min_sandbox_level": "off"}, "--client-min-sandbox-level=off: must be"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "expected"), FLAG_ERRORS)
def test_flag_errors_name_the_flag(sandbox: Env, flags: dict[str, Any], expected: str) -> None:
    assert sandbox.error(flags=flags).startswith(expected)


def test_unknown_flag_key_is_an_error(sandbox: Env) -> None:
    assert "'prot'" in sandbox.error(flags={"prot": "1"})


def test_several_problems_mention_the_rest(sandbox: Env) -> None:
    message = sandbox.error("[limits]\ndefault_timeout = 0\ndefault_cpu_seconds = 0\n")
    assert "and 1 more problem" in message


# -- discovery ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"flag", "env", "cwd", "home", "system"}, "flag"),
        ({"env", "cwd", "home", "system"}, "env"),
        ({"cwd", "home", "system"}, "cwd"),
        ({"home", "system"}, "home"),
        ({"system"}, "system"),
        (set(), None),
    ],
)
def test_config_file_discovery_order(sandbox: Env, present: set[str], expected: str | None) -> None:
    places = {
        "flag": sandbox.root / "flag.toml",
        "env": sandbox.root / "env.toml",
        "cwd": sandbox.cwd / "octaskly.toml",
        "home": sandbox.home / ".octaskly" / "octaskly.toml",
        "system": sandbox.system,
    }
    ports = {name: 6000 + i for i, name in enumerate(places)}
    for name in present:
        places[name].parent.mkdir(parents=True, exist_ok=True)
        places[name].write_text(f"[network]\nport = {ports[name]}\n")
    loaded = sandbox.load(
        config_file=str(places["flag"]) if "flag" in present else None,
        env={"OCTASKLY_CONFIG": str(places["env"])} if "env" in present else {},
    )
    if expected is None:
        assert loaded.config_file is None and loaded.settings.network.port == 5555
    else:
        assert loaded.config_file == places[expected]
        assert loaded.settings.network.port == ports[expected]
        assert loaded.sources["port"] == f"file {places[expected]}:2"


def test_relative_config_path_is_relative_to_cwd(sandbox: Env) -> None:
    (sandbox.cwd / "mine.toml").write_text("[network]\nport = 6100\n")
    assert sandbox.load(config_file="mine.toml").settings.network.port == 6100


@pytest.mark.parametrize(
    ("config_file", "env", "via"),
    [("missing.toml", {}, "--config"), (None, {"OCTASKLY_CONFIG": "gone.toml"}, "OCTASKLY_CONFIG")],
)
def test_missing_explicit_file_is_an_error(
    sandbox: Env, config_file: str | None, env: dict[str, str], via: str
) -> None:
    (sandbox.cwd / "octaskly.toml").write_text("[network]\nport = 6000\n")
    message = sandbox.error(config_file=config_file, env=env)
    assert "does not exist" in message and via in message
    assert str(sandbox.cwd / (config_file or "gone.toml")) in message


def test_directory_as_config_file_is_an_error(sandbox: Env) -> None:
    assert "is not a file" in sandbox.error(config_file=str(sandbox.home))


def test_check_file(sandbox: Env) -> None:
    good = sandbox.write("[network]\nport = 6000\n", "good.toml")
    assert loading.check_file(good).network.port == 6000
    bad = sandbox.write("[network]\nport = 0\n", "bad.toml")
    with pytest.raises(errors.ConfigError, match=r"bad\.toml:2: \[network\] port"):
        loading.check_file(bad)


# -- environment ----------------------------------------------------------------------------
def test_unknown_env_vars_warn_and_product_vars_are_quiet(sandbox: Env) -> None:
    loaded = sandbox.load(
        env={
            "OCTASKLY_PROT": "1",
            "OCTASKLY_TASK_ID": "t-1",
            "OCTASKLY_ATTEMPT": "1",
            "OCTASKLY_WORKDIR": "/tmp/w",
            "PORT": "1",
            "octaskly_port": "abc",
        }
    )
    assert loaded.warnings == (
        'ignoring unknown environment variable OCTASKLY_PROT — did you mean "OCTASKLY_PORT"?',
    )
    assert loaded.settings.network.port == 5555


def test_client_variables_map_to_keys(sandbox: Env) -> None:
    loaded = sandbox.load(env={"OCTASKLY_API_URL": "http://d:3000/", "OCTASKLY_TOKEN": "tok-123"})
    assert loaded.settings.api.api_url == "http://d:3000"
    token = loaded.settings.api.token
    assert token is not None and token.get_secret_value() == "tok-123"
    assert loaded.warnings == ()


RUST_LOG = [
    ("info", "info", False),
    ("debug", "debug", False),
    ("trace", "debug", False),
    ("warn", "warning", False),
    ("WARN", "warning", False),
    ("error", "error", False),
    ("off", "error", False),
    ("trace,octaskly=debug", "debug", False),
    ("octaskly=warn,info", "warning", False),
    ("info,octaskly::worker=error", "error", False),
    ("octaskly", "debug", False),
    ("hyper=debug", None, False),
    ("info/some.*regex", "info", False),
    ("verbose", None, True),
    ("octaskly=loud", None, True),
    ("info,=debug", "info", True),
]


@pytest.mark.parametrize(("text", "level", "warns"), RUST_LOG)
def test_rust_log_alias(sandbox: Env, text: str, level: str | None, warns: bool) -> None:
    assert loading.parse_rust_log(text)[0] == level
    loaded = sandbox.load(env={"RUST_LOG": text})
    assert loaded.settings.logging.log_level == (level or "info")
    assert loaded.sources["log_level"] == ("env RUST_LOG" if level else "default")
    assert bool(loaded.warnings) == warns
    if warns:
        assert loaded.warnings[0].startswith(f"RUST_LOG={text}: ignoring")


@pytest.mark.parametrize(
    ("text", "env", "flags", "level", "source"),
    [
        ("[logging]\nlog_level = 'error'\n", {"RUST_LOG": "debug"}, {}, "debug", "env RUST_LOG"),
        (None, {"RUST_LOG": "debug", "OCTASKLY_LOG_LEVEL": "warning"}, {}, "warning", "env"),
        (None, {"RUST_LOG": "debug"}, {"log_level": "error"}, "error", "flag --log-level"),
    ],
)
def test_rust_log_precedence(
    sandbox: Env,
    text: str | None,
    env: dict[str, str],
    flags: dict[str, Any],
    level: str,
    source: str,
) -> None:
    loaded = sandbox.load(text, env=env, flags=flags)
    assert loaded.settings.logging.log_level == level
    assert loaded.sources["log_level"].startswith(source)
