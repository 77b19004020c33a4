"""Isolation against a task that attacks its worker: real processes, bubblewrap, cgroups.

- The task's own ``env`` reaches only the task's own processes: an ``LD_PRELOAD``
  library never runs in ``bwrap``, ``unshare``, ``prlimit`` or the shell that applies the
  limits (it would write a marker on the host, or reach 127.0.0.1 from a no-network task),
  at every level, under a root worker and under a worker that is not root.
- A run ends with everything it started (``setsid``, ``( … &)``, a double fork,
  ``daemon()``, a process ignoring SIGTERM) at every level, after completion, cancel and
  timeout, with every containment this machine gives; checked in ``/proc``.

A non-root worker is a real worker process run as ``nobody`` (the system Python 3.11 with
this venv's packages, as the venv's interpreter lives under root's home).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from octaskly import executing
from octaskly.domain import models
from octaskly.executing import containment, sandboxing

Level = models.SandboxLevel
LEVELS = list(Level)
NOBODY = sandboxing.SANDBOX_UID
OPEN_FILES = 77  # the task's open-files limit: a process that has it runs under the limits

PRELOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

__attribute__((constructor)) static void hook(void) {
    char exe[512] = "?", path[600];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) exe[n] = 0;
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    const char *port = getenv("HOOK_PORT"), *marks = getenv("HOOK_MARKS");
    int reached = 0;
    if (port) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(atoi(port));
        a.sin_addr.s_addr = inet_addr("127.0.0.1");
        reached = s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0;
        if (s >= 0) close(s);
    }
    char key[64] = "";
    const char *key_file = getenv("HOOK_KEY_FILE");
    if (key_file) {
        FILE *k = fopen(key_file, "r");
        if (k) { size_t got = fread(key, 1, sizeof key - 1, k); key[got] = 0; fclose(k); }
    }
    char line[1024];
    snprintf(line, sizeof line,
             "{\"pid\": %d, \"uid\": %d, \"exe\": \"%s\", \"nofile\": %ld, \"reached\": %d,"
             " \"key\": \"%s\"}\n",
             getpid(), getuid(), exe, (long)nofile.rlim_cur, reached, key);
    fprintf(stderr, "HOOKED %s", line);
    if (marks) {
        snprintf(path, sizeof path, "%s/mark-%d", marks, getpid());
        FILE *f = fopen(path, "w");
        if (f) { fputs(line, f); fclose(f); }
    }
}
"""


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A world-readable host directory with the hook library (exposed to strict tasks)."""
    base = Path(tempfile.mkdtemp(prefix="octaskly-isolation-", dir="/tmp"))
    os.chmod(base, 0o755)
    source = base / "hook.c"
    source.write_text(PRELOAD_C)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O1", "-o", str(base / "hook.so"), str(source)],
        check=True,
        timeout=120,
    )
    os.chmod(base / "hook.so", 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def place(reachable_tmp: Path) -> Path:
    """A workdir root the sandbox user reaches, a world-writable marks dir."""
    (reachable_tmp / "marks").mkdir(mode=0o777)
    os.chmod(reachable_tmp / "marks", 0o777)
    (reachable_tmp / "work").mkdir()
    os.chmod(reachable_tmp / "work", 0o711)
    return reachable_tmp


@contextlib.asynccontextmanager
async def listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP listener on 127.0.0.1 that counts the connections it gets."""
    hits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], hits
    finally:
        server.close()
        await server.wait_closed()


# -- the task's env reaches only the task -----------------------------------------------------

HOOK_CHECK = r"""
import asyncio, json, sys
from pathlib import Path
from octaskly import executing
from octaskly.domain import models
from octaskly.protocol import messages
from octaskly.services import worker

async def main() -> None:
    spec = json.loads(sys.argv[1])
    level = models.SandboxLevel(spec["level"])
    assignment = messages.TaskAssignment(
        task_id="t", attempt=1, command="-", env={}, timeout=1, open_files_limit=spec["nofile"]
    )
    contain = executing.detect_containment()
    request = executing.ExecRequest(
        task_id="t", attempt=1, command=spec["command"], env=spec["env"], timeout=60,
        workdir_root=Path(spec["root"]), rlimits=worker.rlimits(assignment, level),
        sandbox_level=level, exposed=(Path(spec["shared"]),), hidden=(Path(spec["key"]),),
    )
    result = await executing.Execution(request, contain=contain).run()
    print(json.dumps({"status": result.status, "error": result.error,
                      "stderr": result.stderr, "containment": contain.kind.value}))

asyncio.run(main())
"""


