"""Sandbox levels and limits against real attacks: real bubblewrap, real processes.

A task here runs the way a worker runs it (ExecRequest with the worker's rlimits for the
assignment, its sandbox level); the cluster tests at the end go through the API, the
dispatcher and a real worker. Nothing is skipped: a machine without bubblewrap fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from octaskly import errors, executing
from octaskly.cli import serving
from octaskly.config import settings as config_settings
from octaskly.domain import models
from octaskly.executing import sandboxing
from octaskly.protocol import messages
from octaskly.services import worker as working
from tests.cluster import SECRET, Cluster, running_cluster, until

Level = models.SandboxLevel
SANDBOXED = [Level.STRICT, Level.VERY_STRICT]
ABOVE_NONE = [Level.BASIC, Level.STRICT, Level.VERY_STRICT]


@pytest.fixture
def root() -> Iterator[Path]:
    """A workdir root the sandbox user can reach (pytest's tmp_path is 0700 all the way)."""
    base = Path(tempfile.mkdtemp(prefix="octaskly-sandbox-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    work = base / "work"
    # bubblewrap is a test dependency (`make venv` installs it): its absence is a failure.
    problem = executing.unavailable(Level.VERY_STRICT, work)
    assert problem is None, problem
    try:
        yield work
    finally:
        shutil.rmtree(base, ignore_errors=True)


def request(
    root: Path, command: str, level: Level, *, timeout: float = 20, **limits: Any
) -> executing.ExecRequest:
    assignment = messages.TaskAssignment(
        task_id="task-1", attempt=1, command=command, env={"TASK_VAR": "mine"}, timeout=1, **limits
    )
    return executing.ExecRequest(
        task_id="task-1",
        attempt=1,
        command=command,
        env=assignment.env,
        timeout=timeout,
        workdir_root=root,
        rlimits=working.rlimits(assignment, level),
        sandbox_level=level,
    )


async def run(
    root: Path, command: str, level: Level = Level.STRICT, **limits: Any
) -> executing.ExecResult:
    job = executing.Execution(request(root, command, level, **limits))
    return await asyncio.wait_for(job.run(), 30)


def namespace_members(pid_namespace: str) -> list[int]:
    """Live (non-zombie) host processes in the PID namespace `pid:[N]`."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") != pid_namespace:
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


async def until_namespace_empty(pid_namespace: str, timeout: float = 5.0) -> None:
    assert pid_namespace.startswith("pid:["), pid_namespace
    deadline = time.monotonic() + timeout
    while members := namespace_members(pid_namespace):
        if time.monotonic() > deadline:
            raise AssertionError(f"{pid_namespace} still has live processes {members}")
        await asyncio.sleep(0.02)


# -- limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bomb",
    [
        # the classic one, started over and over by a shell that gives up when fork fails
        "bomb() { bomb | bomb & }; while :; do bomb; done",
        "python3 -c 'import os\nwhile True: os.fork()'",
    ],
)
async def test_a_fork_bomb_is_contained_by_the_process_limit(root: Path, bomb: str) -> None:
    command = f"readlink /proc/self/ns/pid; {bomb}"
    started = time.monotonic()
    result = await run(root, command, Level.STRICT, process_limit=10)
    assert result.status == "failed", result
    assert result.error is not None and "process limit (10) reached" in result.error
    assert time.monotonic() - started < 10
    await until_namespace_empty(result.stdout.splitlines()[0])
    # the worker (this process) is fine and can still start processes
    assert (await run(root, "echo alive", Level.NONE)).stdout == "alive\n"


async def test_a_background_fork_bomb_dies_with_its_sandbox(root: Path) -> None:
    # The bomb's orphans churn on in the background until the run ends: none may survive.
    command = "readlink /proc/self/ns/pid; bomb() { bomb | bomb & }; bomb; exec sleep 1"
    result = await run(root, command, Level.STRICT, limits_preset="strict")
    assert result.status == "completed", result
    assert "Cannot fork" in result.stderr  # it did hit the limit (10 processes)
    await until_namespace_empty(result.stdout.splitlines()[0])


@pytest.mark.parametrize("level", [Level.NONE, Level.STRICT])
async def test_allocating_1_gb_under_a_256_mb_limit_fails_naming_it(
    root: Path, level: Level
) -> None:
    result = await run(root, "python3 -c 'b = bytearray(1 << 30)'", level, memory_limit_mb=256)
    assert result.status == "failed", result
    assert result.error is not None and "memory limit (256 MB) exceeded" in result.error
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        "head -c 120000000 /dev/zero > big",  # killed by SIGXFSZ
        "head -c 120000000 /dev/zero > /tmp/big",  # the private /tmp too
        'python3 -c \'open("big", "wb").write(bytes(120_000_000))\'',  # EFBIG (Python)
    ],
)
async def test_writing_past_the_disk_limit_fails_naming_it(root: Path, command: str) -> None:
    result = await run(root, command, Level.STRICT, disk_limit_mb=100)
    assert result.status == "failed", result
    assert result.error is not None and "file size limit exceeded" in result.error


async def test_cpu_and_open_files_limits_inside_the_sandbox(root: Path) -> None:
    cpu = await run(root, "while :; do :; done", Level.STRICT, cpu_seconds=1)
    assert cpu.status == "failed" and cpu.error is not None
    assert "CPU time limit exceeded" in cpu.error
    files = await run(
        root,
        "python3 -c 'fs = [open(\"/dev/null\") for _ in range(200)]'",
        Level.STRICT,
        open_files_limit=100,
    )
    assert files.status == "failed" and files.error is not None
    assert "open files limit (100) reached" in files.error


async def test_limits_are_set_from_defaults_presets_and_the_task(root: Path) -> None:
    # CPU seconds, address space (KiB), file size (512-byte blocks), open files, processes
    command = "ulimit -t; ulimit -v; ulimit -f; ulimit -n; ulimit -p"
    defaults = await run(root, command, Level.STRICT)
    assert defaults.stdout.split() == ["3600", "2097152", "20480000", "1024", "256"], defaults
    preset = await run(root, command, Level.STRICT, limits_preset="strict", cpu_seconds=7)
    assert preset.stdout.split() == ["7", "524288", "2048000", "100", "10"], preset
    relaxed = await run(root, command, Level.STRICT, limits_preset="relaxed")
    assert relaxed.stdout.split()[:4] == ["86400", "8388608", "209715200", "4096"], relaxed
    # below strict there is no process limit: the kernel would count the worker's user
    basic = await run(root, command, Level.BASIC, process_limit=10)
    assert basic.stdout.split()[:4] == ["3600", "2097152", "20480000", "1024"], basic


# -- isolation ----------------------------------------------------------------------------


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A real TCP listener on 127.0.0.1; records what each connection sent."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        await server.wait_closed()


CONNECT = (
    "python3 -c 'import socket, sys\n"
    's = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)\n'
    's.sendall(b"hello from the task")\n'
    "s.close()' {port}"
)


async def test_very_strict_cannot_open_a_tcp_connection(
    root: Path, listener: tuple[int, list[bytes]]
) -> None:
    port, received = listener
    # strict keeps the network: the listener is reachable (so the next failure is the sandbox)
    reached = await run(root, CONNECT.format(port=port), Level.STRICT)
    assert reached.status == "completed", reached
    await until(lambda: received == [b"hello from the task"], timeout=5, what="connection")
    blocked = await run(root, CONNECT.format(port=port), Level.VERY_STRICT)
    assert blocked.status == "failed", blocked
    assert "ConnectionRefusedError" in blocked.stderr or "unreachable" in blocked.stderr
    await asyncio.sleep(0.2)
    assert received == [b"hello from the task"]
    interfaces = await run(root, "cat /proc/net/dev", Level.VERY_STRICT)
    assert [line.split(":")[0].strip() for line in interfaces.stdout.splitlines()[2:]] == ["lo"]


async def test_strict_writes_only_to_its_workdir_and_tmp(root: Path) -> None:
    home = Path.home()
    tag = f"octaskly-escape-{os.getpid()}-{time.monotonic_ns()}"
    denied = [home / tag, Path("/var/tmp") / tag, Path("/etc") / tag, Path("/usr") / tag]
    # the host's /tmp (where the workdirs are) is replaced by the task's private one
    private = [root / tag, root.parent / tag, Path("/tmp") / tag]
    checks = "; ".join(
        f'touch "{path}" 2>/dev/null && echo "wrote {path}" || echo "denied {path}"'
        for path in [Path("$HOME") / tag, *denied, *private]
    )
    command = f"{checks}; touch ./mine && echo own-ok"
    try:
        result = await run(root, command, Level.STRICT)
        assert result.status == "completed", result
        lines = result.stdout.splitlines()
        assert lines[: len(denied) + 1] == [f"denied {p}" for p in [home / tag, *denied]]
        assert lines[len(denied) + 1 :] == [f"wrote {p}" for p in private] + ["own-ok"]
        assert not any(path.exists() for path in denied + private)
    finally:
        for path in denied + private:
            with contextlib.suppress(OSError):
                path.unlink()


async def test_very_strict_writes_only_to_its_workdir(root: Path) -> None:
    command = (
        'for p in /tmp/x /dev/shm/x "$HOME/x" /var/tmp/x; do '
        'touch "$p" 2>/dev/null && echo "wrote $p"; done; touch ./mine && echo own-ok'
    )
    result = await run(root, command, Level.VERY_STRICT)
    assert result.stdout == "own-ok\n", result


async def test_strict_hides_the_homes_and_the_other_workdirs(root: Path) -> None:
    neighbour = executing.Workdirs(root, keep=0).acquire()  # another run's workdir
    (neighbour / "secret").write_text("other task's data")
    os.chmod(neighbour, 0o755)  # even readable by everyone, it is out of sight
    os.chmod(neighbour / "secret", 0o644)
    home = Path.home()
    absent = [d for d in ("/home", "/root", "/srv", "/opt", "/var/lib") if Path(d) != home]
    result = await run(
        root,
        f'ls -A {home}; ls -A {" ".join(absent)}; cat {neighbour}/secret; echo "HOME=$HOME"',
        Level.STRICT,
    )
    assert "other task's data" not in result.stdout
    assert result.stderr.count("No such file") == len(absent) + 1, result  # never there
    # its HOME is an empty directory; the other runs' workdirs are not there
    assert result.stdout.split() == [f"HOME={home}"], result
    listing = await run(root, f"ls -A {root}", Level.STRICT)
    assert listing.stdout.split() != [] and neighbour.name not in listing.stdout, listing


async def test_strict_hides_the_data_dir_the_key_file_and_a_workdir_root_elsewhere() -> None:
    base = Path(tempfile.mkdtemp(prefix="octaskly-sandbox-test-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o711)
        work, data, key = base / "work", base / "data", base / "cluster.key"
        data.mkdir(mode=0o755)
        (data / "secret.key").write_text("from-the-data-dir")
        key.write_text("from-the-key-file")
        neighbour = executing.Workdirs(work, keep=0).acquire()  # another run's workdir
        (neighbour / "secret").write_text("from-another-task")
        for path in (data / "secret.key", key, neighbour / "secret"):
            os.chmod(path, 0o644)  # readable by everyone: only the sandbox hides them
        os.chmod(neighbour, 0o755)
        command = f"cat {data}/secret.key {key} {neighbour}/secret; ls -A {work}; pwd"
        job = executing.Execution(
            dataclasses.replace(request(work, command, Level.STRICT), hidden=(data, key))
        )
        result = await asyncio.wait_for(job.run(cleanup=False), 30)
        assert "from-" not in result.stdout, result
        own = Path(result.stdout.split()[-1])
        assert own.parent == work and result.stdout.split() == [own.name, str(own)]
        await job.cleanup()
        # the control: at `none` the same command reads all three
        control = await run(work, command, Level.NONE)
        assert control.stdout.count("from-") == 3, control
    finally:
        shutil.rmtree(base, ignore_errors=True)


SECRETS = {
    "OCTASKLY_SECRET_KEY": "cluster-secret-0123456789",
    "octaskly_lowercase": "cluster-secret-lower",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-abc",
    "GITHUB_TOKEN": "ghp_secret",
    "DATABASE_URL": "postgres://user:pw@db/x",
    "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock",
    "LD_PRELOAD": "/tmp/evil.so",
}
FIND_SECRET_IN_PROC = "grep -hao 'cluster-secret-0123456789' /proc/[0-9]*/environ"


@pytest.fixture
def process_with_secrets() -> Iterator[int]:
    """A process of the worker's user started with the secrets in its real environment."""
    env = {**os.environ, **SECRETS}
    proc = subprocess.Popen(["sleep", "60"], env=env, stdin=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("level", ABOVE_NONE)
async def test_no_level_above_none_sees_the_workers_secrets(
    root: Path, level: Level, monkeypatch: pytest.MonkeyPatch, process_with_secrets: int
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", "/opt/worker-tools/bin:" + os.environ["PATH"])
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    result = await run(root, "env", level)
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert not set(SECRETS) & set(env)
    assert not any(value in result.stdout for value in SECRETS.values())
    assert env["TASK_VAR"] == "mine" and env["OCTASKLY_TASK_ID"] == "task-1"
    if level is Level.VERY_STRICT:
        own = {"TASK_VAR", "OCTASKLY_TASK_ID", "OCTASKLY_ATTEMPT", "OCTASKLY_WORKDIR"}
        assert set(env) <= own | {"PWD"}  # (PWD: the shell's own)
    else:
        assert env["PATH"] == sandboxing.SAFE_PATH and env["LC_ALL"] == "C.UTF-8"
    if sandboxing.is_sandboxed(level):
        # nor through /proc: the worker's processes are out of sight
        found = await run(root, FIND_SECRET_IN_PROC, level)
        assert "cluster-secret" not in found.stdout, found


async def test_the_proc_check_finds_a_secret_where_processes_are_visible(
    root: Path, process_with_secrets: int
) -> None:
    # the control for the test above: at `none` the worker's user can read /proc/PID/environ
    # (`basic` too: it is an environment filter, not a boundary)
    found = await run(root, FIND_SECRET_IN_PROC, Level.NONE)
    assert "cluster-secret-0123456789" in found.stdout


async def test_strict_sees_only_its_own_processes(root: Path) -> None:
    command = "ps -e -o pid=,comm=; ls /proc | grep -cE '^[0-9]+$'"
    result = await run(root, command, Level.STRICT)
    assert result.status == "completed", result
    *processes, count = result.stdout.splitlines()
    names = [line.split()[1] for line in processes]
    assert names == ["bwrap", "sh", "ps"]  # the sandbox's init, the task's shell, ps
    assert int(count) <= 4
    assert str(os.getpid()) not in [line.split()[0] for line in processes]
    result = await run(root, f"kill -0 {os.getpid()} && echo visible", Level.STRICT)
    assert "visible" not in result.stdout


async def test_strict_runs_as_an_unprivileged_user_without_capabilities(root: Path) -> None:
    result = await run(root, "id -u; grep CapEff /proc/self/status; unshare -U true", Level.STRICT)
    uid, caps = result.stdout.splitlines()
    expected_uid = sandboxing.SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    assert int(uid) == expected_uid
    assert caps.split()[1] == "0000000000000000"
    assert result.status == "failed"  # no new user namespaces inside


UNPRIVILEGED_WORKER = """
import asyncio, sys
from pathlib import Path
from octaskly import executing
from octaskly.domain import models
from octaskly.protocol import messages
from octaskly.services import worker

async def main() -> None:
    root, level = Path(sys.argv[1]), models.SandboxLevel.STRICT
    assert executing.unavailable(level, root) is None, executing.unavailable(level, root)
    limits = messages.TaskAssignment(
        task_id="t", attempt=1, command="-", env={}, timeout=1, process_limit=10
    )
    for command in (
        "id -u; ps -e -o comm= | wc -l",
        "bomb() { bomb | bomb & }; while :; do bomb; done",
        "id -u",
    ):
        request = executing.ExecRequest(
            task_id="t", attempt=1, command=command, env={}, timeout=20, workdir_root=root,
            rlimits=worker.rlimits(limits, level), sandbox_level=level,
        )
        result = await executing.Execution(request).run()
        print(result.status, result.error, *result.stdout.split(), sep="|", flush=True)

asyncio.run(main())
"""


async def test_an_unprivileged_worker_sandboxes_as_itself(root: Path) -> None:
    # A worker that is not root runs bwrap as its own user; the process limit still holds
    # per task (set inside the sandbox's user namespace), and the worker can still fork.
    root.mkdir(exist_ok=True)  # (the fixture's probe made it)
    switch: dict[str, Any] = {}
    if os.geteuid() == 0:
        os.chown(root, sandboxing.SANDBOX_UID, sandboxing.SANDBOX_GID)
        switch = {"user": sandboxing.SANDBOX_UID, "group": sandboxing.SANDBOX_GID}
        switch["extra_groups"] = []
    uid = str(sandboxing.SANDBOX_UID if os.geteuid() == 0 else os.geteuid())
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", UNPRIVILEGED_WORKER, str(root),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env, **switch,
        )  # fmt: skip
    except PermissionError:
        # The venv's interpreter lives where that user cannot go (a pyenv under /root):
        # the system's Python 3.11 with the venv's packages is the same code.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(executing.__file__).parents[2]), *site.getsitepackages()]
        )
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", UNPRIVILEGED_WORKER, str(root),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env, **switch,
        )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    first, bomb, after = stdout.decode().splitlines()
    assert first == f"completed|None|{uid}|4"  # bwrap (its init), sh, ps, wc: nothing else
    assert bomb.startswith("failed|process limit (10) reached")
    assert after == f"completed|None|{uid}"


# -- timeouts, cancel, output ---------------------------------------------------------------


ESCAPERS = (
    "readlink /proc/self/ns/pid; "
    "sleep 100 & (setsid sleep 100 &); (trap '' TERM HUP; exec sleep 100) & "
    "echo started; sleep 100"
)


@pytest.mark.parametrize("level", SANDBOXED)
async def test_a_timeout_kills_everything_in_the_sandbox(root: Path, level: Level) -> None:
    job = executing.Execution(request(root, ESCAPERS, level, timeout=1), kill_grace=0.5)
    result = await asyncio.wait_for(job.run(), 20)
    assert result.status == "timed_out", result
    assert result.stdout.splitlines()[1] == "started"
    await until_namespace_empty(result.stdout.splitlines()[0])


@pytest.mark.parametrize("level", SANDBOXED)
async def test_cancel_kills_everything_and_output_streams_meanwhile(
    root: Path, level: Level
) -> None:
    chunks: list[bytes] = []
    job = executing.Execution(
        request(root, ESCAPERS, level), on_output=lambda _s, data: chunks.append(data)
    )
    running = asyncio.create_task(job.run())
    await until(lambda: b"started" in b"".join(chunks), timeout=10, what="output streamed")
    job.cancel()
    result = await asyncio.wait_for(running, 20)
    assert result.status == "cancelled", result
    await until_namespace_empty(b"".join(chunks).decode().splitlines()[0])


# -- refusals -------------------------------------------------------------------------------


async def test_without_bubblewrap_a_sandboxed_run_fails_and_never_runs(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandboxing, "find_bwrap", lambda: None)
    marker = root.parent / "ran"
    for level in SANDBOXED:
        assert "bubblewrap (bwrap) is not installed" in str(executing.unavailable(level, root))
        result = await run(root, f"touch {marker}", level)
        assert result.status == "failed" and result.exit_code is None
        assert result.error is not None and "bubblewrap (bwrap) is not installed" in result.error
    assert not marker.exists()
    assert executing.unavailable(Level.BASIC, root) is None


def worker_settings(level: str, work_dir: Path) -> config_settings.Settings:
    return config_settings.Settings.model_validate(
        {
            "security": {"secret_key": SECRET.decode()},
            "worker": {"sandbox_level": level, "work_dir": str(work_dir)},
        }
    )


def test_a_worker_starts_at_strict_only_where_the_machine_gives_it(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = serving.worker_options(worker_settings("very-strict", root))
    assert options.sandbox_level is Level.VERY_STRICT
    # pytest's tmp_path sits under 0700 directories: uid 65534 cannot reach workdirs there
    if os.geteuid() == 0:
        with pytest.raises(errors.ConfigError, match=r"strict: not available.*cannot reach"):
            serving.worker_options(worker_settings("strict", tmp_path / "work"))
    monkeypatch.setattr(sandboxing, "find_bwrap", lambda: None)
    with pytest.raises(errors.ConfigError, match=r"strict: not available.*bubblewrap"):
        serving.worker_options(worker_settings("strict", root))
    assert serving.worker_options(worker_settings("basic", root)).sandbox_level is Level.BASIC


# -- through the cluster --------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as c:
        yield c


async def test_a_task_gets_the_stricter_of_its_level_and_the_workers(
    cluster: Cluster, root: Path
) -> None:
    await cluster.add_worker("strict-worker", sandbox_level=Level.STRICT, workdir_root=root)
    looser = await cluster.submit(
        command="id -u; printenv PATH || echo no-path", sandbox_level="none"
    )
    stricter = await cluster.submit(
        command="id -u; printenv PATH || echo no-path", sandbox_level="very-strict"
    )
    sandbox_uid = str(sandboxing.SANDBOX_UID if os.geteuid() == 0 else os.geteuid())
    record = await cluster.wait_status(looser, "completed")
    assert record["stdout"].split() == [sandbox_uid, sandboxing.SAFE_PATH]  # strict, not none
    record = await cluster.wait_status(stricter, "completed")
    assert record["stdout"].split() == [sandbox_uid, "no-path"]  # very-strict


async def test_limits_and_presets_go_from_the_api_to_the_sandbox(
    cluster: Cluster, root: Path
) -> None:
    await cluster.add_worker("w1", sandbox_level=Level.BASIC, workdir_root=root)
    bomb = await cluster.submit(
        command="bomb() { bomb | bomb & }; while :; do bomb; done",
        sandbox_level="strict",
        limits_preset="strict",
    )
    memory = await cluster.submit(
        command="python3 -c 'b = bytearray(1 << 30)'",
        sandbox_level="strict",
        limits_preset="strict",
        memory_limit_mb=256,
    )
    record = await cluster.wait_status(bomb, "failed")
    assert "process limit (10) reached" in record["error"]
    record = await cluster.wait_status(memory, "failed")
    assert "memory limit (256 MB) exceeded" in record["error"]


async def test_hostile_limits_are_refused_by_the_api(cluster: Cluster) -> None:
    for field, value in [
        ("process_limit", 3),
        ("process_limit", -1),
        ("open_files_limit", 10**30),
        ("open_files_limit", "lots"),
        ("cpu_seconds", True),
        ("limits_preset", "paranoid"),
    ]:
        status, body = await cluster.api(
            "POST", "/api/v1/tasks", json={"command": "true", field: value}
        )
        assert status == 400, (field, value, body)
        assert field in str(body)
