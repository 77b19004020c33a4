"""LAN discovery over real multicast: an advertiser and a browser in two network namespaces
joined by a veth pair, each a separate Python process (a namespace belongs to a process)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# -- network namespaces ---------------------------------------------------------------------


@dataclass(frozen=True)
class NetnsPair:
    """Namespace `d` (the dispatcher's, address `d_addr`) and `w` (the worker's, `w_addr`)."""

    d: str
    w: str
    d_addr: str
    w_addr: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _create_pair(pair: NetnsPair, tag: str) -> None:
    _ip("netns", "add", pair.d)
    _ip("netns", "add", pair.w)
    veth_d, veth_w = f"od{tag}", f"ow{tag}"
    _ip(
        "link",
        "add",
        veth_d,
        "netns",
        pair.d,
        "type",
        "veth",
        "peer",
        "name",
        veth_w,
        "netns",
        pair.w,
    )
    for ns, veth, addr in ((pair.d, veth_d, pair.d_addr), (pair.w, veth_w, pair.w_addr)):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
        _ip("-n", ns, "link", "set", veth, "up")


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by a veth pair on a random 10.77.x.0/24; always deleted."""
    tag = secrets.token_hex(3)
    subnet = f"10.77.{secrets.randbelow(256)}"
    pair = NetnsPair(f"oct-d-{tag}", f"oct-w-{tag}", f"{subnet}.1", f"{subnet}.2")
    try:
        _create_pair(pair, tag)
        yield pair
    finally:
        for ns in (pair.d, pair.w):  # also removes the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTASKLY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# -- child processes ------------------------------------------------------------------------
ADVERTISER = textwrap.dedent(
    """
    import asyncio, json, logging, sys
    from octaskly.transport.discovery import Advertiser

    async def main(args):
        adv = Advertiser()
        await adv.start(**args)
        print(json.dumps({"name": adv.name}), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)):
            if line.strip() == "close":
                await adv.close()
                await adv.close()
                print(json.dumps({"closed": True, "name": adv.name}), flush=True)
        await adv.close()

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
    """
)

DISCOVER = textwrap.dedent(
    """
    import asyncio, json, logging, sys, time
    from octaskly.transport.discovery import discover

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    started = time.monotonic()
    found = asyncio.run(discover(float(sys.argv[1])))
    print(json.dumps({"found": found, "elapsed": time.monotonic() - started}), flush=True)
    """
)