def hook_env(shared: Path, place: Path, port: int) -> dict[str, str]:
    return {
        "LD_PRELOAD": str(shared / "hook.so"),
        "HOOK_PORT": str(port),
        "HOOK_MARKS": str(place / "marks"),
        "HOOK_KEY_FILE": str(place / "cluster.key"),
    }


async def run_as_worker(spec: dict[str, object], *, as_root: bool) -> dict[str, object]:
    """Run one task the way a worker does, in a worker process of its own (root or nobody)."""
    env = {"PATH": sandboxing.SAFE_PATH, "HOME": "/nonexistent", "OCTASKLY_SECRET_KEY": "sk-x"}
    python, switch = sys.executable, {}
    if not as_root:
        python = "/usr/bin/python3"  # (the venv's interpreter is under /root)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(executing.__file__).parents[2]), *site.getsitepackages()]
        )
        switch = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    proc = await asyncio.create_subprocess_exec(
        python, "-c", HOOK_CHECK, json.dumps(spec),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env, **switch,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out.decode().splitlines()[-1]))


def marks(place: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((place / "marks").iterdir())]


@pytest.mark.parametrize("as_root", [True, False], ids=["root-worker", "nobody-worker"])
@pytest.mark.parametrize("level", LEVELS)
async def test_ld_preload_runs_only_in_the_tasks_own_processes(
    shared: Path, place: Path, level: Level, as_root: bool
) -> None:
    key = place / "cluster.key"
    key.write_text("cluster-key-0123456789")
    os.chmod(key, 0o600)
    if not as_root:
        for path in (place / "work", key):
            os.chown(path, NOBODY, NOBODY)
    async with listener() as (port, hits):
        spec = {
            "level": level.value,
            "command": "/bin/true; /bin/true",
            "env": hook_env(shared, place, port),
            "root": str(place / "work"),
            "shared": str(shared),
            "key": str(key),
            "nofile": OPEN_FILES,
        }
        outcome = await run_as_worker(spec, as_root=as_root)
    assert outcome["status"] == "completed", outcome
    if not as_root:
        assert outcome["containment"] == "pid-namespace"  # (no cgroup delegated to nobody)
    # The env reached the task's own processes: both /bin/true ran with the library, each
    # under the task's limits, and nothing else did (not bwrap, unshare, prlimit, the shell).
    hooked = [json.loads(line.split(" ", 1)[1]) for line in str(outcome["stderr"]).splitlines()
              if line.startswith("HOOKED ")]  # fmt: skip
    assert [h["exe"] for h in hooked] == ["/usr/bin/true", "/usr/bin/true"], outcome
    assert {h["nofile"] for h in hooked} == {OPEN_FILES}
    if sandboxing.is_sandboxed(level):
        # Inside the sandbox there is no host marks dir and no key file to read: a marker or
        # the key means the library ran outside.
        assert marks(place) == []
        assert all(h["key"] == "" for h in hooked)
    else:
        assert sorted(m["exe"] for m in marks(place)) == ["/usr/bin/true", "/usr/bin/true"]
        assert {m["nofile"] for m in marks(place)} == {OPEN_FILES}
    if level is Level.VERY_STRICT:
        assert hits == [] and all(h["reached"] == 0 for h in hooked)
    else:
        assert len(hits) == 2  # (the control: the hook does connect where it may)


@pytest.mark.parametrize(
    "name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "BASH_ENV", "ENV"]
)
def test_hooks_are_given_to_the_shell_on_stdin_never_to_the_launchers(name: str) -> None:
    launch = sandboxing.prepare(
        Level.NONE,
        command=["/bin/sh", "-c", "true"],
        base_env={"PATH": "/usr/bin"},
        env={name: "/x"},
        task_id="t",
        attempt=1,
        workdir=Path("/tmp"),
        workdir_root=Path("/tmp"),
    )
    assert name not in launch.env and "/x" not in " ".join(launch.argv)
    assert f"export {name}='/x'".encode() in launch.stdin


# -- a run ends with everything it started ---------------------------------------------------


