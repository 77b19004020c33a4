"""The CLI as a user runs it: separate dispatcher and worker processes, configured by flags,
environment variables or a TOML file, and the client commands against them."""

from __future__ import annotations

import json
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import procs
from tests.e2e.procs import SECRET, clean_env, free_port, http, run, start, wait_for, wait_healthy


def _client_env(api: str) -> dict[str, str]:
    return procs.client_env(api)


def _check_client_commands(tmp_path: Path, api: str) -> None:
    env = _client_env(api)
    done = run(["submit", "--wait", "--", "echo", "hello"], cwd=tmp_path, env=env)
    assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr
    task_id = run(["submit", "--", "echo a; exit 4"], cwd=tmp_path, env=env).stdout.strip()
    failed = run(["submit", "--wait", "--", "exit 4"], cwd=tmp_path, env=env)
    assert failed.returncode == 1 and "failed" in failed.stderr
    status = run(["status", task_id, "--json"], cwd=tmp_path, env=env)
    assert json.loads(status.stdout)["id"] == task_id
    listing = run(["list", "--limit", "10"], cwd=tmp_path, env=env)
    assert listing.returncode == 0 and task_id in listing.stdout
    wait_for(
        lambda: http("GET", f"{api}/api/v1/tasks/{task_id}")[1]["status"] == "failed",
        what="task to fail",
    )
    logs = run(["logs", task_id], cwd=tmp_path, env=env)
    assert logs.stdout == "a\n"
    slow = run(["submit", "--", "sleep 60"], cwd=tmp_path, env=env).stdout.strip()
    cancel = run(["cancel", slow], cwd=tmp_path, env=env)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    again = run(["cancel", slow], cwd=tmp_path, env=env)
    assert again.returncode == 1 and "409" in again.stderr
    workers = run(["workers"], cwd=tmp_path, env=env)
    assert "w1" in workers.stdout
    stats = json.loads(run(["stats"], cwd=tmp_path, env=env).stdout)
    assert stats["workers"]["total"] == 1