# Cancels discover() and a registering Advertiser midway, then reports what was left open.
CANCEL = textwrap.dedent(
    """
    import asyncio, gc, json, os, sys
    from octaskly.transport.discovery import Advertiser, discover

    def fds():
        return len(os.listdir("/proc/self/fd"))

    async def cancelled(coro, after):
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(after)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    async def main(bind):
        before = fds()
        browse_cancelled = await cancelled(discover(10.0), 0.5)
        adv = Advertiser()
        start = adv.start(port=1234, bind_address=bind, name="cancel-me", properties={})
        start_cancelled = await cancelled(start, 0.5)  # probing takes ~1.7 s
        await adv.close()
        await adv.close()
        await asyncio.sleep(0)
        gc.collect()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        print(json.dumps({"cancelled": [browse_cancelled, start_cancelled],
                          "tasks": [repr(t) for t in others], "fds": fds() - before}), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)

# A plain zeroconf browser that reports every add (resolved, with TXT) and every removal.
WATCHER = textwrap.dedent(
    """
    import asyncio, json, sys
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
    from octaskly.transport.discovery import SERVICE_TYPE

    async def report(zc, name, change):
        event = {"event": change.name, "name": name}
        if change is not ServiceStateChange.Removed:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            await info.async_request(zc, 3000)
            event.update(port=info.port, addresses=info.parsed_addresses(),
                         properties=info.decoded_properties)
        print(json.dumps(event), flush=True)

    async def main(addr):
        aiozc = AsyncZeroconf(interfaces=[addr])
        tasks = set()
        def on_change(zeroconf, service_type, name, state_change):
            tasks.add(asyncio.ensure_future(report(zeroconf, name, state_change)))
        browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        print(json.dumps({"event": "ready"}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await browser.async_cancel()
        await aiozc.async_close()

    asyncio.run(main(sys.argv[1]))
    """
)


class Child:
    """A child process whose stdout lines (JSON) a thread collects, so none is ever lost in
    a read buffer while the test waits for the next."""

    def __init__(self, proc: subprocess.Popen[str], children: Children) -> None:
        self.proc = proc
        self._children = children
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the child prints, within `timeout` seconds."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no output within {timeout:.1f}s (exit {self.proc.poll()})\n"
                f"{self._children.logs()}"
            ) from None
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._pump_thread.join(10)  # EOF once the child is gone
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Children:
    """Python processes started inside namespaces; all killed at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.kids: list[Child] = []

    def start(self, ns: str, code: str, *args: str) -> Child:
        with open(self.tmp_path / f"{ns}-{len(self.kids)}.log", "w") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.kids.append(Child(proc, self))
        return self.kids[-1]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp_path.glob("*.log"))
        )

    def kill_all(self) -> None:
        for kid in self.kids:
            kid.kill()


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as created:
        yield created


@pytest.fixture
def children(pair: NetnsPair, tmp_path: Path) -> Iterator[Children]:
    """Depends on `pair`, so the processes die before their namespaces are deleted."""
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.kill_all()


def advertise(
    children: Children,
    ns: str,
    *,
    bind: str,
    port: int,
    name: str = "test-host:5555",
    properties: dict[str, str] | None = None,
) -> tuple[Child, str | None]:
    """An advertiser process and its registered name, once `start()` returned."""
    args = {
        "port": port,
        "bind_address": bind,
        "name": name,
        "properties": properties if properties is not None else {"v": "test", "proto": "2"},
    }
    child = children.start(ns, ADVERTISER, json.dumps(args))
    return child, child.read_json(10)["name"]


def discover_in(children: Children, ns: str, timeout: float) -> Child:
    """Starts `discover(timeout)` in `ns`; `found()` collects the answer."""
    return children.start(ns, DISCOVER, str(timeout))


def found(child: Child, timeout: float) -> tuple[list[tuple[str, int]], float]:
    """(what discover() returned, how long it took inside the child)."""
    result = child.read_json(timeout + 10)
    return [(host, port) for host, port in result["found"]], result["elapsed"]


def watch_until(watcher: Child, event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = watcher.read_json(left)
        if message["event"] == event:
            return message
    raise AssertionError(f"no {event} event within {timeout}s")


def random_port() -> int:
    return 20000 + secrets.randbelow(40000)


# -- tests ----------------------------------------------------------------------------------
def test_worker_namespace_finds_the_advertised_dispatcher(
    pair: NetnsPair, children: Children
) -> None:
    port = random_port()
    _, name = advertise(children, pair.d, bind=pair.d_addr, port=port)
    assert name is not None and name.endswith("._octaskly._tcp.local.")
    from_w = discover_in(children, pair.w, 5.0)
    from_d = discover_in(children, pair.d, 5.0)  # same host: found through multicast loop
    addrs, elapsed = found(from_w, 5.0)
    assert addrs == [(pair.d_addr, port)], children.logs()
    assert elapsed < 3.0, "discover() should return soon after the first answer"
    assert found(from_d, 5.0)[0] == [(pair.d_addr, port)], children.logs()


def test_nothing_advertised_gives_empty_list_within_timeout(
    pair: NetnsPair, children: Children
) -> None:
    addrs, elapsed = found(discover_in(children, pair.w, 2.0), 2.0)
    assert addrs == []
    assert elapsed < 2.0 + 2.0


def test_loopback_bind_address_advertises_nothing(pair: NetnsPair, children: Children) -> None:
    _, name = advertise(children, pair.d, bind="127.0.0.1", port=random_port())
    assert name is None
    same_ns = discover_in(children, pair.d, 2.0)
    other_ns = discover_in(children, pair.w, 2.0)
    assert found(same_ns, 2.0)[0] == []
    assert found(other_ns, 2.0)[0] == []


def test_close_is_idempotent_and_withdraws_the_advertisement(
    pair: NetnsPair, children: Children
) -> None:
    port = random_port()
    watcher = children.start(pair.w, WATCHER, pair.w_addr)
    watch_until(watcher, "ready", 10)
    advertiser, name = advertise(children, pair.d, bind="0.0.0.0", port=port)
    added = watch_until(watcher, "Added", 5)
    assert (added["name"], added["port"], added["addresses"]) == (name, port, [pair.d_addr])
    advertiser.tell("close")  # the child calls close() twice
    assert advertiser.read_json(10) == {"closed": True, "name": None}
    removed = watch_until(watcher, "Removed", 3)  # goodbye packets, not the 75 s TTL
    assert removed["name"] == name
    assert advertiser.proc.poll() is None, "the advertiser process must survive close()"
    assert found(discover_in(children, pair.w, 1.5), 1.5)[0] == []


def test_cancelled_discover_and_start_leave_nothing_open(
    pair: NetnsPair, children: Children
) -> None:
    report = children.start(pair.d, CANCEL, pair.d_addr).read_json(15)
    assert report == {"cancelled": [True, True], "tasks": [], "fds": 0}, children.logs()


def test_hostile_name_and_properties_are_sanitised(pair: NetnsPair, children: Children) -> None:
    port = random_port()
    hostile = ("  weird.name\twith spaces/ünïcödé 🐙 a.b.c \x00\u200b" * 5)[:100]
    properties = {"v": "ü" * 200, "proto": "2", "note": "dots. spaces = 🐙" * 10, "a=b": "x"}
    watcher = children.start(pair.w, WATCHER, pair.w_addr)
    watch_until(watcher, "ready", 10)
    _, name = advertise(
        children, pair.d, bind=pair.d_addr, port=port, name=hostile, properties=properties
    )
    assert name is not None
    label = name.removesuffix("._octaskly._tcp.local.")
    assert "." not in label and "\x00" not in label and 0 < len(label.encode()) <= 63
    assert label.startswith("weird-name with spaces/ünïcödé 🐙")
    added = watch_until(watcher, "Added", 5)
    assert (added["name"], added["port"], added["addresses"]) == (name, port, [pair.d_addr])
    txt = added["properties"]
    assert set(txt) == {"v", "proto", "note"}  # "a=b" is not a valid TXT key
    assert txt["proto"] == "2" and len(("v=" + txt["v"]).encode()) <= 255
    assert txt["v"] == "ü" * len(txt["v"]) and txt["note"].startswith("dots. spaces = 🐙")
    assert found(discover_in(children, pair.w, 5.0), 5.0)[0] == [(pair.d_addr, port)]
