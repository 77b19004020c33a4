"""High availability with real processes: a primary and a standby dispatcher (each its own
SQLite file, data dir and ports), workers that know both, clients that submit without
pause. Faults are real: `kill -9`, and a relay between the two dispatchers that is cut
like a network link (bytes vanish, no FIN or RST). Every test prints what it measured.

Timing is shortened for the suite (failover after 3 s of silence instead of 5 s,
heartbeats every second); the logic is the production one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from octaskly import errors
from octaskly.cli.client import APIError, Client
from tests.e2e import relays
from tests.e2e.procs import (
    OCTASKLY,
    SECRET,
    TOKENS,
    clean_env,
    client_env,
    free_port,
    http,
    processes,
    run,
    start,
    stop,
    wait_for,
    wait_healthy,
)

FAILOVER = 3.0
TIMING = ["--failover-timeout", str(FAILOVER), "--keepalive-interval", "1"]


@dataclasses.dataclass
class Node:
    name: str
    p2p: int
    api_port: int
    data: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def status(self) -> dict[str, Any]:
        code, body = http("GET", f"{self.api}/api/v1/ha/status")
        assert code == 200, body
        return body  # type: ignore[no-any-return]


@dataclasses.dataclass
class Pair:
    tmp: Path
    a: Node
    b: Node
    procs: list[subprocess.Popen[bytes]]
    env: dict[str, str]
    side_effects: Path

    @property
    def urls(self) -> str:
        return f"{self.a.api},{self.b.api}"

    def start_node(self, node: Node) -> None:
        node.proc = start(
            ["dispatcher", *node.args],
            cwd=self.tmp,
            env=self.env,
            log=self.tmp / f"{node.name}-{time.monotonic_ns()}.log",
        )
        self.procs.append(node.proc)
        wait_healthy(node.api, node.proc, data_dir=node.data)

    def start_worker(self, name: str, *addrs: int) -> subprocess.Popen[bytes]:
        proc = start(
            [
                "worker",
                "--name",
                name,
                "--dispatcher-addr",
                ",".join(f"127.0.0.1:{p}" for p in addrs),
                "--max-jobs",
                "4",
                "--transport",
                "tcp",
                "--connection-timeout",
                "5",
            ],
            cwd=self.tmp,
            env=self.env,
            log=self.tmp / f"{name}.log",
        )
        self.procs.append(proc)
        return proc

    def primary(self) -> Node:
        return wait_for(
            lambda: next(
                (n for n in (self.a, self.b) if http("GET", f"{n.api}/ready")[0] == 200), None
            ),
            timeout=30,
            what="a primary",
        )

    def client(self) -> Client:
        return Client(self.urls, token=TOKENS[self.a.api], timeout=10)

    def wait_workers(self, count: int) -> None:
        def joined() -> bool:
            code, body = http("GET", f"{self.primary().api}/api/v1/workers")
            return code == 200 and len(body["workers"]) == count

        wait_for(joined, timeout=30, what=f"{count} workers")

    def wait_in_sync(self) -> None:
        def synced() -> bool:
            p = self.primary()
            rep = p.status()["replication"]
            return bool(rep["standby"]) and rep["synced"] and rep["lag_records"] == 0

        wait_for(synced, timeout=30, what="the standby in sync")


def _node(tmp: Path, name: str, *extra: str) -> Node:
    p2p, api = free_port(), free_port()
    data = tmp / name
    args = [
        "--port",
        str(p2p),
        "--api-port",
        str(api),
        "--bind",
        "127.0.0.1",
        "--data-dir",
        str(data),
        "--node-name",
        name,
        *TIMING,
        *extra,
    ]
    return Node(name, p2p, api, data, args)


@contextlib.contextmanager
def ha_pair(
    tmp: Path, *, replication: str = "sync", standby_via: int | None = None, workers: int = 2
) -> Iterator[Pair]:
    """A primary `a`, a standby `b` following it (through port `standby_via` when given, a
    relay), and `workers` workers that know both."""
    a = _node(tmp, "a", "--replication", replication)
    with processes() as procs:
        env = clean_env(OCTASKLY_SECRET_KEY=SECRET, OCTASKLY_LOG_LEVEL="info")
        pair = Pair(tmp, a, a, procs, env, tmp / "side-effects.txt")
        pair.start_node(a)
        target = standby_via or a.p2p
        b = _node(
            tmp,
            "b",
            "--replication",
            replication,
            "--role",
            "standby",
            "--primary-addr",
            f"127.0.0.1:{target}",
        )
        pair.b = b
        pair.start_node(b)
        for i in range(workers):
            pair.start_worker(f"w{i + 1}", a.p2p, b.p2p)
        pair.wait_workers(workers)
        pair.wait_in_sync()
        yield pair


@dataclasses.dataclass
class Ack:
    key: str
    task_id: str
    at: float
    api: str


class Load:
    """`clients` threads submitting without pause through the failover-aware CLI client;
    each task appends its idempotency key to the side-effect file."""

    def __init__(self, pair: Pair, clients: int = 4, command: str = "sleep 0.2") -> None:
        self.pair = pair
        self.acks: list[Ack] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._command = command
        self._threads = [
            threading.Thread(target=self._submit_forever, args=(i,), daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _submit_forever(self, index: int) -> None:
        client = self.pair.client()
        n = 0
        while not self._stop.is_set():
            n += 1
            key = f"c{index}-{n}"
            body = {"command": f"{self._command}; echo {key} >> {self.pair.side_effects}"}
            try:
                task = client.call("POST", "/api/v1/tasks", body, {"Idempotency-Key": key})
            except (errors.TemporaryError, APIError) as exc:
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                continue
            with self._lock:
                self.acks.append(Ack(key, task["id"], time.monotonic(), client.base_url))
            time.sleep(0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.acks)


def wait_all_finished(node: Node, timeout: float = 90) -> dict[str, int]:
    def finished() -> dict[str, int] | None:
        code, stats = http("GET", f"{node.api}/api/v1/stats")
        if code != 200:
            return None
        tasks = stats["tasks"]
        return tasks if tasks["queued"] == 0 and tasks["running"] == 0 else None

    return wait_for(finished, timeout=timeout, what="every task to finish")  # type: ignore[no-any-return]


def check_nothing_lost(pair: Pair, node: Node, acks: list[Ack]) -> dict[str, int]:
    """Every acknowledged task exists on `node` and completed; its side effect happened
    exactly once."""
    by_key = {a.key: a for a in acks}
    missing, not_completed = [], []
    for ack in acks:
        code, task = http("GET", f"{node.api}/api/v1/tasks/{ack.task_id}")
        if code != 200:
            missing.append(ack.key)
        elif task["status"] != "completed":
            not_completed.append((ack.key, task["status"], task.get("error")))
    lines = pair.side_effects.read_text().split() if pair.side_effects.exists() else []
    counts = collections.Counter(lines)
    twice = sorted(k for k, c in counts.items() if c > 1 and k in by_key)
    never = sorted(k for k in by_key if counts[k] == 0)
    report = {
        "acknowledged": len(acks),
        "found": len(acks) - len(missing),
        "lost": len(missing),
        "not_completed": len(not_completed),
        "side_effect_missing": len(never),
        "side_effect_twice": len(twice),
    }
    print(f"checked on {node.name}: {report}")
    assert not missing, f"acknowledged tasks missing on {node.name}: {missing[:10]}"
    assert not not_completed, not_completed[:10]
    assert not never, f"acknowledged tasks whose side effect never happened: {never[:10]}"
    assert not twice, f"tasks whose side effect happened twice: {twice[:10]}"
    return report


EVERY_BYTE = bytes(range(256))
WRITE_EVERY_BYTE = (
    f"{sys.executable} -c 'import sys; sys.stdout.buffer.write(bytes(range(256))); "
    "sys.stderr.buffer.write(bytes(reversed(range(256))))'"
)


def _binary_task(pair: Pair) -> str:
    """A finished task whose output is every byte value (stderr reversed), replicated."""
    code, body = http("POST", f"{pair.a.api}/api/v1/tasks", {"command": WRITE_EVERY_BYTE})
    assert code == 201, body
    task_id = str(body["id"])
    wait_for(
        lambda: http("GET", f"{pair.a.api}/api/v1/tasks/{task_id}")[1]["status"] == "completed",
        what="the binary task to complete",
    )
    pair.wait_in_sync()
    return task_id


def _check_binary_task(pair: Pair, node: Node, task_id: str) -> None:
    """The task's output is exactly its bytes on `node`: raw, base64 and `octaskly logs`."""
    for stream, expected in (("stdout", EVERY_BYTE), ("stderr", EVERY_BYTE[::-1])):
        request = urllib.request.Request(
            f"{node.api}/api/v1/tasks/{task_id}/logs?format=raw&stream={stream}",
            headers={"Authorization": f"Bearer {TOKENS[node.api]}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.read() == expected
    record = http("GET", f"{node.api}/api/v1/tasks/{task_id}")[1]
    assert base64.b64decode(record["stdout_base64"]) == EVERY_BYTE
    logs = subprocess.run(
        [*OCTASKLY, "logs", task_id],
        cwd=pair.tmp,
        env=client_env(node.api),
        capture_output=True,
        timeout=60,
    )
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, EVERY_BYTE, EVERY_BYTE[::-1])
    print(f"binary output of {task_id} exact on {node.name} (raw, base64, octaskly logs)")


def test_kill_9_primary_under_sync_load(tmp_path: Path) -> None:
    """kill -9 the primary while 4 clients submit with sync replication: every 201 is on
    the new primary, running tasks complete once, failover well under 10 s. A task's binary
    output replicated before the kill is exact on the new primary."""
    with ha_pair(tmp_path, replication="sync") as pair:
        binary = _binary_task(pair)
        with Load(pair) as load:
            wait_for(lambda: load.count() >= 40, timeout=60, what="40 acknowledged tasks")
            assert pair.a.proc is not None
            running = http("GET", f"{pair.a.api}/api/v1/stats")[1]["tasks"]["running"]
            killed_at = time.monotonic()
            pair.a.proc.send_signal(signal.SIGKILL)
            pair.a.proc.wait()
            wait_for(
                lambda: any(a.api == pair.b.api for a in load.acks),
                timeout=30,
                what="a write accepted by the new primary",
            )
            promoted_count = load.count()
            wait_for(
                lambda: load.count() >= promoted_count + 20,
                timeout=60,
                what="20 more acknowledged tasks",
            )
        acks = load.acks
        last_on_a = max(a.at for a in acks if a.api == pair.a.api)
        first_on_b = min(a.at for a in acks if a.api == pair.b.api)
        failover = first_on_b - last_on_a
        print(
            f"failover: last write on the old primary -> first on the new: {failover:.2f}s "
            f"(kill -9 -> first write {first_on_b - killed_at:.2f}s); {running} tasks were "
            f"running at the kill; client retries: {dict(load.errors)}"
        )
        assert failover < 10
        status = pair.b.status()
        assert status["role"] == "primary" and status["term"] == 2
        assert status["events"][-1]["event"] == "promoted"
        wait_all_finished(pair.b)
        check_nothing_lost(pair, pair.b, acks)
        _check_binary_task(pair, pair.b, binary)


def test_cut_link_between_dispatchers_alone_does_not_promote(tmp_path: Path) -> None:
    """Only the primary⇄standby link is cut: the workers still reach the primary and say
    so, the standby stays standby; the primary keeps serving (degraded); healed, the
    standby catches up."""
    relay = relays.PartitionRelay(0)
    with relays.running(relay), _pair_through_relay(tmp_path, relay) as pair:
        before = pair.a.status()["lsn"]
        relay.cut()
        cut_at = time.monotonic()
        time.sleep(FAILOVER * 3)
        b = pair.b.status()
        a = pair.a.status()
        print(
            f"after {time.monotonic() - cut_at:.1f}s of cut link: standby role={b['role']} "
            f"blocked={b['failover']['blocked']!r}; primary degraded={a['degraded']!r}"
        )
        assert b["role"] == "standby" and b["term"] == 1
        assert "still reach it" in (b["failover"]["blocked"] or "")
        assert http("GET", f"{pair.b.api}/ready")[0] == 503
        # the primary keeps serving while the standby is gone, and says it is degraded
        code, _ = http("POST", f"{pair.a.api}/api/v1/tasks", {"command": "echo alone"})
        assert code == 201
        health = http("GET", f"{pair.a.api}/health")[1]
        assert health["status"] == "degraded" and "standby" in health["degraded_reason"]
        stats = http("GET", f"{pair.a.api}/api/v1/stats")[1]
        assert stats["ha"]["degraded"]
        relay.heal()
        pair.wait_in_sync()
        after = pair.a.status()
        assert after["lsn"] > before
        assert pair.b.status()["lsn"] == after["lsn"]
        assert http("GET", f"{pair.a.api}/health")[1]["status"] == "healthy"
        print(f"healed: standby caught up to transaction {after['lsn']}")


@contextlib.contextmanager
def _pair_through_relay(tmp: Path, relay: relays.PartitionRelay) -> Iterator[Pair]:
    """As ha_pair, with the standby reaching the primary only through `relay`."""
    a = _node(tmp, "a", "--replication", "sync")
    relay.target_port = a.p2p
    with processes() as procs:
        env = clean_env(OCTASKLY_SECRET_KEY=SECRET, OCTASKLY_LOG_LEVEL="info")
        pair = Pair(tmp, a, a, procs, env, tmp / "side-effects.txt")
        pair.start_node(a)
        b = _node(
            tmp,
            "b",
            "--replication",
            "sync",
            "--role",
            "standby",
            "--primary-addr",
            f"127.0.0.1:{relay.port}",
        )
        pair.b = b
        pair.start_node(b)
        for i in range(2):
            pair.start_worker(f"w{i + 1}", a.p2p, b.p2p)
        pair.wait_workers(2)
        pair.wait_in_sync()
        yield pair


def test_old_primary_rejoins_then_switchover_three_times_under_load(tmp_path: Path) -> None:
    """After a failover the old primary, restarted as it was, rejoins as standby and
    catches up; then `octaskly ha switchover` back and forth 3 times under load loses
    nothing and runs nothing twice."""
    with ha_pair(tmp_path, replication="sync") as pair:
        assert pair.a.proc is not None
        with Load(pair, clients=2) as load:
            wait_for(lambda: load.count() >= 20, timeout=60, what="20 acknowledged tasks")
            pair.a.proc.send_signal(signal.SIGKILL)
            pair.a.proc.wait()
            wait_for(lambda: pair.b.status()["role"] == "primary", timeout=30, what="promotion")
            pair.start_node(pair.a)  # the same command line: role primary
            wait_for(lambda: pair.a.status()["role"] == "standby", timeout=30, what="a rejoins")
            pair.wait_in_sync()
            print(f"old primary rejoined as standby at term {pair.a.status()['term']}")
            env = clean_env(OCTASKLY_API_URL=pair.urls, OCTASKLY_TOKEN=TOKENS[pair.a.api])
            snapshots = _snapshots_sent(tmp_path)
            for round_ in range(3):
                before = pair.primary()
                result = run(["ha", "switchover"], cwd=tmp_path, env=env, timeout=60)
                assert result.returncode == 0, result.stderr
                after = pair.primary()
                print(f"switchover {round_ + 1}: {result.stdout.strip()}")
                assert after is not before
                pair.wait_in_sync()
                count = load.count()
                wait_for(lambda c=count: load.count() >= c + 10, timeout=60, what="more acks")
            # each old primary continued from its exact position: no snapshot was needed
            assert _snapshots_sent(tmp_path) == snapshots
            status = run(["ha", "status"], cwd=tmp_path, env=env)
            assert status.returncode == 0, status.stderr
            print(status.stdout)
            assert "primary" in status.stdout and "standby" in status.stdout
        final = pair.primary()
        assert final.status()["term"] == 5  # failover, then three switchovers
        wait_all_finished(final)
        check_nothing_lost(pair, final, load.acks)


def _snapshots_sent(tmp: Path) -> int:
    return sum(log.read_text().count("gets a snapshot") for log in tmp.glob("[ab]-*.log"))


def test_async_replication_lag_is_reported_and_small_under_load(tmp_path: Path) -> None:
    """Async replication under a batch-submit load: the primary reports the lag (records
    and seconds) and it stays under a second."""
    with ha_pair(tmp_path, replication="async") as pair:
        client = pair.client()
        lags: list[tuple[int, float]] = []
        stop_at = time.monotonic() + 8
        submitted = 0
        while time.monotonic() < stop_at and submitted < 6000:
            batch = {"tasks": [{"command": "true"} for _ in range(100)]}
            client.call("POST", "/api/v1/tasks/batch", batch)
            submitted += 100
            rep = pair.a.status()["replication"]
            lags.append((rep["lag_records"], rep["lag_seconds"]))
        wait_all_finished(pair.a)
        pair.wait_in_sync()
        worst_records = max(r for r, _ in lags)
        worst_seconds = max(s for _, s in lags)
        print(
            f"async replication: {submitted} tasks submitted, {len(lags)} samples, "
            f"worst lag {worst_records} records / {worst_seconds:.3f}s"
        )
        assert worst_seconds < 1.0
        assert pair.b.status()["lsn"] == pair.a.status()["lsn"]
        # the standby's replica is an ordinary database: `octaskly backup` works on it
        out = tmp_path / "standby-backup.db"
        result = run(["backup", "--output", str(out), "--data-dir", str(pair.b.data)], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        stats = http("GET", f"{pair.a.api}/api/v1/stats")[1]
        assert f"{stats['database']['total_tasks']} tasks" in result.stdout + result.stderr


def test_hostile_replication_peers_are_refused(tmp_path: Path) -> None:
    """A 'standby' without the cluster key is refused and audited; a worker pointed only
    at the standby is redirected to the primary; a standby's API refuses work with 503
    naming the primary."""
    with ha_pair(tmp_path, replication="async", workers=0) as pair:
        bad = _node(
            tmp_path, "intruder", "--role", "standby", "--primary-addr", f"127.0.0.1:{pair.a.p2p}"
        )
        env = clean_env(OCTASKLY_SECRET_KEY="not-the-cluster-key-at-all", OCTASKLY_LOG_LEVEL="info")
        proc = start(["dispatcher", *bad.args], cwd=tmp_path, env=env, log=tmp_path / "bad.log")
        pair.procs.append(proc)
        wait_for(
            lambda: "standby_rejected" in (pair.a.data / "logs" / "audit.log").read_text(),
            timeout=30,
            what="the refusal in the audit log",
        )
        assert pair.a.status()["replication"]["standby"]["name"] == "b"
        stop(proc)
        # a worker that only knows the standby is sent to the primary
        pair.start_worker("lost", pair.b.p2p)
        pair.wait_workers(1)
        code, body = http("POST", f"{pair.b.api}/api/v1/tasks", {"command": "true"})
        assert code == 503 and "standby" in body["error"]
        code, body = http("GET", f"{pair.b.api}/ready")
        assert code == 503 and body["role"] == "standby"
        # its metrics say so too (no token needed for /metrics)
        with urllib.request.urlopen(f"{pair.b.api}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'octaskly_ha_role{role="standby"} 1.0' in metrics
        # promote refuses on the primary; bad bodies are 400
        assert http("POST", f"{pair.a.api}/api/v1/ha/promote", {})[0] == 409
        assert http("POST", f"{pair.b.api}/api/v1/ha/promote", {"force": "yes"})[0] == 400
        assert http("POST", f"{pair.a.api}/api/v1/ha/switchover", {"timeout": -1})[0] == 400
        assert http("POST", f"{pair.a.api}/api/v1/ha/switchover", {"x": 1})[0] == 400
        assert http("POST", f"{pair.b.api}/api/v1/ha/switchover", {})[0] in (409, 503)
