"""Batch submits from a file with progress, `submit --wait` on a terminal, and
`octaskly top` — against a real dispatcher and worker; a pseudo-terminal where the
terminal behaviour is the point."""

from __future__ import annotations

import os
import pty
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import procs
from tests.e2e.procs import (
    OCTASKLY,
    SECRET,
    client_env,
    free_port,
    http,
    run,
    start,
    wait_for,
    wait_healthy,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    env = procs.clean_env(OCTASKLY_SECRET_KEY=SECRET)
    with procs.processes() as ps:
        ps.append(
            start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data)],
                cwd=tmp_path, env=env,
            )
        )  # fmt: skip
        wait_healthy(api, ps[0], data_dir=data)
        ps.append(
            start(
                ["worker", "--name", "w1", "--dispatcher-addr", f"127.0.0.1:{port}",
                 "--max-jobs", "4", "--transport", "tcp"],
                cwd=tmp_path, env=env,
            )
        )  # fmt: skip
        wait_for(lambda: len(http("GET", f"{api}/api/v1/workers")[1]["workers"]) == 1)
        yield api


def _in_pty(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin/stdout/stderr; (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(10), out.decode(errors="replace")


def test_batch_submit_from_a_file_reports_progress_in_plain_lines(
    cluster: str, tmp_path: Path
) -> None:
    commands = tmp_path / "commands.txt"
    commands.write_text("true\n\necho two\nexit 2\necho four\n  \ntrue\n")
    result = run(
        ["submit", "--from-file", str(commands), "--wait"], cwd=tmp_path, env=client_env(cluster)
    )
    ids = result.stdout.split()
    assert len(ids) == 5
    assert "5/5 finished (1 not completed)" in result.stderr
    assert "failed" in result.stderr
    assert result.returncode == 1  # one did not complete
    states = [http("GET", f"{cluster}/api/v1/tasks/{i}")[1]["status"] for i in ids]
    assert states.count("completed") == 4 and states.count("failed") == 1


def test_on_a_terminal_batch_wait_shows_a_progress_bar(cluster: str, tmp_path: Path) -> None:
    commands = tmp_path / "commands.txt"
    commands.write_text("".join(f"sleep 0.{i}\n" for i in range(1, 9)))
    code, out = _in_pty(
        [*OCTASKLY, "submit", "--from-file", str(commands), "--wait"],
        env={**client_env(cluster), "TERM": "xterm", "COLUMNS": "100"},
        cwd=tmp_path,
    )
    print(out[-500:])
    assert code == 0
    assert "8/8" in out and "━" in out  # rich's bar, counting to the end


def test_single_wait_on_a_terminal_and_top(cluster: str, tmp_path: Path) -> None:
    code, out = _in_pty(
        [*OCTASKLY, "submit", "--wait", "--", "echo", "hello from a tty"],
        env={**client_env(cluster), "TERM": "xterm"},
        cwd=tmp_path,
    )
    assert code == 0 and "hello from a tty" in out
    top = run(
        ["top", "--iterations", "2", "--interval", "0.2"], cwd=tmp_path, env=client_env(cluster)
    )
    assert top.returncode == 0, top.stderr
    print(top.stdout)
    assert top.stdout.count("octaskly top") == 2  # two frames, one after the other (a pipe)
    assert "w1" in top.stdout and "queued" in top.stdout and "completed" in top.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "--from-file", "/nonexistent/commands.txt"],
        ["submit", "--from-file", "EMPTY"],
        ["submit", "--from-file", "EMPTY", "--", "echo", "both"],
        ["top", "--interval", "0"],
        ["top", "--iterations", "0"],
    ],
)
def test_bad_progress_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    argv = [str(empty) if a == "EMPTY" else a for a in args]
    result = run(argv, cwd=tmp_path, env=client_env(f"http://127.0.0.1:{free_port()}"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()
