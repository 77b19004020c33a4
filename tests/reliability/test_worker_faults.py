"""Worker faults with real processes: a worker killed with -9 mid-task, a worker frozen
(SIGSTOP) past the dispatcher's connection timeout and then thawed (SIGCONT), and a worker
whose network is cut for 30 s.

Everything is real: a `python -m octaskly dispatcher` process (SQLite in tmp_path),
`octaskly worker` processes over TCP, SIGKILL/SIGSTOP/SIGCONT, and for the network fault a
network namespace joined to the host by a veth pair whose worker-side end is set down
(`ip link set … down`: the worker's packets go nowhere; `tc netem` is not available on
these machines). The dispatcher runs with a 1 s heartbeat interval and a 3 s connection
timeout so that the faults are noticed in seconds, not the default 15 s.

Each task says which run produced its output: it prints `attempt=$OCTASKLY_ATTEMPT` and its
working directory (`$OCTASKLY_WORKDIR`, under the worker's own `--work-dir`, so it names
the worker), and appends `TASK_ID ATTEMPT` to a side-effect file — one line per run that
got that far. Attempt 1 and the re-run may sleep for different times
(`$OCTASKLY_ATTEMPT` picks), to order the late result against the re-run.

What wins when two runs of one task report (octaskly/services/dispatcher.py, `on_result`
and `_on_late_result`): the dispatcher's in-memory run (task, worker, attempt) is a lease.
The result of the run holding the lease is recorded; a result from any other run is
accepted only while the task is queued again and not yet restarted (the work is done: it
is not run again, "first result wins"); once the task was restarted elsewhere, or has
ended, a late result is rejected ("rejected stale result" in the log) and never overwrites
the re-run's. These tests check both cases, and that every task ends exactly once
(one `task_finished` entry in the audit log).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e import procs
from tests.e2e.procs import OCTASKLY, SECRET, clean_env, free_port, http, start, wait_for

KEEPALIVE = 1.0
TIMEOUT = 3.0  # the dispatcher's (and the workers') connection timeout
OUTAGE = 30.0


def _command(side_effects: Path, first: float, again: float) -> str:
    """Sleeps `first` s in attempt 1 and `again` s in later attempts, then appends one line."""
    return (
        'echo "attempt=$OCTASKLY_ATTEMPT workdir=$OCTASKLY_WORKDIR"; '
        f'if [ "$OCTASKLY_ATTEMPT" = 1 ]; then sleep {first}; else sleep {again}; fi; '
        f'echo "$OCTASKLY_TASK_ID $OCTASKLY_ATTEMPT" >> {side_effects}'
    )


@dataclasses.dataclass
class Cluster:
    tmp: Path
    host: str
    p2p: int
    api_port: int
    procs: list[subprocess.Popen[bytes]]
    dispatcher: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    @property
    def side_effects(self) -> Path:
        return self.tmp / "side-effects.log"

    @property
    def log(self) -> Path:
        return self.tmp / "dispatcher.log"

    def start_dispatcher(self) -> None:
        args = [
            "dispatcher",
            *("--port", str(self.p2p), "--api-port", str(self.api_port), "--bind", self.host),
            *("--data-dir", str(self.data), "--secret-key", SECRET, "--quic-enabled", "false"),
            *("--keepalive-interval", str(KEEPALIVE), "--connection-timeout", str(TIMEOUT)),
        ]
        self.dispatcher = start(args, cwd=self.tmp, log=self.log)
        self.procs.append(self.dispatcher)
        procs.wait_healthy(self.api, self.dispatcher, data_dir=self.data)

    def start_worker(self, name: str, netns: str | None = None) -> subprocess.Popen[bytes]:
        args = [
            "worker",
            *("--dispatcher-addr", f"{self.host}:{self.p2p}", "--name", name),
            *("--secret-key", SECRET, "--transport", "tcp", "--max-jobs", "2"),
            *("--connection-timeout", str(TIMEOUT), "--work-dir", str(self.tmp / f"{name}-work")),
            *("--data-dir", str(self.tmp / f"{name}-data")),
        ]
        log = self.tmp / f"{name}.log"
        if netns is None:
            proc = start(args, cwd=self.tmp, log=log)
        else:  # `ip netns exec` execs the worker: the pid is the worker's
            with open(log, "wb") as out:
                proc = subprocess.Popen(  # (root's tasks, as procs.start gives: see there)
                    ["ip", "netns", "exec", netns, *OCTASKLY, *args, "--task-user", "root"],
                    cwd=self.tmp,
                    env=clean_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        self.procs.append(proc)
        self.workers[name] = proc
        return proc

    def connected(self) -> set[str]:
        code, body = http("GET", f"{self.api}/api/v1/workers")
        return {w["name"] for w in body["workers"]} if code == 200 else set()

    def wait_connected(self, *names: str, timeout: float = 30) -> None:
        wait_for(lambda: self.connected() >= set(names), timeout=timeout, what=f"workers {names}")

    def submit(self, command: str) -> str:
        code, body = http("POST", f"{self.api}/api/v1/tasks", {"command": command})
        assert code == 201, body
        return str(body["id"])

    def task(self, task_id: str) -> dict[str, Any]:
        code, body = http("GET", f"{self.api}/api/v1/tasks/{task_id}")
        assert code == 200, body
        return body  # type: ignore[no-any-return]

    def wait_task(self, task_id: str, what: str, timeout: float = 30, **fields: Any) -> float:
        """Until the task has all of `fields`; the monotonic time it was seen so."""
        wait_for(
            lambda: all(self.task(task_id).get(k) == v for k, v in fields.items()),
            timeout=timeout,
            what=f"task {task_id}: {what}",
        )
        return time.monotonic()

    def runs(self) -> collections.Counter[tuple[str, int]]:
        """(task id, attempt) -> how many times a run of it appended its line."""
        if not self.side_effects.exists():
            return collections.Counter()
        pairs = (line.split() for line in self.side_effects.read_text().splitlines())
        return collections.Counter((task_id, int(attempt)) for task_id, attempt in pairs)

    def finished_entries(self) -> collections.Counter[str]:
        """task id -> `task_finished` entries in the audit log (stop the dispatcher first:
        the log is written in batches)."""
        path = self.data / "logs" / "audit.log"
        entries = [json.loads(line) for line in path.read_text().splitlines() if line]
        return collections.Counter(
            e["task_id"] for e in entries if e["event_type"] == "task_finished"
        )

    def rejected(self, task_id: str, attempt: int, worker: str) -> bool:
        return f"rejected stale result of task {task_id} attempt {attempt} from {worker}" in (
            self.log.read_text()
        )

    def stop_dispatcher(self) -> None:
        assert self.dispatcher is not None
        assert procs.stop(self.dispatcher) == 0, self.log.read_text()[-3000:]


@contextlib.contextmanager
def cluster(tmp: Path, host: str = "127.0.0.1") -> Iterator[Cluster]:
    with procs.processes() as ps:
        c = Cluster(tmp, host, free_port(), free_port(), ps)
        c.start_dispatcher()
        yield c


def _ran_on(task: dict[str, Any]) -> tuple[int, str]:
    """(attempt, worker name) of the run whose output the task record holds."""
    match = re.search(r"attempt=(\d+) workdir=\S*/(w\d)-work/", task["stdout"])
    assert match, task["stdout"]
    return int(match.group(1)), match.group(2)


def _other(name: str) -> str:
    return "w2" if name == "w1" else "w1"


# -- a. kill -9 ------------------------------------------------------------------------------
def test_worker_killed_mid_task_its_tasks_rerun_on_the_other(tmp_path: Path) -> None:
    """kill -9 a worker running tasks: they are re-queued (attempts grows) and complete on
    the other worker; nothing is lost; every side effect happened at least once."""
    with cluster(tmp_path) as c:
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_connected("w1", "w2")
        command = _command(c.side_effects, 1.5, 0.5)
        ids = [c.submit(command) for _ in range(6)]  # 4 slots: 4 run, 2 wait
        wait_for(
            lambda: sum(c.task(t)["status"] == "running" for t in ids) == 4,
            what="4 tasks running",
        )
        on = {t: c.task(t)["worker_id"] for t in ids if c.task(t)["status"] == "running"}
        victim = collections.Counter(on.values()).most_common(1)[0][0]
        hit = sorted(t for t, w in on.items() if w == victim)
        killed = time.monotonic()
        c.workers[victim].send_signal(signal.SIGKILL)
        c.workers[victim].wait()
        requeued = max(
            c.wait_task(t, "re-run on the survivor", attempts=2, worker_id=_other(victim))
            for t in hit
        )
        for t in ids:
            c.wait_task(t, "completed", status="completed")
        done = time.monotonic()
        tasks = {t: c.task(t) for t in ids}
        time.sleep(1.6)  # the killed worker's orphaned runs (if any) have finished by now
        runs = c.runs()
        c.stop_dispatcher()
        finished = c.finished_entries()
    orphans = sum(runs[(t, 1)] for t in hit)
    per_task = [sum(runs[(t, a)] for a in (1, 2, 3)) for t in ids]
    print(
        f"kill -9 of {victim} running {len(hit)} tasks: re-run on {_other(victim)} "
        f"{requeued - killed:.2f}s later, all {len(ids)} completed {done - killed:.2f}s after "
        f"the kill; lost 0; side effects per task {per_task}"
        f" (the killed worker's orphaned first runs that still finished: {orphans}/{len(hit)})"
    )
    for t, task in tasks.items():
        assert task["status"] == "completed" and task["exit_code"] == 0, task
        if t in hit:
            assert task["attempts"] == 2 and task["worker_id"] == _other(victim), task
            assert _ran_on(task) == (2, _other(victim)), task["stdout"]
            assert runs[(t, 2)] == 1, runs
        assert sum(runs[(t, a)] for a in (1, 2, 3)) >= 1, f"side effect of {t} never happened"
        assert finished[t] == 1, f"task {t} ended {finished[t]} times"
    assert len(hit) >= 1


# -- b. SIGSTOP past the timeout, then SIGCONT -------------------------------------------------
def test_frozen_worker_late_result_does_not_overwrite_the_rerun(tmp_path: Path) -> None:
    """A worker frozen past the connection timeout loses its task to the other worker; when
    it is thawed while the re-run is still going, its finished attempt-1 result arrives
    late and is rejected: the stored result is the re-run's, the task ends once."""
    with cluster(tmp_path) as c:
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_connected("w1", "w2")
        # attempt 1 finishes (on the frozen worker) long before the re-run does
        task_id = c.submit(_command(c.side_effects, 1.0, 4.0))
        c.wait_task(task_id, "running", status="running")
        frozen = c.task(task_id)["worker_id"]
        c.workers[frozen].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            rerun = c.wait_task(
                task_id, "re-run elsewhere", attempts=2, worker_id=_other(frozen), timeout=20
            )
            wait_for(lambda: frozen not in c.connected(), what="the frozen worker dropped")
            time.sleep(0.3)  # attempt 1's process (not frozen: its own session) is done
        finally:
            c.workers[frozen].send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        assert c.task(task_id)["status"] == "running"  # the re-run is still going
        wait_for(lambda: c.rejected(task_id, 1, frozen), timeout=15, what="the late result")
        late = time.monotonic()
        still_running = c.task(task_id)["status"] == "running"
        c.wait_connected(frozen)
        back = time.monotonic()
        c.wait_task(task_id, "completed", status="completed")
        task = c.task(task_id)
        runs = c.runs()
        c.stop_dispatcher()
        finished = c.finished_entries()
    print(
        f"{frozen} frozen: task re-run on {_other(frozen)} {rerun - stopped:.2f}s later "
        f"(timeout {TIMEOUT:g}s); thawed after {thawed - stopped:.2f}s; its late attempt-1 "
        f"result rejected {late - thawed:.2f}s after the thaw (re-run still running: "
        f"{still_running}); stored: attempt {_ran_on(task)[0]} from {_ran_on(task)[1]}; "
        f"{frozen} connected again {back - thawed:.2f}s after the thaw; runs {dict(runs)}; "
        f"task_finished entries {finished[task_id]}"
    )
    assert still_running, "the late result was not tested against a running re-run"
    assert task["attempts"] == 2 and task["worker_id"] == _other(frozen), task
    assert task["exit_code"] == 0 and _ran_on(task) == (2, _other(frozen)), task["stdout"]
    assert runs == {(task_id, 1): 1, (task_id, 2): 1}, runs
    assert finished[task_id] == 1


