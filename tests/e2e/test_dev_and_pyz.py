"""`octaskly dev` (the newcomer's one command) and the single-file zipapp."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.e2e import procs
from tests.e2e.procs import SECRET, clean_env, free_port, http, run, wait_for, wait_healthy

REPO = Path(__file__).resolve().parents[2]


def test_dev_runs_a_local_cluster(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = clean_env(HOME=str(tmp_path))
    with procs.processes() as ps:
        ps.append(
            procs.start(
                ["dev", "--port", str(port), "--api-port", str(api_port)], cwd=tmp_path, env=env
            )
        )
        wait_healthy(api, ps[0], data_dir=tmp_path / ".octaskly")
        wait_for(
            lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 2, what="two dev workers"
        )
        # no token given: the client finds the one `dev` wrote in ./.octaskly/
        assert http("GET", f"{api}/api/v1/workers", token="")[0] == 401
        result = run(
            ["submit", "--wait", "--", "echo", "hello"],
            cwd=tmp_path,
            env=dict(env, OCTASKLY_API_URL=api),
        )
        assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
        data = tmp_path / ".octaskly"
        assert (data / "octaskly.db").exists()
        assert (data / "secret.key").stat().st_mode & 0o777 == 0o600
        assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
        assert data.stat().st_mode & 0o777 == 0o700
        (log,) = tmp_path.glob("dev-*.log")  # it says where the dashboard is
        assert f"dashboard: {api}/ui (log in with the token in .octaskly/admin.token)" in (
            log.read_text()
        )
        assert procs.stop(ps[0], signal.SIGINT) == 0
        # the workers went down with it
        wait_for(
            lambda: (
                not any(
                    b"dev-worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
                    for pid in os.listdir("/proc")
                    if pid.isdigit() and _readable(pid)
                )
            ),
            what="dev workers to exit",
        )


def test_dev_workers_do_not_outlive_a_killed_dev(tmp_path: Path) -> None:
    """kill -9 of `octaskly dev` (no chance to clean up): its workers still go."""
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    with procs.processes() as ps:
        ps.append(
            procs.start(
                ["dev", "--port", str(port), "--api-port", str(api_port)],
                cwd=tmp_path,
                env=clean_env(HOME=str(tmp_path)),
            )
        )
        wait_healthy(api, ps[0], data_dir=tmp_path / ".octaskly")
        wait_for(
            lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 2, what="two dev workers"
        )
        children = psutil.Process(ps[0].pid).children()
        assert len(children) == 2
        ps[0].kill()
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], f"workers left behind: {alive}"
        print(f"dev killed -9: its {len(gone)} workers exited by themselves")


def _readable(pid: str) -> bool:
    try:
        Path(f"/proc/{pid}/cmdline").read_bytes()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build dist/octaskly.pyz exactly as README says (make pyz)."""
    if shutil.which("make") is None:
        pytest.fail("make is required to build the zipapp")
    target = tmp_path_factory.mktemp("pyz") / "octaskly.pyz"
    build = subprocess.run(
        ["make", "-s", "pyz", f"PYZ={target}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return target


def test_pyz_runs_dispatcher_and_worker_from_anywhere(pyz: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(HOME=str(tmp_path), SHIV_ROOT=str(tmp_path / "shiv"))
    version = subprocess.run(
        [str(pyz), "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
    from octaskly import __version__

    assert version.stdout.strip() == f"octaskly {__version__}"
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    cmd = [sys.executable, str(pyz)]
    dispatcher = [
        "dispatcher",
        "--port",
        str(port),
        "--api-port",
        str(api_port),
        "--bind",
        "127.0.0.1",
        "--db-path",
        str(elsewhere / "data.db"),
        "--secret-key",
        SECRET,
    ]
    worker = [
        "worker",
        "--dispatcher-addr",
        f"127.0.0.1:{port}",
        "--name",
        "pyz-w",
        "--secret-key",
        SECRET,
    ]
    with procs.processes() as ps, (elsewhere / "d.log").open("wb") as log:
        for args in (dispatcher, worker):
            ps.append(
                subprocess.Popen(
                    [*cmd, *args], cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
            if args is dispatcher:
                wait_healthy(api, ps[0], data_dir=elsewhere)
        client = ["submit", "--wait", "--api-url", api, "--data-dir", str(elsewhere)]
        submit = subprocess.run(
            [*cmd, *client, "--", "echo", "zip"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (submit.returncode, submit.stdout) == (0, "zip\n"), submit.stderr
        # the dashboard's files travel inside the zipapp
        for asset in ("", "app.js", "app.css", "icon.svg"):
            with urllib.request.urlopen(f"{api}/ui/{asset}", timeout=10) as resp:
                assert resp.status == 200 and len(resp.read()) > 100, asset
