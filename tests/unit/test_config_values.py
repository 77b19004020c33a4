"""Pure pieces of the configuration layer: line index, addresses, derived paths, registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from octaskly.config import files, registry, settings


def test_index_lines_skips_multiline_strings() -> None:
    text = 'a = """\nport = 1\n"""\n[network]\nport = 2\n[ "x" . y ]\n\'k\'.z = 1\n'
    lines = files.index_lines(text)
    assert lines[("network", "port")] == 5
    assert ("port",) not in lines
    assert lines[("x", "y", "k", "z")] == 7


# -- addresses and derived paths ------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dispatcher:5555", ("dispatcher", 5555)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[2001:DB8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert settings.parse_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    ["host", "host:", ":5555", "host:0", "host:65536", "host:-1", "host:http", "::1:5555",
     "[::1]", "[zz::1]:5", "bad host:5", "a_b..c:5 "],
)  # fmt: skip
def test_parse_addr_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        settings.parse_addr(text)


@pytest.mark.parametrize(
    ("frequency", "seconds"),
    [("hourly", 3600), ("daily", 86400), ("weekly", 604800), ("6h", 21600), ("30m", 1800)],
)
def test_backup_frequency(frequency: str, seconds: int) -> None:
    assert settings.backup_interval(frequency) == seconds


def test_data_dir_resolution(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plain = settings.Settings()
    assert plain.data_dir(home) == home / ".octaskly"
    assert plain.db_file(home) == home / ".octaskly" / "octaskly.db"
    by_db = settings.Settings.model_validate({"storage": {"db_path": "/srv/q/data.db"}})
    assert by_db.data_dir(home) == Path("/srv/q")
    assert by_db.db_file(home) == Path("/srv/q/data.db")
    both = settings.Settings.model_validate(
        {"storage": {"db_path": "/srv/q/data.db", "data_dir": "/var/lib/octaskly"}}
    )
    assert both.data_dir(home) == Path("/var/lib/octaskly")
    assert both.db_file(home) == Path("/srv/q/data.db")
    only_dir = settings.Settings.model_validate({"storage": {"data_dir": "/var/lib/o"}})
    assert only_dir.db_file(home) == Path("/var/lib/o/octaskly.db")


def test_settings_are_frozen() -> None:
    s = settings.Settings()
    with pytest.raises(ValueError):
        s.network.port = 1  # type: ignore[misc]


def test_every_key_has_a_description_and_unique_env() -> None:
    assert all(key.description for key in registry.KEYS.values())
    envs = [key.env for key in registry.KEYS.values()]
    assert len(envs) == len(set(envs))
    assert registry.KEYS["api_port"].env == "OCTASKLY_API_PORT"
