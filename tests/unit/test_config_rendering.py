"""Secrets, the argparse flags, the default template and `config show` output."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest

from octaskly import errors
from octaskly.config import loading, registry, settings, template

SECRET = "hunter2-but-much-longer-0123"
TOKEN = "tok-abcdef-very-private"
NOWHERE = Path("/nonexistent/octaskly.toml")


def _load(tmp_path: Path, **kwargs: Any) -> loading.Loaded:
    kwargs.setdefault("flags", {})
    kwargs.setdefault("env", {})
    return loading.load(cwd=tmp_path, home=tmp_path, system_config=NOWHERE, **kwargs)


# -- secrets --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "env", "text"),
    [
        ({"secret_key": SECRET, "token": TOKEN}, {}, None),
        ({}, {"OCTASKLY_SECRET_KEY": SECRET, "OCTASKLY_TOKEN": TOKEN}, None),
        ({}, {}, f"[security]\nsecret_key = '{SECRET}'\n[api]\ntoken = '{TOKEN}'\n"),
    ],
)
def test_secrets_never_shown(
    tmp_path: Path, flags: dict[str, Any], env: dict[str, str], text: str | None
) -> None:
    config = None
    if text is not None:
        config = tmp_path / "c.toml"
        config.write_text(text)
    loaded = _load(tmp_path, flags=flags, env=env, config_file=config and str(config))
    assert loaded.settings.secret_bytes() == SECRET.encode()
    shown = [
        repr(loaded.settings),
        str(loaded.settings),
        repr(loaded),
        str(loaded.sources),
        template.render_effective(loaded, tmp_path),
        loaded.settings.model_dump_json(),
    ]
    for text_out in shown:
        assert SECRET not in text_out and TOKEN not in text_out
    effective = template.render_effective(loaded, tmp_path)
    assert 'secret_key = "********"' in effective and 'token = "********"' in effective


@pytest.mark.parametrize(
    ("env", "flags"),
    [({"OCTASKLY_SECRET_KEY": "short-secret"}, {}), ({}, {"secret_key": "short-secret"})],
)
def test_short_secret_error_does_not_echo_it(
    tmp_path: Path, env: dict[str, str], flags: dict[str, Any]
) -> None:
    with pytest.raises(errors.ConfigError) as info:
        _load(tmp_path, env=env, flags=flags)
    assert "short-secret" not in str(info.value)
    message = str(info.value)
    assert "secret_key" in message.lower().replace("-", "_") and "at least 16" in message


def test_short_secret_in_file_error_does_not_echo_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[security]\nsecret_key = 'short-secret'\n")
    with pytest.raises(errors.ConfigError) as info:
        _load(tmp_path, config_file=str(config))
    assert "short-secret" not in str(info.value) and "c.toml:2" in str(info.value)


def test_db_url_password_is_masked(tmp_path: Path) -> None:
    loaded = _load(tmp_path, env={"OCTASKLY_DB_URL": "postgresql://app:pw-9x7@db/octaskly"})
    effective = template.render_effective(loaded, tmp_path)
    assert "pw-9x7" not in effective
    assert "postgresql://app:********@db/octaskly" in effective


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"file-secret-0123456789\n", b"file-secret-0123456789"),
        (b"file-secret-0123456789\r\n", b"file-secret-0123456789"),
        (b"file-secret-0123456789\n\n", b"file-secret-0123456789"),
        (b"  spaced-secret-0123456789", b"  spaced-secret-0123456789"),
        (b"new-secret-0123456789\nold-secret-0123456789\n", b"new-secret-0123456789"),
    ],
)
def test_secret_key_file_is_its_first_line(tmp_path: Path, content: bytes, expected: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    loaded = _load(tmp_path, flags={"secret_key_file": str(path)})
    assert loaded.settings.secret_bytes() == expected
    assert loaded.settings.secret_file_or(tmp_path / "other") == path
    keys = loaded.settings.secret_keys()
    assert keys is not None and keys[0] == expected  # the current key; later lines: accepted


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), (b"\n", "empty"), (b"short-key\n", "at least 16 characters")],
)
def test_bad_secret_key_file_names_the_file(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    loaded = _load(tmp_path, env={"OCTASKLY_SECRET_KEY_FILE": str(path)})
    with pytest.raises(errors.ConfigError) as info:
        loaded.settings.secret_bytes()
    assert str(path) in str(info.value) and problem in str(info.value)


def test_no_secret_configured(tmp_path: Path) -> None:
    s = _load(tmp_path).settings
    assert s.secret_bytes() is None
    assert s.secret_file_or(tmp_path / "gen.key") == tmp_path / "gen.key"


# -- argparse -------------------------------------------------------------------------------
def _parser(keys: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", add_help=False)
    parser.add_argument("--config")
    loading.add_flags(parser, keys)
    return parser


def test_flags_reach_load_only_when_passed(tmp_path: Path) -> None:
    parser = _parser(["port", "api_port", "bind_address", "labels", "gpu", "dispatcher_addr"])
    ns = parser.parse_args(
        ["--port", "6000", "--bind", "127.0.0.1", "--label", "a=b", "--label", "c=d",
         "--gpu", "false", "--dispatcher-addr", "h1:1,h2:2", "--dispatcher-addr", "[::1]:3"]
    )  # fmt: skip
    flags = loading.flags_from_namespace(ns)
    assert set(flags) == {"port", "bind_address", "labels", "gpu", "dispatcher_addr"}
    loaded = _load(tmp_path, flags=flags, env={"OCTASKLY_API_PORT": "3100"})
    s = loaded.settings
    assert (s.network.port, s.network.api_port, s.network.bind_address) == (6000, 3100, "127.0.0.1")
    assert s.worker.labels == {"a": "b", "c": "d"}
    assert s.worker.gpu is False
    assert s.worker.dispatcher_addr == ("h1:1", "h2:2", "[::1]:3")
    assert loaded.sources["labels"] == "flag --label"
    assert loaded.sources["bind_address"] == "flag --bind"


def test_flags_do_not_collide_with_other_options() -> None:
    parser = _parser(["api_url"])
    parser.add_argument("--cpu-cores", type=float, default=None)
    ns = parser.parse_args(["--cpu-cores", "2", "--config", "x.toml"])
    assert loading.flags_from_namespace(ns) == {}


def test_help_names_variable_and_default() -> None:
    text = _parser(["api_port", "require_auth", "labels", "worker_threads"]).format_help()
    flat = " ".join(text.split())
    assert "--api-port PORT" in flat and "env OCTASKLY_API_PORT, default 3000" in flat
    assert "--require-auth true|false" in flat and "default true" in flat
    assert "--label KEY=VALUE" in flat and "repeatable" in flat
    assert "default number of CPUs" in flat


def test_every_key_can_be_a_flag() -> None:
    parser = _parser(list(registry.KEYS))
    ns = parser.parse_args(["--memory", "4096", "--bind-address", "::"])
    assert loading.flags_from_namespace(ns) == {"memory": "4096", "bind_address": "::"}


# -- template and show ----------------------------------------------------------------------
def test_default_template_round_trips(tmp_path: Path) -> None:
    text = template.render_default_toml()
    config = tmp_path / "octaskly.toml"
    config.write_text(text)
    loaded = _load(tmp_path, config_file=str(config))
    assert loaded.settings == settings.Settings()
    assert loaded.settings.secret_bytes() is None
    data = tomllib.loads(text)
    assert set(data) == set(registry.TABLES)
    for key in registry.KEYS.values():
        assert f"{key.env}," in text
        assert f"\n{key.name} = " in text or f"\n# {key.name} = " in text
        if key.name in data[key.table]:
            assert loaded.sources[key.name].startswith(f"file {config}:")
        else:
            assert key.default() is None or key.name in registry.DYNAMIC_DEFAULTS


def test_uncommenting_template_examples_gives_a_valid_file(tmp_path: Path) -> None:
    """Every commented example is valid on its own (exclusive pairs left out)."""
    text = template.render_default_toml()
    for name in ("secret_key_file", "db_url"):
        text = text.replace(f"# {name} = ", f"# skipped {name} ")
    text = text.replace("# role standby", "")
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines()
    )
    config = tmp_path / "all.toml"
    config.write_text(uncommented)
    s = loading.check_file(config)
    assert s.worker.name == "worker-1" and s.api.tls_cert is not None


def test_effective_shows_every_key_with_its_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[worker]\nmax_jobs = 3\n")
    loaded = _load(
        tmp_path,
        config_file=str(config),
        env={"OCTASKLY_API_PORT": "3100"},
        flags={"port": "6000"},
    )
    text = template.render_effective(loaded, tmp_path)
    assert f"config file: {config}" in text
    assert "port = 6000  # flag --port" in text
    assert "api_port = 3100  # env OCTASKLY_API_PORT" in text
    assert f"max_jobs = 3  # file {config}:2" in text
    assert "# name = (not set; host name)  # default" in text
    assert f"# data dir: {tmp_path / '.octaskly'}" in text
    for key in registry.KEYS:
        assert f"\n{key} = " in text or f"\n# {key} = " in text