def test_frozen_worker_result_wins_when_the_task_was_not_restarted(tmp_path: Path) -> None:
    """The other case: both workers frozen, so the re-queued task is not restarted; the
    first thawed worker's finished result is accepted and the task is not run again."""
    with cluster(tmp_path) as c:
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_connected("w1", "w2")
        task_id = c.submit(_command(c.side_effects, 1.0, 1.0))
        c.wait_task(task_id, "running", status="running")
        owner = c.task(task_id)["worker_id"]
        for proc in c.workers.values():
            proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            requeued = c.wait_task(task_id, "re-queued", status="queued", timeout=20)
            time.sleep(0.5)
        finally:
            c.workers[owner].send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        c.wait_task(task_id, "completed", status="completed")
        done = time.monotonic()
        c.workers[_other(owner)].send_signal(signal.SIGCONT)
        c.wait_connected("w1", "w2")
        time.sleep(2.0)  # a wrongful re-run would have started (and finished) by now
        task = c.task(task_id)
        runs = c.runs()
        c.stop_dispatcher()
        finished = c.finished_entries()
    print(
        f"both frozen: task re-queued {requeued - stopped:.2f}s later; {owner} thawed, its "
        f"result accepted {done - thawed:.2f}s later: stored attempt {_ran_on(task)[0]} "
        f"from {_ran_on(task)[1]}, attempts {task['attempts']}; runs {dict(runs)}"
    )
    assert task["status"] == "completed" and task["worker_id"] == owner, task
    assert task["attempts"] == 1 and _ran_on(task) == (1, owner), task
    assert runs == {(task_id, 1): 1}, runs
    assert finished[task_id] == 1