def test_flags(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    with procs.processes() as ps:
        ps.append(
            start(
                [
                    "dispatcher",
                    "--port",
                    str(port),
                    "--api-port",
                    str(api_port),
                    "--bind",
                    "127.0.0.1",
                    "--db-path",
                    str(tmp_path / "x" / "data.db"),
                    "--secret-key",
                    SECRET,
                ],
                cwd=tmp_path,
            )
        )
        wait_healthy(api, ps[0], data_dir=tmp_path / "x")
        ps.append(
            start(
                [
                    "worker",
                    "--dispatcher-addr",
                    f"127.0.0.1:{port}",
                    "--name",
                    "w1",
                    "--secret-key",
                    SECRET,
                ],
                cwd=tmp_path,
            )
        )
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        _check_client_commands(tmp_path, api)
        assert (tmp_path / "x" / "data.db").exists()
        assert procs.stop(ps[1]) == 0 and procs.stop(ps[0]) == 0


def test_environment_variables(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = clean_env(
        OCTASKLY_PORT=str(port),
        OCTASKLY_API_PORT=str(api_port),
        OCTASKLY_BIND_ADDRESS="127.0.0.1",
        OCTASKLY_DB_PATH=str(tmp_path / "env.db"),
        OCTASKLY_SECRET_KEY=SECRET,
        RUST_LOG="info",
    )
    with procs.processes() as ps:
        ps.append(start(["dispatcher"], cwd=tmp_path, env=env))
        wait_healthy(api, ps[0], data_dir=tmp_path)
        worker_env = dict(env, OCTASKLY_DISPATCHER_ADDR=f"127.0.0.1:{port}", OCTASKLY_NAME="w1")
        ps.append(start(["worker"], cwd=tmp_path, env=worker_env))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        _check_client_commands(tmp_path, api)
        assert (tmp_path / "env.db").exists()


def test_toml_config_file(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = tmp_path / "octaskly.toml"
    config.write_text(f"""
[network]
bind_address = "127.0.0.1"
port = {port}
api_port = {api_port}

[security]
secret_key_file = "{secret_file}"

[storage]
db_path = "{tmp_path / "toml.db"}"

[worker]
dispatcher_addr = ["127.0.0.1:{port}"]
name = "w1"
max_jobs = 2
""")
    with procs.processes() as ps:
        ps.append(start(["dispatcher", "--config", str(config)], cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=tmp_path)
        ps.append(start(["worker", "--config", str(config)], cwd=tmp_path))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        workers = http("GET", f"{api}/api/v1/workers")[1]["workers"]
        assert workers[0]["max_jobs"] == 2
        _check_client_commands(tmp_path, api)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[network]\nprot = 5555\n", "prot"),
        ("[network]\nport = 70000\n", "port"),
        ('[network]\nport = "five"\n', "port"),
        ("[network\nport = 1\n", "octaskly.toml"),
    ],
)
def test_bad_config_exits_2_naming_key_file_and_line(
    tmp_path: Path, content: str, needle: str
) -> None:
    config = tmp_path / "octaskly.toml"
    config.write_text(content)
    result = run(["dispatcher", "--config", str(config)], cwd=tmp_path)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert needle in message and str(config) in message
    assert ":2" in message or ":1" in message  # the line


@pytest.mark.parametrize(
    "args",
    [
        ["dispatcher", "--port", "notanumber"],
        ["dispatcher", "--port", "0"],
        ["worker", "--dispatcher-addr", "nohostport"],
        ["submit"],
        ["frobnicate"],
        ["worker", "--label", "novalue"],
        ["list", "--status", "weird"],
        ["worker", "--sandbox-level", "paranoid"],
        ["worker", "--transport", "carrier-pigeon"],
        ["dispatcher", "--role", "standby"],
        ["dispatcher", "--failover-timeout", "0.5"],
        ["dispatcher", "--auto-failover", "maybe"],
        ["dispatcher", "--replication", "semi"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run(args, cwd=tmp_path, env=_client_env("http://127.0.0.1:9"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()


def test_unreachable_api_exits_1(tmp_path: Path) -> None:
    result = run(["list"], cwd=tmp_path, env=_client_env(f"http://127.0.0.1:{free_port()}"))
    assert result.returncode == 1 and "cannot reach" in result.stderr


def test_help_and_version(tmp_path: Path) -> None:
    version = run(["--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("octaskly ")
    for command in ("dispatcher", "worker", "dev", "submit", "list", "config"):
        result = run([command, "--help"], cwd=tmp_path)
        assert result.returncode == 0 and "usage:" in result.stdout
    assert "OCTASKLY_API_PORT" in run(["dispatcher", "--help"], cwd=tmp_path).stdout


def test_kill_9_loses_no_acknowledged_task(tmp_path: Path) -> None:
    """Acknowledged tasks survive kill -9; tasks that were running are re-queued and finish."""
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    args = [
        "dispatcher",
        "--port",
        str(port),
        "--api-port",
        str(api_port),
        "--bind",
        "127.0.0.1",
        "--db-path",
        str(tmp_path / "q.db"),
        "--secret-key",
        SECRET,
    ]
    marks = tmp_path / "marks"
    marks.mkdir()
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=tmp_path)
        ps.append(
            start(
                [
                    "worker",
                    "--dispatcher-addr",
                    f"127.0.0.1:{port}",
                    "--name",
                    "w1",
                    "--secret-key",
                    SECRET,
                    "--max-jobs",
                    "2",
                ],
                cwd=tmp_path,
            )
        )
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        slow = [
            http("POST", f"{api}/api/v1/tasks", {"command": f"sleep 1; touch {marks}/slow-{i}"})[1][
                "id"
            ]
            for i in range(2)
        ]
        wait_for(
            lambda: all(
                http("GET", f"{api}/api/v1/tasks/{t}")[1]["status"] == "running" for t in slow
            ),
            what="slow tasks running",
        )
        acked = []
        for i in range(40):
            status, body = http("POST", f"{api}/api/v1/tasks", {"command": f"touch {marks}/{i}"})
            assert status == 201
            acked.append(body["id"])
        ps[0].send_signal(signal.SIGKILL)
        ps[0].wait()
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[-1], data_dir=tmp_path)
        for task_id in [*slow, *acked]:
            wait_for(
                lambda t=task_id: (
                    http("GET", f"{api}/api/v1/tasks/{t}")[1]["status"] == "completed"
                ),
                what=f"task {task_id} completes",
                timeout=60,
            )
        assert {p.name for p in marks.iterdir()} >= {f"slow-{i}" for i in range(2)} | {
            str(i) for i in range(40)
        }
        total = http("GET", f"{api}/api/v1/tasks?limit=1000")[1]["total"]
        assert total == 42


def _keyed_dispatcher(tmp_path: Path) -> tuple[str, Path, Path, list[str]]:
    """API URL, data dir, secret key file and flags of a dispatcher on free ports."""
    port, api_port = free_port(), free_port()
    data = tmp_path / "data"
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    flags = ["--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1"]
    flags += ["--data-dir", str(data), "--secret-key-file", str(secret_file)]
    return f"http://127.0.0.1:{api_port}", data, secret_file, flags


def test_token_commands_sign_locally_use_and_revoke(tmp_path: Path) -> None:
    api, data, secret_file, flags = _keyed_dispatcher(tmp_path)
    with procs.processes() as ps:
        ps.append(start(["dispatcher", *flags], cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
        bare = clean_env(OCTASKLY_API_URL=api)  # no token anywhere: 401, exit 1
        denied = run(["list"], cwd=tmp_path, env=bare)
        assert denied.returncode == 1 and "401" in denied.stderr
        # signed here with the cluster key, no dispatcher involved
        create = ["token", "create", "--role", "client", "--subject", "bob", "--ttl", "1h"]
        made = run(
            [*create, "--json", "--secret-key-file", str(secret_file)], cwd=tmp_path, env=bare
        )
        assert made.returncode == 0, made.stderr
        issued = json.loads(made.stdout)
        bob = dict(bare, OCTASKLY_TOKEN=issued["token"])
        submitted = run(["submit", "--", "true"], cwd=tmp_path, env=bob)
        assert submitted.returncode == 0, submitted.stderr
        assert run(["workers"], cwd=tmp_path, env=bob).returncode == 1  # 403 for a client
        # revoking needs an admin: the local one in the data dir
        revoked = run(
            ["token", "revoke", issued["id"], "--data-dir", str(data)], cwd=tmp_path, env=bare
        )
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        after = run(["list"], cwd=tmp_path, env=bob)
        assert after.returncode == 1 and "revoked" in after.stderr
        bad = run(["token", "create", "--role", "client"], cwd=tmp_path, env=bare)
        assert bad.returncode == 2 and "--subject" in bad.stderr
        assert procs.stop(ps[0]) == 0


def test_audit_verify_detects_an_edited_line(tmp_path: Path) -> None:
    api, data, secret_file, flags = _keyed_dispatcher(tmp_path)
    with procs.processes() as ps:
        ps.append(start(["dispatcher", *flags], cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        for _ in range(3):
            assert http("POST", f"{api}/api/v1/tasks", {"command": "true"})[0] == 201
        assert http("GET", f"{api}/api/v1/tasks", token="forged.token.here")[0] == 401
        assert procs.stop(ps[0]) == 0
    verify = ["audit", "verify", "--data-dir", str(data), "--secret-key-file", str(secret_file)]
    good = run(verify, cwd=tmp_path)
    assert good.returncode == 0 and "OK" in good.stdout, good.stdout + good.stderr
    log = data / "logs" / "audit.log"
    entries = log.read_text().splitlines()
    edited = json.loads(entries[1])
    edited["actor"] = "somebody-else"
    entries[1] = json.dumps(edited, separators=(",", ":"))
    log.write_text("\n".join(entries) + "\n")
    bad = run(verify, cwd=tmp_path)
    assert bad.returncode == 1 and "line 2" in bad.stdout and "hash mismatch" in bad.stdout
    no_key = run(["audit", "verify", "--data-dir", str(data)], cwd=tmp_path, env=clean_env())
    assert no_key.returncode == 2 and "secret" in no_key.stderr


def test_https_api_with_tls_cert_and_key(tmp_path: Path) -> None:
    from octaskly.transport import tls

    # any PEM pair will do; the TLS identity code makes one for "octaskly-dispatcher"
    identity = tls.load_or_create(tmp_path / "certs")
    port, api_port = free_port(), free_port()
    data = tmp_path / "data"
    flags = ["--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1"]
    flags += ["--data-dir", str(data), "--secret-key", SECRET]
    flags += ["--tls-cert", str(identity.cert_path), "--tls-key", str(identity.key_path)]
    with procs.processes() as ps:
        ps.append(start(["dispatcher", *flags], cwd=tmp_path))
        context = ssl.create_default_context(cafile=str(identity.cert_path))
        context.check_hostname = False  # the certificate names octaskly-dispatcher

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{api_port}/health", context=context, timeout=2
                ) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(healthy, what="the HTTPS API")
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=2)
        env = clean_env(SSL_CERT_FILE=str(identity.cert_path))
        client = ["--api-url", f"https://octaskly-dispatcher:{api_port}", "--data-dir", str(data)]
        # the client verifies the certificate against SSL_CERT_FILE; the host name must
        # match it, so this one fails clearly rather than silently trusting
        denied = run(["stats", *client], cwd=tmp_path, env=env)
        assert denied.returncode == 1 and "cannot reach" in denied.stderr
        assert procs.stop(ps[0]) == 0
    bad = run(
        ["dispatcher", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "k")],
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "tls_cert" in bad.stderr


def test_auth_off_on_a_lan_address_warns_loudly_and_everyone_is_admin(tmp_path: Path) -> None:
    api, data, _, flags = _keyed_dispatcher(tmp_path)
    flags = [f for f in flags if f != "127.0.0.1"]  # drop the loopback bind ...
    flags.remove("--bind")
    log = tmp_path / "d.log"
    with procs.processes() as ps:
        ps.append(start(["dispatcher", *flags, "--require-auth", "false"], cwd=tmp_path, log=log))
        wait_healthy(api, ps[0])  # ... so it listens on 0.0.0.0
        assert http("GET", f"{api}/api/v1/stats", token="")[0] == 200
        assert procs.stop(ps[0]) == 0
    text = log.read_text()
    assert "API authentication is OFF while listening on 0.0.0.0" in text
    assert not (data / "admin.token").exists()
