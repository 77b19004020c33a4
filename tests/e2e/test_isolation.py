"""A client token against a default install: real dispatcher and worker processes.

With default settings (client tasks run at `client_min_sandbox_level` = strict, a root
worker runs none/basic tasks as nobody), a task submitted with a `client` token reads
nothing of the cluster's secrets: the key file, the worker's `OCTASKLY_SECRET_KEY` (through
`/proc/<worker>/environ`), `admin.token`, `octaskly.db`, the TLS key, another task's
workdir. Checked with the worker running as root, and with dispatcher and worker running
as one unprivileged user that shares the dispatcher's data dir (the worker not told about
it), where the same commands as an admin `none` task read every one of them — the control.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from octaskly.executing import sandboxing
from tests.e2e import procs
from tests.e2e.procs import SECRET

NOBODY = sandboxing.SANDBOX_UID
NEIGHBOUR = "neighbour-task-secret-42"


@pytest.fixture
def place(reachable_tmp: Path) -> Path:
    """A directory every user may pass through (pytest's tmp_path is root's 0700 tree)."""
    return reachable_tmp


def start_cluster(
    place: Path, running: list[subprocess.Popen[bytes]], *, uid: int | None
) -> tuple[str, Path, Path, subprocess.Popen[bytes]]:
    """A dispatcher and a worker with default settings, both as `uid` (None: root)."""
    data, key, work = place / "srv-data", place / "cluster.key", place / "work"
    data.mkdir(mode=0o700)
    key.write_text(SECRET + "\n")
    key.chmod(0o600)
    work.mkdir(mode=0o711)
    if uid is not None:
        for path in (data, key, work, place):
            os.chown(path, uid, uid)
    port, api_port = procs.free_port(), procs.free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = procs.clean_env(HOME=str(place))
    dispatcher = procs.start(
        [
            "dispatcher",
            *("--bind", "127.0.0.1", "--port", str(port), "--api-port", str(api_port)),
            *("--data-dir", str(data), "--secret-key-file", str(key)),
        ],
        cwd=place,
        env=env,
        uid=uid,
        log=place / "dispatcher.log",
    )
    running.append(dispatcher)
    procs.wait_healthy(api, dispatcher, data_dir=data)
    # The worker holds the key in its environment and is not told where the data dir is.
    worker = procs.start(
        ["worker", "--name", "w1", "--dispatcher-addr", f"127.0.0.1:{port}", "--max-jobs", "4"],
        cwd=place,
        env={**env, "OCTASKLY_SECRET_KEY": SECRET, "OCTASKLY_WORK_DIR": str(work)},
        uid=uid,
        task_user=None,  # the default
        log=place / "worker.log",
    )
    running.append(worker)
    procs.wait_for(
        lambda: procs.http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="the worker"
    )
    return api, data, key, worker


def client_token(api: str) -> str:
    status, body = procs.http("POST", f"{api}/api/v1/tokens", {"role": "client", "subject": "eve"})
    assert status == 201, body
    return str(body["token"])


def finished(api: str, task_id: str, token: str | None = None) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        status, task = procs.http("GET", f"{api}/api/v1/tasks/{task_id}", token=token)
        assert status == 200, task
        return task if task["status"] not in ("queued", "running") else None

    return dict(procs.wait_for(done, timeout=60, what=f"task {task_id} ends"))


def neighbour_workdir(api: str) -> tuple[str, str]:
    """An admin task (basic) that keeps a secret in its workdir while it runs."""
    status, body = procs.http(
        "POST",
        f"{api}/api/v1/tasks",
        {"command": f"echo {NEIGHBOUR} > secret; chmod 644 secret; pwd; sleep 300"},
    )
    assert status == 201, body

    def workdir() -> str | None:
        task = procs.http("GET", f"{api}/api/v1/tasks/{body['id']}")[1]
        text = str(task.get("stdout") or "")
        return text.strip() or None

    return str(body["id"]), str(procs.wait_for(workdir, timeout=60, what="the neighbour's pwd"))


def stealing(data: Path, key: Path, worker_pid: int, neighbour: str) -> str:
    files = [key, data / "admin.token", data / "octaskly.db", data / "tls" / "key.pem"]
    tls_files = f"{data}/tls/*"
    return (
        f"for f in {' '.join(map(str, files))} {tls_files} {neighbour}/secret; do "
        'head -c 4000 "$f"; echo; done; '
        f"tr '\\0' '\\n' < /proc/{worker_pid}/environ; "
        f"ls -la {data} {neighbour}; "
        "echo done"
    )


def secrets_in(text: str, admin_token: str) -> list[str]:
    found = [s for s in (SECRET, admin_token, NEIGHBOUR) if s in text]
    found += [s for s in ("SQLite format 3", "PRIVATE KEY") if s in text]
    return found


@pytest.mark.parametrize("uid", [None, NOBODY], ids=["root", "shared-unprivileged-user"])
def test_a_client_task_reads_no_secret_at_default_settings(place: Path, uid: int | None) -> None:
    with procs.processes() as running:
        api, data, key, worker = start_cluster(place, running, uid=uid)
        admin_token = (data / "admin.token").read_text().strip()
        assert (data / "tls").is_dir() and (data / "octaskly.db").is_file()
        neighbour_id, neighbour = neighbour_workdir(api)
        command = stealing(data, key, worker.pid, neighbour)
        token = client_token(api)
        status, body = procs.http("POST", f"{api}/api/v1/tasks", {"command": command}, token=token)
        assert status == 201, body
        task = finished(api, str(body["id"]), token)
        assert task["status"] == "completed", task
        assert task["sandbox_level"] == "strict"  # the client minimum, stored with the task
        output = f"{task['stdout']}\n{task['stderr']}"
        assert "done" in str(task["stdout"])
        assert secrets_in(output, admin_token) == [], output
        if uid is not None:
            # The control: the same commands as an admin task at `none` (as the shared user)
            # read every one of them, so the client's task above really tried.
            status, body = procs.http(
                "POST", f"{api}/api/v1/tasks", {"command": command, "sandbox_level": "none"}
            )
            assert status == 201, body
            control = finished(api, str(body["id"]))
            found = secrets_in(f"{control['stdout']}\n{control['stderr']}", admin_token)
            assert sorted(found) == sorted(
                [SECRET, admin_token, NEIGHBOUR, "SQLite format 3", "PRIVATE KEY"]
            ), control
        procs.http("DELETE", f"{api}/api/v1/tasks/{neighbour_id}")


def test_a_root_worker_runs_basic_tasks_as_nobody_by_default(place: Path) -> None:
    with procs.processes() as running:
        api, _, key, _ = start_cluster(place, running, uid=None)
        status, body = procs.http(
            "POST",
            f"{api}/api/v1/tasks",
            {"command": f"id -u; cat {key}", "sandbox_level": "basic"},
        )
        assert status == 201, body
        task = finished(api, str(body["id"]))
        assert str(task["stdout"]).split()[0] == str(NOBODY), task
        assert SECRET not in str(task["stdout"]) and "Permission denied" in str(task["stderr"])
        log = (place / "worker.log").read_text()
        assert "contained by cgroup v2" in log, log  # the worker says which containment


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--containment", "cgroup-v2"], "containment = cgroup-v2: cgroup-v2: cannot make"),
        (["--task-user", "root"], "task_user = root: only a worker running as root"),
        (["--task-user", "no-such-user-x"], "task_user = no-such-user-x: no such user"),
    ],
)
def test_a_worker_refuses_an_isolation_it_cannot_give(
    place: Path, flags: list[str], message: str
) -> None:
    # Run as nobody: no cgroup is delegated to it, and it cannot switch users.
    proc = procs.start(
        ["worker", "--dispatcher-addr", "127.0.0.1:9", "--secret-key", SECRET, *flags],
        cwd=place,
        env=procs.clean_env(HOME=str(place)),
        uid=NOBODY,
        task_user=None,
        log=place / "refused.log",
    )
    assert proc.wait(60) == 2
    assert message in (place / "refused.log").read_text()