# -- c. network cut for 30 s ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Veth:
    netns: str
    host_end: str
    ns_end: str
    host_addr: str
    ns_addr: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def veth_netns() -> Iterator[Veth]:
    """A network namespace joined to the host by a veth pair on a random 10.79.x.0/24; the
    host end keeps its address (reachable on the host) when the link is down."""
    tag = secrets.token_hex(3)
    subnet = f"10.79.{secrets.randbelow(256)}"
    v = Veth(f"oct-f-{tag}", f"ofh{tag}", f"ofw{tag}", f"{subnet}.1", f"{subnet}.2")
    try:
        _ip("netns", "add", v.netns)
        _ip("link", "add", v.host_end, "type", "veth", "peer", "name", v.ns_end, "netns", v.netns)
        _ip("addr", "add", f"{v.host_addr}/24", "dev", v.host_end)
        _ip("link", "set", v.host_end, "up")
        _ip("-n", v.netns, "link", "set", "lo", "up")
        _ip("-n", v.netns, "addr", "add", f"{v.ns_addr}/24", "dev", v.ns_end)
        _ip("-n", v.netns, "link", "set", v.ns_end, "up")
        yield v
    finally:  # deleting the namespace deletes the pair
        subprocess.run(["ip", "netns", "del", v.netns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", v.host_end], capture_output=True, timeout=10)


def _link(v: Veth, state: str) -> None:
    _ip("-n", v.netns, "link", "set", v.ns_end, state)


def test_worker_network_cut_for_30s(tmp_path: Path) -> None:
    """The worker in a namespace loses its network for 30 s while running a task: the
    dispatcher declares it lost after its timeout and the task is re-run on the worker on
    the host; when the link is back, the first worker reconnects and its stale result is
    rejected. Nothing lost, nothing ended twice."""
    with veth_netns() as v, cluster(tmp_path, host=v.host_addr) as c:
        c.start_worker("w1", netns=v.netns)
        c.wait_connected("w1")
        task_id = c.submit(_command(c.side_effects, 8.0, 2.0))
        c.wait_task(task_id, "running on w1", status="running", worker_id="w1")
        c.start_worker("w2")  # on the host, free for the re-run
        c.wait_connected("w1", "w2")
        _link(v, "down")
        cut = time.monotonic()
        try:
            wait_for(lambda: "w1" not in c.connected(), timeout=15, what="w1 declared lost")
            lost = time.monotonic()
            rerun = c.wait_task(task_id, "re-run on w2", attempts=2, worker_id="w2")
            done = c.wait_task(task_id, "completed", status="completed")
            stored = c.task(task_id)
            time.sleep(max(0.0, cut + OUTAGE - time.monotonic()))
        finally:
            _link(v, "up")
        restored = time.monotonic()
        c.wait_connected("w1", timeout=30)
        back = time.monotonic()
        wait_for(lambda: c.rejected(task_id, 1, "w1"), timeout=15, what="w1's stale result")
        late = time.monotonic()
        after = c.task(task_id)
        check = c.submit("echo after")  # the cluster works normally afterwards
        c.wait_task(check, "completed", status="completed")
        runs = c.runs()
        c.stop_dispatcher()
        finished = c.finished_entries()
    print(
        f"link down for {restored - cut:.1f}s: w1 declared lost after {lost - cut:.2f}s "
        f"(timeout {TIMEOUT:g}s), task re-run on w2 {rerun - cut:.2f}s and completed "
        f"{done - cut:.2f}s after the cut; w1 reconnected {back - restored:.2f}s after the "
        f"link came back, its stale attempt-1 result rejected {late - back:.2f}s later; "
        f"stored: attempt {_ran_on(after)[0]} from {_ran_on(after)[1]}; runs {dict(runs)}; "
        f"task_finished entries {finished[task_id]}; lost 0"
    )
    assert stored["status"] == "completed" and _ran_on(stored) == (2, "w2"), stored
    assert {k: after[k] for k in ("status", "attempts", "worker_id", "stdout", "completed_at")} == {
        k: stored[k] for k in ("status", "attempts", "worker_id", "stdout", "completed_at")
    }, "the stale result changed the stored one"
    assert runs == {(task_id, 1): 1, (task_id, 2): 1}, runs
    assert finished[task_id] == 1 and finished[check] == 1, finished
