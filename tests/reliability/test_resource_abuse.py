"""Resource abuse on the API port of a real dispatcher process: big bodies, 10,000 idle
connections, slowloris. The dispatcher must stay responsive (/health p99 < 100 ms over
fresh connections, as a load balancer's check makes them), keep its memory bounded, store
nothing from refused requests, and cut connections that hold resources without sending a
request within `connection_timeout`.

- Bodies: 10 MB of JSON in a submit (the command over its 64 KiB limit), 10 MB of
  garbage, a 10 MB batch whose last task is invalid, a batch of 10,001 tasks: each a
  clear 400 naming the problem, nothing stored. A body declared over the 64 MiB limit is
  a 413 from its headers alone (the body is never read); one sent chunked, with no
  declared length, is cut at 64 MiB.
- 10,000 idle connections: the test raises its own RLIMIT_NOFILE; the dispatcher starts
  with a soft limit of 1,024 (a shell's usual) and must raise it itself to hold them. While
  they are open: /health p99, a submit run by a real worker; RSS before/peak/after. The
  server closes them after connection_timeout (keep-alive timeout).
- Slowloris: connections sending their request headers one byte a second are cut after
  connection_timeout; meanwhile /health p99 and memory as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import resource
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e import procs

MB = 1024 * 1024
HEALTH_P99 = 0.100


@dataclasses.dataclass
class Dispatcher:
    api: str
    api_port: int
    p2p_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    @property
    def fds(self) -> int:
        return int(psutil.Process(self.proc.pid).num_fds())


@contextlib.contextmanager
def dispatcher(
    tmp: Path, *, connection_timeout: float, nofile_soft: int | None = None
) -> Iterator[Dispatcher]:
    api_port, p2p_port = procs.free_port(), procs.free_port()
    data, log = tmp / "data", tmp / "dispatcher.log"
    args = [
        *procs.OCTASKLY, "dispatcher", "--port", str(p2p_port), "--api-port", str(api_port),
        "--bind", "127.0.0.1", "--data-dir", str(data), "--secret-key", procs.SECRET,
        "--quic-enabled", "false", "--connection-timeout", str(connection_timeout),
    ]  # fmt: skip

    def low_fd_limit() -> None:  # the soft limit a login shell usually gives
        if nofile_soft is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_soft, hard))

    with procs.processes() as ps, open(log, "wb") as out:
        ps.append(
            subprocess.Popen(
                args,
                cwd=tmp,
                env=procs.clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=low_fd_limit,
            )
        )
        api = f"http://127.0.0.1:{api_port}"
        procs.wait_healthy(api, ps[0], data_dir=data)
        d = Dispatcher(api, api_port, p2p_port, ps[0], log)
        yield d
        assert ps[0].poll() is None, "the dispatcher died"
        output = log.read_text(errors="replace")
        assert "Traceback" not in output, output[-3000:]


def start_worker(tmp: Path, d: Dispatcher) -> subprocess.Popen[bytes]:
    return procs.start(
        ["worker", "--dispatcher-addr", f"127.0.0.1:{d.p2p_port}", "--name", "w1",
         "--transport", "tcp", "--secret-key", procs.SECRET],
        cwd=tmp,
    )  # fmt: skip


def health_latencies(d: Dispatcher, n: int = 200) -> list[float]:
    """/health over a new connection each time; seconds, sorted."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", d.api_port, timeout=10)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        out.append(time.perf_counter() - started)
        assert response.status == 200
    return sorted(out)


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread; `.peak` is the largest seen."""

    def __init__(self, d: Dispatcher) -> None:
        self.d, self.peak, self._stop = d, d.rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.d.rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raw_request(d: Dispatcher, head: bytes, body: bytes = b"", timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", d.api_port), timeout=timeout) as sock:
        sock.sendall(head + body)
        return _read_response(sock)


def _read_response(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> Any:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def post(d: Dispatcher, path: str, body: bytes) -> bytes:
    token = procs.TOKENS[d.api]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return raw_request(d, head, body)


# -- bodies -----------------------------------------------------------------------------------


def test_big_bodies_are_clear_errors_and_store_nothing(tmp_path: Path) -> None:
    with dispatcher(tmp_path, connection_timeout=15) as d:
        before = d.rss
        token = procs.TOKENS[d.api]
        results: dict[str, tuple[int, str]] = {}
        with PeakRSS(d) as bodies:
            big_command = json.dumps({"command": "x" * (10 * MB)}).encode()
            r = post(d, "/api/v1/tasks", big_command)
            results["10 MB command"] = (status_of(r), json_of(r).get("field"))
            r = post(d, "/api/v1/tasks", b"\x00garbage" * (10 * MB // 8))
            results["10 MB garbage"] = (status_of(r), json_of(r)["error"][:40])
            tasks = [{"command": "echo " + "y" * 1100}] * 9_999 + [{"command": ""}]
            batch = json.dumps({"tasks": tasks}).encode()
            assert len(batch) > 10 * MB
            r = post(d, "/api/v1/tasks/batch", batch)
            results["10 MB batch, last task invalid"] = (status_of(r), json_of(r).get("field"))
            many = json.dumps({"tasks": [{"command": "t"}] * 10_001}).encode()
            r = post(d, "/api/v1/tasks/batch", many)
            results["batch of 10,001"] = (status_of(r), json_of(r).get("field"))

        # over 64 MiB, declared: refused from the headers, the body never read
        settled = d.rss
        with PeakRSS(d) as declared:
            head = (
                f"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {70 * MB}\r\n\r\n"
            ).encode()
            started = time.monotonic()
            r = raw_request(d, head, b"{", timeout=10)
            results["70 MB declared"] = (status_of(r), f"after {time.monotonic() - started:.3f} s")

        # over 64 MiB, chunked (no length to refuse it by): cut at the limit
        with PeakRSS(d) as chunked:
            with socket.create_connection(("127.0.0.1", d.api_port), timeout=30) as sock:
                sock.sendall(
                    f"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                    f"\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                )
                chunk = b"z" * MB
                sent = 0
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for _ in range(70):
                        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent += len(chunk)
                    sock.sendall(b"0\r\n\r\n")
                r = _read_response(sock)
            results["70 MB chunked"] = (status_of(r), f"after {sent // MB} MB sent")
        after = d.rss
        _, page = procs.http("GET", f"{d.api}/api/v1/tasks?limit=1")
        stored = page["total"]
        ok, _ = procs.http("POST", f"{d.api}/api/v1/tasks", {"command": "true"})
        health = health_latencies(d, 50)
        print(
            "\n" + "\n".join(f"{name}: {code} {detail}" for name, (code, detail) in results.items())
            + f"\ntasks stored by refused requests {stored}; RSS {before / MB:.0f} MB before, "
            f"peak {bodies.peak / MB:.0f} MB with the 10 MB bodies; the declared 70 MB: "
            f"{settled / MB:.0f} -> peak {declared.peak / MB:.0f} MB; the chunked 70 MB: peak "
            f"{chunked.peak / MB:.0f} MB; {after / MB:.0f} MB after; then a submit {ok}, "
            f"/health p99 {pct(health, 0.99) * 1000:.1f} ms"
        )  # fmt: skip
    assert results["10 MB command"] == (400, "command")
    assert results["10 MB garbage"][0] == 400
    assert results["10 MB batch, last task invalid"] == (400, "tasks[9999].command")
    assert results["batch of 10,001"] == (400, "tasks")
    assert results["70 MB declared"][0] == 413
    assert results["70 MB chunked"][0] == 413
    assert stored == 0 and ok == 201
    assert declared.peak - settled < 8 * MB  # the 70 MB were not read
    assert chunked.peak - settled < 64 * MB + 64 * MB  # held at most the 64 MiB limit (+ copies)
    assert bodies.peak - before < 300 * MB
    assert pct(health, 0.99) < HEALTH_P99


# -- 10,000 idle connections ---------------------------------------------------------------------

IDLE = 10_000


@contextlib.contextmanager
def fd_limit(wanted: int) -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
    except (ValueError, OSError):
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {wanted} (hard limit {hard}, not root)")
    try:
        yield wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, new_hard))


def open_idle(d: Dispatcher, n: int, batch: int = 500) -> tuple[list[socket.socket], list[float]]:
    """n connections that send nothing, in batches the dispatcher has accepted (a client's
    connect() returns once the kernel has the handshake, before the server accepts: when
    its accept queue overflows under load, Linux keeps the connection half-open)."""
    socks: list[socket.socket] = []
    opened: list[float] = []
    base = stable_fds(d)
    while len(socks) < n:
        for _ in range(min(batch, n - len(socks))):
            socks.append(socket.create_connection(("127.0.0.1", d.api_port), timeout=10))
            opened.append(time.monotonic())
        procs.wait_for(lambda: d.fds - base >= len(socks), timeout=15, what="accepted")
    return socks, opened


def stable_fds(d: Dispatcher) -> int:
    """The dispatcher's open files, without the odd short-lived one (a database journal, a
    status request just served)."""
    samples = []
    for _ in range(5):
        samples.append(d.fds)
        time.sleep(0.05)
    return min(samples)


def wait_closed_by_server(
    socks: list[socket.socket], opened: list[float], deadline: float
) -> list[float]:
    """How long each socket lived until the server closed it (inf: still open)."""
    lived = [float("inf")] * len(socks)
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
    left = len(socks)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            i = key.data
            try:
                data = socks[i].recv(4096)
            except (ConnectionResetError, BlockingIOError) as exc:
                if isinstance(exc, BlockingIOError):
                    continue
                data = b""
            if not data:
                lived[i] = time.monotonic() - opened[i]
                sel.unregister(socks[i])
                left -= 1
    sel.close()
    return lived


def completed(d: Dispatcher, task_id: str) -> Any:
    task = procs.http("GET", f"{d.api}/api/v1/tasks/{task_id}")[1]
    return task if task["status"] in ("completed", "failed") else None


def test_ten_thousand_idle_connections(tmp_path: Path) -> None:
    timeout = 12.0
    with (
        fd_limit(IDLE + 2000),
        dispatcher(tmp_path, connection_timeout=timeout, nofile_soft=1024) as d,
    ):
        worker = start_worker(tmp_path, d)
        try:
            procs.wait_for(
                lambda: procs.http("GET", f"{d.api}/api/v1/workers")[1]["total"] == 1, what="worker"
            )
            before, fds_before = d.rss, stable_fds(d)
            with PeakRSS(d) as peak:
                started = time.monotonic()
                socks, opened = open_idle(d, IDLE)
                took = time.monotonic() - started
                try:
                    held = d.fds - fds_before
                    health = health_latencies(d)
                    status, task = procs.http(
                        "POST", f"{d.api}/api/v1/tasks", {"command": "echo ok"}
                    )
                    done = procs.wait_for(
                        lambda: completed(d, task["id"]), timeout=30, what="the task"
                    )
                    during = d.rss
                    elapsed = time.monotonic() - started
                    lived = wait_closed_by_server(socks, opened, time.monotonic() + timeout + 15)
                finally:
                    for sock in socks:
                        sock.close()
            time.sleep(1)
            after, fds_after = d.rss, stable_fds(d)
        finally:
            procs.stop(worker)
        closed = [s for s in lived if s != float("inf")]
        raised = "raised the open files limit from 1024" in d.log.read_text()
        print(
            f"\n{IDLE} idle connections opened in {took:.1f} s, held by the dispatcher {held} "
            f"(its fd limit raised from 1024 by itself: {raised}); with them open: /health p50 "
            f"{pct(health, 0.5) * 1000:.1f} ms p99 {pct(health, 0.99) * 1000:.1f} ms, a task "
            f"ran ({done['status']}, {done['stdout'].strip()}); RSS {before // MB} MB before, "
            f"{during // MB} during, peak {peak.peak // MB}, {after // MB} after "
            f"({(peak.peak - before) / IDLE / 1024:.1f} KiB a connection); closed by the "
            f"server {len(closed)}/{IDLE} after {min(closed, default=0):.1f}-"
            f"{max(closed, default=0):.1f} s (connection_timeout {timeout:g} s; test work took "
            f"{elapsed:.1f} s); fds after {fds_after} (before {fds_before})"
        )
        assert raised and held >= IDLE
        assert pct(health, 0.99) < HEALTH_P99
        assert status == 201 and done["stdout"] == "ok\n"
        assert len(closed) == IDLE and max(closed) < timeout + 10
        assert peak.peak - before < 500 * MB
        assert fds_after < fds_before + 100


# -- slowloris ------------------------------------------------------------------------------------

SLOW = 1000


def slowloris(
    d: Dispatcher,
    n: int,
    stop: threading.Event,
    lived: list[float],
    first: bytes = b"GET /health HTTP/1.1\r\nHost: x\r\n",
    trickle: str = "X-Slow: " + "a" * 100_000,
) -> None:
    """n connections, each sending `first`, then `trickle` one byte a second (by default
    a request's headers, never ended); `lived[i]` becomes how long connection i lasted
    until the server cut it."""
    socks, opened = [], []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", d.api_port), timeout=10)
        sock.sendall(first)
        sock.setblocking(False)
        socks.append(sock)
        opened.append(time.monotonic())
    header = trickle
    at = 0
    try:
        while not stop.wait(1.0) and any(x == float("inf") for x in lived):
            for i, sock in enumerate(socks):
                if lived[i] != float("inf"):
                    continue
                try:
                    if sock.recv(4096) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    lived[i] = time.monotonic() - opened[i]
                    continue
                try:
                    sock.send(header[at % len(header)].encode())
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN,):
                        lived[i] = time.monotonic() - opened[i]
            at += 1
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_is_cut_and_the_dispatcher_stays_responsive(tmp_path: Path) -> None:
    timeout = 6.0
    with fd_limit(SLOW + 2000), dispatcher(tmp_path, connection_timeout=timeout) as d:
        before = d.rss
        lived = [float("inf")] * SLOW
        stop = threading.Event()
        attacker = threading.Thread(target=slowloris, args=(d, SLOW, stop, lived), daemon=True)
        with PeakRSS(d) as peak:
            attacker.start()
            time.sleep(2)  # all connected, trickling
            health = health_latencies(d)
            attacker.join(timeout + 15)
            stop.set()
            attacker.join(5)
        after = d.rss
        cut = [x for x in lived if x != float("inf")]
        status, _ = procs.http("POST", f"{d.api}/api/v1/tasks", {"command": "true"})
        print(
            f"\nslowloris: {SLOW} connections, one header byte a second each; /health p50 "
            f"{pct(health, 0.5) * 1000:.1f} ms p99 {pct(health, 0.99) * 1000:.1f} ms during; "
            f"cut by the server {len(cut)}/{SLOW} after {min(cut, default=0):.1f}-"
            f"{max(cut, default=0):.1f} s (connection_timeout {timeout:g} s); RSS "
            f"{before // MB} MB before, peak {peak.peak // MB}, {after // MB} after; then a "
            f"submit {status}"
        )
        assert pct(health, 0.99) < HEALTH_P99
        assert len(cut) == SLOW and max(cut) < timeout + 4
        assert peak.peak - before < 200 * MB
        assert status == 201


def test_a_body_sent_one_byte_a_second_is_cut(tmp_path: Path) -> None:
    timeout, n = 4.0, 50
    with dispatcher(tmp_path, connection_timeout=timeout) as d:
        token = procs.TOKENS[d.api]
        first = (
            f"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        lived = [float("inf")] * n
        stop = threading.Event()
        args = (d, n, stop, lived, first, '{"command": "' + "b" * 99_000)
        attacker = threading.Thread(target=slowloris, args=args, daemon=True)
        attacker.start()
        attacker.join(timeout + 8)
        stop.set()
        attacker.join(5)
        cut = [x for x in lived if x != float("inf")]
        print(f"\nslow bodies: {n} connections, cut by the server {len(cut)}/{n}")
        assert len(cut) == n and max(cut) < timeout + 4
