"""Running task commands in real subprocesses: isolation, limits, output, kills, leaks."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from octaskly import executing
from octaskly.domain import models
from octaskly.executing import running

# PID 1 here does not reap orphans, so killed processes linger as zombies and
# `os.killpg(pgid, 0)` keeps succeeding: count live (non-zombie) members instead.


def live_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until_group_dead(pgid: int, timeout: float = 5.0) -> None:
    """Poll with a deadline: SIGKILLed processes need a moment to finish exiting."""
    deadline = time.monotonic() + timeout
    while members := live_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {pgid} still has live members {members}")
        await asyncio.sleep(0.01)


def make_request(tmp_path: Path, command: str, **overrides: Any) -> executing.ExecRequest:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "attempt": 1,
        "command": command,
        "env": {},
        "timeout": 30.0,
        "workdir_root": tmp_path / "work",
    }
    fields.update(overrides)
    return executing.ExecRequest(**fields)


async def run(
    tmp_path: Path, command: str, *, execution: dict[str, Any] | None = None, **overrides: Any
) -> executing.ExecResult:
    job = executing.Execution(make_request(tmp_path, command, **overrides), **(execution or {}))
    # A hang fails in seconds rather than at the suite's 120 s timeout.
    return await asyncio.wait_for(job.run(), 20)


def leftovers(tmp_path: Path) -> list[str]:
    root = tmp_path / "work"
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.fixture
def restore_child_watcher() -> Iterator[None]:
    if sys.version_info >= (3, 12):  # child watchers are deprecated there
        yield
        return
    policy = asyncio.get_event_loop_policy()
    saved = policy.get_child_watcher()
    yield
    policy.set_child_watcher(saved)


# -- how the command runs ---------------------------------------------------------------


async def test_runs_in_its_own_session_with_devnull_stdin_in_a_fresh_workdir(
    tmp_path: Path,
) -> None:
    command = "echo $$; cut -d' ' -f5,6 /proc/$$/stat; readlink /proc/$$/fd/0; pwd; ls -A"
    job = executing.Execution(make_request(tmp_path, command, task_id="t/42", attempt=3))
    result = await job.run()
    assert result.status == "completed", result
    pid, group_and_session, stdin, cwd = result.stdout.splitlines()  # `ls -A`: nothing
    assert int(pid) == job.pid
    assert group_and_session.split() == [pid, pid]  # its own process group and session
    assert stdin == "/dev/null"
    workdir = Path(cwd)
    assert workdir.parent == tmp_path / "work"
    assert workdir.name.startswith("octaskly-t_42-3-")
    assert not workdir.exists()  # removed afterwards
    assert leftovers(tmp_path) == []


async def test_workdir_with_files_is_removed_even_after_a_kill(tmp_path: Path) -> None:
    command = "mkdir -p a/b && echo x > a/b/f && ln -s / root && echo ready; sleep 1000"
    result = await run(tmp_path, command, timeout=0.5, execution={"kill_grace": 0.2})
    assert result.status == "timed_out"
    assert result.stdout == "ready\n"
    assert leftovers(tmp_path) == []
    assert Path("/").exists()  # the symlink was removed, not followed


async def test_deferred_cleanup_keeps_the_workdir_until_asked(tmp_path: Path) -> None:
    """The worker reports first and removes the workdir afterwards."""
    job = executing.Execution(make_request(tmp_path, "echo kept > f; pwd"))
    result = await job.run(cleanup=False)
    workdir = Path(result.stdout.strip())
    assert (workdir / "f").read_text() == "kept\n"
    await job.cleanup()
    assert not workdir.exists() and leftovers(tmp_path) == []
    await job.cleanup()  # idempotent


async def pooled(tmp_path: Path, pool: executing.Workdirs, command: str) -> Path:
    """Run `command` in a pooled workdir the way a worker does; the workdir it ran in."""
    job = executing.Execution(make_request(tmp_path, f"pwd; {command}"), workdirs=pool)
    result = await asyncio.wait_for(job.run(), 20)
    assert result.status == "completed", result
    await job.cleanup()
    return Path(result.stdout.splitlines()[0])


async def test_pooled_workdirs_are_reused_only_while_clean(tmp_path: Path) -> None:
    pool = executing.Workdirs(tmp_path / "work", keep=2)
    first = await pooled(tmp_path, pool, 'test -z "$(ls -A)"')
    assert await pooled(tmp_path, pool, 'test -z "$(ls -A)"') == first  # reused
    assert stat_mode(first) == 0o700
    # Files left behind: that directory goes, the next run starts in a new empty one.
    assert await pooled(tmp_path, pool, "echo x > left") == first
    assert not first.exists()
    second = await pooled(tmp_path, pool, 'test -z "$(ls -A)"')
    assert second != first
    # Permissions changed by the task: not reused either.
    assert await pooled(tmp_path, pool, "chmod 755 .") == second
    assert not second.exists()
    # A run that replaces its own directory by a symlink: the link is dropped, never
    # followed, and its target keeps its files.
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    third = await pooled(tmp_path, pool, f"d=$(pwd); cd / && rmdir $d && ln -s {target} $d")
    assert not os.path.lexists(third) and (target / "keep").read_text() == "x"
    pool.close()
    assert leftovers(tmp_path) == []


async def test_concurrent_pooled_runs_never_share_a_workdir(tmp_path: Path) -> None:
    pool = executing.Workdirs(tmp_path / "work", keep=3)
    for _ in range(3):
        dirs = await asyncio.gather(*(pooled(tmp_path, pool, "sleep 0.05") for _ in range(5)))
        assert len(set(dirs)) == 5
    assert len(leftovers(tmp_path)) == 3, "only `keep` free directories stay"
    pool.close()
    assert leftovers(tmp_path) == []


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_workdir_root_is_created_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "root"
    result = await run(tmp_path, "pwd", workdir_root=root)
    assert result.status == "completed"
    assert Path(result.stdout.strip()).parent == root
    assert os.listdir(root) == []


async def test_workdir_creation_failure_is_a_failed_result(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = await run(tmp_path, "echo never", workdir_root=not_a_dir)
    assert result.status == "failed"
    assert result.exit_code is None
    assert result.error is not None
    assert result.error.startswith("could not start: cannot create a workdir")


async def test_spawn_failure_is_a_failed_result_and_leaves_nothing(tmp_path: Path) -> None:
    result = await run(tmp_path, "echo never", env={"BAD": "nul\0byte"})
    assert result.status == "failed"
    assert result.exit_code is None
    assert result.error is not None
    assert result.error.startswith("could not start:")
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_workdir_is_removed_when_the_task_made_it_unwritable() -> None:
    # Only a non-root worker is blocked by directories without write permission.
    root = Path(tempfile.mkdtemp())
    try:
        os.chown(root, 65534, 65534)
        script = textwrap.dedent(f"""
            import asyncio, pathlib
            from octaskly import executing
            request = executing.ExecRequest(
                task_id="t", attempt=0, env={{}}, timeout=30,
                workdir_root=pathlib.Path({str(root)!r}),
                command="mkdir -p a/b && touch a/b/f && chmod 0 a/b && chmod 500 a")
            result = asyncio.run(executing.Execution(request).run())
            assert result.status == "completed", result
            """)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        subprocess.run([*nobody, sys.executable, "-c", script], check=True, timeout=60)
        assert os.listdir(root) == []
    finally:
        shutil.rmtree(root)


# -- environment ------------------------------------------------------------------------------


async def test_worker_variables_never_reach_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCTASKLY_SECRET_KEY", "the-cluster-secret")
    monkeypatch.setenv("OCTASKLY_API_URL", "http://example:3000")
    monkeypatch.setenv("octaskly_token", "lower-case-too")
    monkeypatch.setenv("KEEP_ME", "kept")
    result = await run(tmp_path, "env", env={"FOO": "bar", "KEEP_ME": "overridden"}, attempt=4)
    assert result.status == "completed"
    variables = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert "the-cluster-secret" not in result.stdout
    assert "OCTASKLY_SECRET_KEY" not in variables
    assert "OCTASKLY_API_URL" not in variables
    assert "octaskly_token" not in variables
    assert variables["FOO"] == "bar"
    assert variables["KEEP_ME"] == "overridden"  # the task's env wins over the base
    assert variables["HOME"] == os.environ["HOME"]
    assert variables["PATH"] == os.environ["PATH"]
    assert variables["OCTASKLY_TASK_ID"] == "task-1"
    assert variables["OCTASKLY_ATTEMPT"] == "4"
    assert Path(variables["OCTASKLY_WORKDIR"]).parent == tmp_path / "work"


async def test_base_env_replaces_the_process_environment(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/home/someone", "OCTASKLY_SECRET_KEY": "s"}
    result = await run(
        tmp_path, 'echo "$HOME $PATH ${OCTASKLY_SECRET_KEY-unset}"', execution={"base_env": base}
    )
    assert result.stdout == "/home/someone /usr/bin:/bin unset\n"


@pytest.mark.parametrize("level", [models.SandboxLevel.BASIC, models.SandboxLevel.STRICT])
async def test_an_environment_larger_than_a_pipe_reaches_the_task_whole(
    reachable_tmp: Path, level: models.SandboxLevel
) -> None:
    # 12 variables of 30 KiB (quotes and $ in them): more than a pipe holds at once, so the
    # worker writes the rest while the task's shell reads it
    env = {f"BIG{i}": chr(ord("a") + i) * (30 * 1024) + f"'$end{i}" for i in range(12)}
    command = (
        "for i in 0 1 2 3 4 5 6 7 8 9 10 11; do eval \"printf '%s ' \\${#BIG$i}\"; done; "
        'echo; sh -c \'printf "%s\\n" "$BIG11"\' | tail -c 8'
    )
    result = await run(reachable_tmp, command, env=env, sandbox_level=level)
    assert result.status == "completed", result
    lengths, tail = result.stdout.split("\n")[:2]
    assert lengths.split() == [str(30 * 1024 + len(f"'$end{i}")) for i in range(12)], lengths
    assert tail == "'$end11", result.stdout[-40:]


# -- exit statuses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "status", "exit_code", "error"),
    [
        ("exit 0", "completed", 0, None),
        ("true", "completed", 0, None),
        ("exit 3", "failed", 3, "exit status 3"),
        ("no-such-command-octaskly", "failed", 127, "exit status 127 (command not found)"),
        ("kill -KILL $$", "failed", 137, "killed by signal SIGKILL"),
        ("kill -TERM $$", "failed", 143, "killed by signal SIGTERM"),
    ],
)
async def test_exit_status(
    tmp_path: Path, command: str, status: str, exit_code: int, error: str | None
) -> None:
    result = await run(tmp_path, command)
    assert (result.status, result.exit_code, result.error) == (status, exit_code, error)


async def test_command_not_found_says_so_on_stderr(tmp_path: Path) -> None:
    result = await run(tmp_path, "no-such-command-octaskly")
    assert "not found" in result.stderr


# -- timeouts, cancellation, leftovers -------------------------------------------------------


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    job = executing.Execution(make_request(tmp_path, "sleep 1000 & sleep 1000; wait", timeout=0.3))
    result = await job.run()
    assert result.status == "timed_out"
    assert result.error == "timed out after 0.3s"
    assert result.exit_code == 128 + signal.SIGTERM  # TERM first
    assert result.duration_ms >= 300
    assert job.pid is not None
    await until_group_dead(job.pid)
    assert leftovers(tmp_path) == []


async def test_timeout_kills_processes_that_ignore_sigterm(tmp_path: Path) -> None:
    command = "trap '' TERM; sleep 1000 & sleep 1000; wait"
    job = executing.Execution(make_request(tmp_path, command, timeout=0.3), kill_grace=0.2)
    result = await asyncio.wait_for(job.run(), 20)
    assert result.status == "timed_out"
    assert result.exit_code == 128 + signal.SIGKILL  # TERM was ignored, KILL after the grace
    assert job.pid is not None
    await until_group_dead(job.pid)


async def test_background_orphans_are_killed_when_the_shell_exits(tmp_path: Path) -> None:
    job = executing.Execution(make_request(tmp_path, "sleep 100 & echo $!; echo done"))
    result = await asyncio.wait_for(job.run(), 20)
    assert result.status == "completed"
    orphan, done = result.stdout.split()
    assert done == "done"
    assert job.pid is not None
    await until_group_dead(job.pid)
    assert not is_alive(int(orphan))


async def test_a_process_that_left_the_group_does_not_hang_the_run(tmp_path: Path) -> None:
    # The shell waits until the escapee is in its own session, so the group kill misses it.
    pidfile = tmp_path / "escaped.pid"
    command = (
        f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 100' & "
        f"until [ -s {pidfile} ]; do sleep 0.01; done; echo done"
    )
    job = executing.Execution(make_request(tmp_path, command), drain_timeout=0.2)
    try:
        result = await asyncio.wait_for(job.run(), 20)
        assert (result.status, result.stdout) == ("completed", "done\n")
        # It escaped and still holds the output pipes, yet run() returned.
        assert is_alive(int(pidfile.read_text()))
    finally:
        if pidfile.exists():
            escaped = int(pidfile.read_text())
            if os.getsid(escaped) == escaped:  # still our escapee, not a reused pid
                os.kill(escaped, signal.SIGKILL)


async def test_cancel_while_running_kills_the_group(tmp_path: Path) -> None:
    started = asyncio.Event()
    job = executing.Execution(
        make_request(tmp_path, "echo started; sleep 1000 & sleep 1000; wait"),
        on_output=lambda stream, data: started.set(),
    )
    running_job = asyncio.create_task(job.run())
    await asyncio.wait_for(started.wait(), 20)
    job.cancel()
    job.cancel()  # idempotent
    result = await asyncio.wait_for(running_job, 20)
    assert (result.status, result.error) == ("cancelled", "cancelled")
    assert result.stdout == "started\n"
    assert job.pid is not None
    await until_group_dead(job.pid)
    assert leftovers(tmp_path) == []
    job.cancel()  # after the end: no effect


async def test_cancel_before_start_spawns_nothing(tmp_path: Path) -> None:
    job = executing.Execution(make_request(tmp_path, "touch /should-not-exist-octaskly"))
    job.cancel()
    result = await job.run()
    assert (result.status, result.exit_code, result.error) == ("cancelled", None, "cancelled")
    assert job.pid is None
    assert not (tmp_path / "work").exists()


async def test_cancelling_the_awaiting_task_still_kills_the_group(tmp_path: Path) -> None:
    started = asyncio.Event()
    job = executing.Execution(
        make_request(tmp_path, "echo started; sleep 1000"), on_output=lambda s, d: started.set()
    )
    running_job = asyncio.create_task(job.run())
    await asyncio.wait_for(started.wait(), 20)
    running_job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running_job
    assert job.pid is not None
    await until_group_dead(job.pid)
    assert leftovers(tmp_path) == []


async def test_an_execution_runs_once(tmp_path: Path) -> None:
    job = executing.Execution(make_request(tmp_path, "true"))
    await job.run()
    with pytest.raises(RuntimeError):
        await job.run()


# -- output -------------------------------------------------------------------------------------


async def test_keeps_exactly_the_tail_and_counts_what_was_dropped(tmp_path: Path) -> None:
    chunks: list[bytes] = []
    result = await run(
        tmp_path,
        "yes | head -c 5000000",
        output_limit=1000,
        execution={"on_output": lambda stream, data: chunks.append(data)},
    )
    assert result.status == "completed"
    assert result.stdout == "y\n" * 500
    assert result.stdout_dropped == 4_999_000
    assert b"".join(chunks) == b"y\n" * 2_500_000  # streamed live, in full


async def test_big_output_does_not_grow_memory(tmp_path: Path) -> None:
    limit = 1 << 20
    tracemalloc.start()
    try:
        result = await run(tmp_path, "head -c 20000000 /dev/zero | tr '\\0' x", output_limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stdout == "x" * limit
    assert result.stdout_dropped == 20_000_000 - limit
    assert peak < 6 * limit  # the tail plus a few read chunks, far below the 20 MB


async def test_streams_are_told_apart(tmp_path: Path) -> None:
    seen: list[tuple[str, bytes]] = []
    result = await run(
        tmp_path,
        "echo out; echo err >&2",
        execution={"on_output": lambda s, d: seen.append((s, d))},
    )
    assert (result.stdout, result.stderr) == ("out\n", "err\n")
    assert sorted(seen) == [("stderr", b"err\n"), ("stdout", b"out\n")]


async def test_binary_output_is_kept_exactly_and_its_text_view_replaces_it(
    tmp_path: Path,
) -> None:
    result = await run(tmp_path, r"printf '\377\376abc\200'; printf '\303' >&2")
    assert result.status == "completed"
    assert (result.stdout_bytes, result.stderr_bytes) == (b"\xff\xfeabc\x80", b"\xc3")
    assert result.stdout == "\ufffd\ufffdabc\ufffd"
    assert result.stderr == "\ufffd"


async def test_every_byte_value_comes_back_exactly(tmp_path: Path) -> None:
    every = bytes(range(256))
    command = (
        f"{sys.executable} -c 'import sys; sys.stdout.buffer.write(bytes(range(256))); "
        "sys.stderr.buffer.write(bytes(reversed(range(256))))'"
    )
    result = await run(tmp_path, command, output_limit=200)
    assert result.status == "completed", result
    assert (result.stdout_bytes, result.stdout_dropped) == (every[-200:], 56)
    assert (result.stderr_bytes, result.stderr_dropped) == (every[::-1][-200:], 56)


async def test_flooding_both_streams_at_once_does_not_deadlock(tmp_path: Path) -> None:
    command = (
        "head -c 3000000 /dev/zero | tr '\\0' e >&2 & head -c 3000000 /dev/zero | tr '\\0' o; wait"
    )
    result = await run(tmp_path, command, output_limit=1000)
    assert result.status == "completed"
    assert (result.stdout, result.stdout_dropped) == ("o" * 1000, 2_999_000)
    assert (result.stderr, result.stderr_dropped) == ("e" * 1000, 2_999_000)


async def test_a_failing_output_callback_does_not_break_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(stream: str, data: bytes) -> None:
        raise RuntimeError("consumer bug")

    with caplog.at_level(logging.ERROR, logger=running.__name__):
        result = await run(tmp_path, "echo a; echo b >&2", execution={"on_output": broken})
    assert (result.status, result.stdout, result.stderr) == ("completed", "a\n", "b\n")
    assert len([r for r in caplog.records if "output callback failed" in r.message]) == 1


# -- resource limits ----------------------------------------------------------------------------


@pytest.fixture(params=["prlimit", "python-shim"])
def rlimit_wrapper(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "prlimit":
        # util-linux is essential on Debian: its absence is a broken machine, not a skip.
        assert running._find_prlimit() is not None, "util-linux prlimit is not installed"
    else:
        monkeypatch.setattr(running, "_find_prlimit", lambda: None)
    return str(request.param)


async def test_rlimits_are_set_in_the_child(tmp_path: Path, rlimit_wrapper: str) -> None:
    limits = {
        resource.RLIMIT_NOFILE: (100, 200),
        resource.RLIMIT_CORE: (0, resource.RLIM_INFINITY),
    }
    command = "echo $$; ulimit -Sn; ulimit -Hn; ulimit -Sc; ulimit -Hc"
    job = executing.Execution(make_request(tmp_path, command, rlimits=limits))
    result = await job.run()
    assert result.status == "completed", result
    pid, *values = result.stdout.split()
    assert values == ["100", "200", "0", "unlimited"]
    assert int(pid) == job.pid  # the wrapper exec'd the shell: the pid we kill is the task's


async def test_writing_beyond_the_file_size_limit_fails_the_task(
    tmp_path: Path, rlimit_wrapper: str
) -> None:
    limits = {resource.RLIMIT_FSIZE: (4096, 4096)}
    small = await run(tmp_path, "head -c 4096 /dev/zero > f", rlimits=limits)
    assert small.status == "completed", small
    big = await run(tmp_path, "head -c 100000 /dev/zero > f", rlimits=limits)
    assert big.status == "failed"
    assert big.error is not None
    assert "file size limit exceeded" in big.error


async def test_task_starts_with_no_ignored_signals(tmp_path: Path) -> None:
    # The worker (Python) ignores SIGPIPE and SIGXFSZ; a task must not inherit that, or
    # `yes | head` never ends and a file size breach is not a signal.
    result = await run(tmp_path, "grep SigIgn /proc/$$/status")
    assert _ignored(result.stdout) & _PYTHON_IGNORED == set()


async def test_rlimit_wrapper_leaves_no_ignored_signals(
    tmp_path: Path, rlimit_wrapper: str
) -> None:
    limits = {resource.RLIMIT_NOFILE: (256, 256)}
    result = await run(tmp_path, "grep SigIgn /proc/$$/status", rlimits=limits)
    assert _ignored(result.stdout) & _PYTHON_IGNORED == set()


# Python ignores these in itself; whatever started the worker may ignore others (GNU make
# leaves glibc's internal real-time signals 32 and 33 ignored), which is not ours to undo.
_PYTHON_IGNORED = {signal.SIGPIPE, signal.SIGXFSZ}


def _ignored(status_line: str) -> set[int]:
    mask = int(status_line.split()[1], 16)
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


@pytest.mark.parametrize(
    "overrides",
    [{"timeout": 0}, {"timeout": -1}, {"output_limit": -1}, {"rlimits": {12345: (1, 1)}}],
)
def test_invalid_requests_are_refused(tmp_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_request(tmp_path, "true", **overrides)


# -- many at once, leaks, child watcher --------------------------------------------------------


@pytest.mark.parametrize("watcher", ["default", "pidfd"])
async def test_many_concurrent_runs_complete_and_leak_nothing(
    tmp_path: Path, watcher: str, restore_child_watcher: None
) -> None:
    if watcher == "pidfd":
        executing.install_fast_child_watcher()
    await run(tmp_path, "true")  # warm up lazily created loop resources
    fds_before = len(os.listdir("/proc/self/fd"))
    jobs = [
        executing.Execution(make_request(tmp_path, "echo $OCTASKLY_TASK_ID", task_id=f"t{i}"))
        for i in range(50)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(job.run() for job in jobs)), 60)
    assert [r.status for r in results] == ["completed"] * 50
    assert [r.stdout for r in results] == [f"t{i}\n" for i in range(50)]
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert leftovers(tmp_path) == []


def test_fast_child_watcher_works_across_event_loops(
    tmp_path: Path, restore_child_watcher: None
) -> None:
    async def one(command: str) -> executing.ExecResult:
        executing.install_fast_child_watcher()
        return await run(tmp_path, command)

    if sys.version_info >= (3, 12):
        executing.install_fast_child_watcher()  # a silent no-op: warnings are errors here
        assert asyncio.run(one("exit 5")).exit_code == 5
        return
    assert asyncio.run(one("exit 5")).exit_code == 5
    watcher = asyncio.get_event_loop_policy().get_child_watcher()
    assert isinstance(watcher, asyncio.PidfdChildWatcher)
    # A second loop: 3.11's own PidfdChildWatcher stays bound to the first one.
    assert asyncio.run(one("exit 6")).exit_code == 6
    assert asyncio.get_event_loop_policy().get_child_watcher() is watcher  # installed once