def survivors_command(tag: str) -> str:
    """Five ways to outlive a task, each a process whose argv holds `tag`."""
    py = "/usr/bin/python3"
    double_fork = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
    )
    daemon = "import ctypes, time\nctypes.CDLL(None).daemon(0, 0)\ntime.sleep(1000)\n"
    return (
        f"setsid sleep 1000.{tag} & "
        f"(sleep 1001.{tag} &); "
        f"{py} -c '{double_fork}' {tag}; "
        f"{py} -c '{daemon}' {tag}; "
        f"(trap '' TERM HUP; exec sleep 1002.{tag}) & "
        # (the task waits until it sees all five; [x]yz: grep's own argv does not match)
        f"until [ $(grep -l '[{tag[0]}]{tag[1:]}' /proc/[0-9]*/cmdline 2>/dev/null | wc -l) "
        "-ge 5 ]; do sleep 0.01; done; "
        "echo started"
    )


def tagged(tag: str) -> list[int]:
    """Live processes whose argv holds `tag` (zombies have no argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def until_gone(tag: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while left := tagged(tag):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes outlived their task: {left}")
        await asyncio.sleep(0.02)


async def end_a_run(
    place: Path, level: Level, how: str, contain: containment.Containment | None
) -> tuple[executing.ExecResult, str]:
    tag = str(uuid.uuid4().int)[:12]  # (digits: sleep takes it as a fraction)
    command = survivors_command(tag)
    if how != "completed":
        command += "; sleep 1000"
    started = asyncio.Event()
    request = executing.ExecRequest(
        task_id="t",
        attempt=1,
        command=command,
        env={},
        timeout=5 if how == "timed_out" else 120,
        workdir_root=place / "work",
        sandbox_level=level,
    )
    job = executing.Execution(
        request,
        contain=contain,
        kill_grace=0.5,
        on_output=lambda stream, data: started.set() if b"started" in data else None,
    )
    running = asyncio.ensure_future(job.run())
    try:
        await asyncio.wait_for(started.wait(), 60)
        if how != "completed":  # (a completed run may be over already: its word says so)
            assert len(tagged(tag)) >= 5  # all five are up before the run ends
        if how == "cancelled":
            job.cancel()
        result = await asyncio.wait_for(running, 60)
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
    return result, tag


@pytest.fixture(scope="module")
def auto() -> Iterator[containment.Containment]:
    found = containment.detect()
    # This machine (root, cgroup v2 mounted) gives a cgroup: a weaker pick is a defect here.
    assert found.kind is containment.Kind.CGROUP_V2, found
    try:
        yield found
    finally:
        found.close()


@pytest.mark.parametrize("how", ["completed", "cancelled", "timed_out"])
@pytest.mark.parametrize("level", LEVELS)
async def test_nothing_a_task_started_outlives_it(
    place: Path, auto: containment.Containment, level: Level, how: str
) -> None:
    result, tag = await end_a_run(place, level, how, auto)
    assert result.status == how, result
    await until_gone(tag)


@pytest.mark.parametrize("how", ["completed", "cancelled", "timed_out"])
@pytest.mark.parametrize("kind", [containment.Kind.CGROUP_V1, containment.Kind.PID_NAMESPACE])
async def test_the_other_containments_end_everything_too(
    place: Path, kind: containment.Kind, how: str
) -> None:
    contain = containment.detect(kind.value)
    try:
        result, tag = await end_a_run(place, Level.BASIC, how, contain)
        assert result.status == how, result
        await until_gone(tag)
    finally:
        contain.close()


async def test_the_process_group_alone_lets_setsid_escape(place: Path) -> None:
    # The control: what the containments are for (and proof the check above can fail).
    result, tag = await end_a_run(place, Level.BASIC, "completed", None)
    assert result.status == "completed", result
    try:
        # setsid, the double fork and daemon() left the group; the other two died with it
        assert len(tagged(tag)) == 3
    finally:
        for pid in tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_a_worker_says_which_containment_it_uses_and_removes_it() -> None:
    found = containment.detect()
    try:
        assert found.kind is containment.Kind.CGROUP_V2
        assert found.base is not None and found.base.is_dir()
        assert "cgroup v2" in found.describe()
    finally:
        found.close()
    assert found.base is not None and not found.base.exists()  # removed on close


def test_a_containment_asked_for_by_name_is_tried_for_real() -> None:
    # v1 on a machine whose v1 hierarchies are mounted: it works, and says where.
    found = containment.detect("cgroup-v1")
    try:
        assert found.kind is containment.Kind.CGROUP_V1 and "freezer" in str(found.base)
    finally:
        found.close()
    with pytest.raises(ValueError):
        containment.detect("cgroup-v3")


async def test_a_worker_left_by_kill_9_has_its_runs_killed_by_the_next(place: Path) -> None:
    # A worker that died without cleaning up leaves its runs' cgroups: the next worker on
    # the machine kills what is in them and removes them.
    tag = str(uuid.uuid4().int)[:12]
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from octaskly import executing\n"
        "async def main():\n"
        "    contain = executing.detect_containment()\n"
        "    request = executing.ExecRequest(task_id='t', attempt=1, timeout=600,\n"
        f"        command='setsid sleep 1000.{tag} & echo started; sleep 1000', env={{}},\n"
        "        workdir_root=Path(sys.argv[1]))\n"
        "    job = executing.Execution(request, contain=contain,\n"
        "        on_output=lambda s, d: print('started', flush=True))\n"
        "    await job.run()\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(place / "work"), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"started"
    deadline = time.monotonic() + 30
    while len(tagged(tag)) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    proc.kill()
    await proc.wait()
    assert tagged(tag), "the run should still be there after its worker's kill -9"
    containment.detect().close()  # the next worker starts (and stops)
    await until_gone(tag)


async def test_a_root_worker_runs_none_and_basic_tasks_as_its_task_user(place: Path) -> None:
    for user, expected in ((None, "0"), ((NOBODY, NOBODY), str(NOBODY))):
        request = executing.ExecRequest(
            task_id="t",
            attempt=1,
            command="id -u; touch mine",
            env={},
            timeout=30,
            workdir_root=place / "work",
            sandbox_level=Level.BASIC,
            task_user=user,
        )
        result = await executing.Execution(request, contain=None).run()
        assert result.status == "completed", result
        assert result.stdout.split() == [expected]


DELEGATED_WORKER = r"""
import asyncio, json, sys
from pathlib import Path
sys.stdin.readline()  # (moved into its delegated cgroup by now, as systemd would start it)
from octaskly import executing
from octaskly.domain import models

async def main() -> None:
    contain = executing.detect_containment()
    request = executing.ExecRequest(
        task_id="t", attempt=1, command=sys.argv[1], env={}, timeout=120,
        workdir_root=Path(sys.argv[2]), sandbox_level=models.SandboxLevel.BASIC,
    )
    result = await executing.Execution(request, contain=contain).run()
    print(json.dumps({"kind": contain.kind.value, "base": str(contain.base),
                      "status": result.status}), flush=True)
    contain.close()

asyncio.run(main())
"""


async def test_an_unprivileged_worker_uses_the_cgroup_delegated_to_it(place: Path) -> None:
    # What systemd's Delegate=yes gives the shipped unit: the worker's own cgroup (and the
    # files that let it manage its subtree) belong to its user. Made here by hand, as root.
    mount = containment._mount_point("cgroup2", None)
    assert mount is not None
    delegated = mount / f"octaskly-test-delegated-{uuid.uuid4().hex[:8]}"
    delegated.mkdir()
    try:
        for path in (delegated, *(delegated / f for f in ("cgroup.procs", "cgroup.threads"))):
            os.chown(path, NOBODY, NOBODY)
        os.chown(place / "work", NOBODY, NOBODY)
        tag = str(uuid.uuid4().int)[:12]
        env = {
            "PATH": sandboxing.SAFE_PATH,
            "HOME": "/nonexistent",
            "PYTHONPATH": os.pathsep.join(
                [str(Path(executing.__file__).parents[2]), *site.getsitepackages()]
            ),
        }
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", DELEGATED_WORKER, survivors_command(tag), str(place / "work"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
            env=env, user=NOBODY, group=NOBODY, extra_groups=[],
        )  # fmt: skip
        (delegated / "cgroup.procs").write_text(f"{proc.pid}\n")
        out, err = await asyncio.wait_for(proc.communicate(b"go\n"), 120)
        assert proc.returncode == 0, err.decode()
        outcome = json.loads(out.decode().splitlines()[-1])
        assert outcome["kind"] == "cgroup-v2", outcome
        assert outcome["base"].startswith(str(delegated) + "/"), outcome
        assert outcome["status"] == "completed", outcome
        await until_gone(tag)
    finally:
        for child in sorted(delegated.rglob("*"), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        delegated.rmdir()
