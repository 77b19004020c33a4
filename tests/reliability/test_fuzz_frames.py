"""Hostile bytes on the P2P port: the frame parser and message validation, fuzzed.

- Hypothesis feeds arbitrary and half-structured byte streams (random bytes, frames with
  random bodies, JSON of every shape, mutated valid messages), cut at arbitrary places,
  into the decoder: only octaskly's ProtocolError may come out, and the decoder never
  holds more than one frame's worth of bytes.
- A length prefix claiming up to 4 GiB is refused from the 4 header bytes alone, before
  any body is read or allocated (measured with tracemalloc).
- Valid frames with hostile JSON — nesting 100,000 deep, numbers of 5,000 digits, 1e999,
  integers past SQLite's 64 bits, wrong types, unknown kinds, NUL bytes, invalid UTF-8,
  lone surrogate escapes — are refused with ProtocolError.
- atheris (libFuzzer, coverage-guided) runs frames_fuzz_target.py for a few seconds from
  a corpus of valid frames; any other exception is a crash and fails the test.
- Before their handshake peers may send one frame of at most 8 MiB and share 64 MiB
  (TCP and QUIC); a QUIC peer leaving gaps in its stream, or opening a second one, gets
  nothing buffered (real dispatcher process, RSS measured).
- End to end: a real dispatcher process; connections that send garbage over TLS (and
  plain-text garbage to its TLS port) are dropped, and afterwards a real worker process
  still joins and runs a task submitted through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from octaskly import errors
from octaskly.protocol import auth, framing, messages
from octaskly.transport import tls
from tests.e2e import procs

HEADER = framing.HEADER
MAX = framing.MAX_FRAME_BYTES
HERE = Path(__file__).parent


def frame(body: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(len(body) if length is None else length) + body


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at : at + sizes[i % len(sizes)]])
        at, i = at + sizes[i % len(sizes)], i + 1
    return pieces


def valid_hello() -> dict[str, Any]:
    return {
        "type": "hello",
        "protocol": messages.PROTOCOL_VERSION,
        "name": "w1",
        "instance": "a" * 32,
        "nonce": "b" * 32,
        "proof": "c" * 64,
        "version": "1",
        "max_jobs": 2,
        "sandbox_level": "basic",
        "resources": {"cpu_cores": 2, "memory_mb": 1024},
        "running": [{"task_id": "t1", "attempt": 1}],
    }


VALID = [
    valid_hello(),
    {"type": "heartbeat", "running": [{"task_id": "t1", "attempt": 2}]},
    {"type": "output", "task_id": "t1", "attempt": 1, "stream": "stdout", "data": "aGkK"},
    {
        "type": "result",
        "task_id": "t1",
        "attempt": 1,
        "status": "completed",
        "exit_code": 0,
        "duration_ms": 5,
        "stdout": "b2sK",
    },
    {"type": "drain"},
    {"type": "release", "runs": [{"task_id": "t1", "attempt": 1}]},
    {"type": "witness", "reachable": True, "silent_for": 0.5, "term": 2},
    {"type": "replica_ack", "lsn": 7},
]

# -- any bytes: only the protocol error, bounded buffering ------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(VALID).map(lambda m: json.dumps(m).encode()),
)
_frames = st.one_of(
    st.binary(max_size=64),  # no framing at all
    _bodies.map(frame),  # a frame around anything
    st.tuples(_bodies, st.integers(0, 2**32 - 1)).map(lambda b: frame(b[0], b[1])),  # wrong length
)


@hypothesis.given(
    st.lists(_frames, max_size=6), st.lists(st.integers(1, 97), min_size=1, max_size=6)
)
@hypothesis.settings(max_examples=1500, deadline=None)
def test_any_byte_stream_yields_messages_or_the_protocol_error(
    stream: list[bytes], sizes: list[int]
) -> None:
    decoder = framing.FrameDecoder()
    try:
        for piece in cut(b"".join(stream), sizes):
            for raw in decoder.feed(piece):
                assert isinstance(raw, dict) and isinstance(raw["type"], str)
                try:
                    messages.parse_worker_message(raw)
                except errors.ProtocolError:
                    pass
            assert decoder.buffered <= HEADER.size + MAX
    except errors.ProtocolError:
        pass


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    def mutate(message: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
        out = json.loads(json.dumps(message))
        for _ in range(data.draw(st.integers(1, 3))):
            how = data.draw(st.sampled_from(["replace", "delete", "add", "nest"]))
            if not out:
                break
            key = data.draw(st.sampled_from(sorted(out)))
            if how == "replace":
                out[key] = data.draw(_json)
            elif how == "delete":
                out.pop(key, None)
            elif how == "add":
                out[data.draw(st.text(max_size=8))] = data.draw(_json)
            elif isinstance(out.get(key), list) and out[key]:
                out[key][0] = data.draw(_json)
        return out

    return st.builds(mutate, st.sampled_from(VALID), st.data())


@hypothesis.given(_mutations())
@hypothesis.settings(max_examples=1500, deadline=None)
def test_mutated_messages_validate_or_raise_the_protocol_error(raw: dict[str, Any]) -> None:
    try:
        parsed = messages.parse_worker_message(framing.decode_body(json.dumps(raw).encode()))
    except errors.ProtocolError:
        return
    # what was accepted fits where it goes: 64-bit integers (SQLite), encodable again
    for value in parsed.model_dump().values():
        if isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63
    framing.encode(messages.to_wire(parsed))


# -- a huge length prefix ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [MAX + 1, 2**31, 2**32 - 1])
def test_a_length_over_the_limit_is_refused_from_the_header_alone(length: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(errors.ProtocolError, match="exceeds"):
            framing.FrameDecoder().feed(HEADER.pack(length))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    requested: list[int] = []
    served = [HEADER.pack(length), b"x" * 65536]

    async def read(n: int) -> bytes:
        requested.append(n)
        return served.pop(0) if served else b""

    with pytest.raises(errors.ProtocolError):
        coro = framing.FrameReader(read).next()
        try:
            coro.send(None)
        finally:
            coro.close()
    print(f"\nlength {length}: refused from the header; peak {peak} B, reads {len(requested)}")
    assert peak < 64 * 1024
    assert len(requested) == 1  # the body is never read


# -- hostile JSON in well-formed frames ----------------------------------------------------------


def _result(**fields: Any) -> bytes:
    base = {
        "type": "result",
        "task_id": "t1",
        "attempt": 1,
        "status": "completed",
        "duration_ms": 1,
    }
    return json.dumps({**base, **fields}).encode()


HOSTILE = {
    "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
    "nested object 10k deep": b'{"type":"heartbeat","running":'
    + b'{"a":' * 10_000
    + b"1"
    + b"}" * 10_001,
    "5000-digit number": b'{"type":"heartbeat","n":1' + b"0" * 5000 + b"}",
    "1e999 as a duration": _result(duration_ms=0).replace(
        b'"duration_ms": 0', b'"duration_ms": 1e999'
    ),
    "duration past 64 bits": _result(duration_ms=2**64),
    "exit code past 64 bits": _result(exit_code=-(2**70)),
    "attempt past 64 bits": _result(attempt=2**63),
    "lsn past 64 bits": b'{"type":"replica_ack","lsn":18446744073709551616}',
    "wrong type: attempt a word": _result(attempt="one"),
    "wrong type: attempt a fraction": _result(attempt=1.5),
    "wrong type: status a number": _result(status=3),
    "wrong type: top level array": b"[1,2,3]",
    "wrong type: type a number": b'{"type":7}',
    "unknown kind": b'{"type":"reboot"}',
    "dispatcher's kind from a worker": b'{"type":"assign","task":{}}',
    "NUL in the kind": b'{"type":"hello\\u0000"}',
    "NUL in a name": json.dumps({**valid_hello(), "name": "w1\u0000x"}).encode(),
    "invalid UTF-8": b'{"type":"heartbeat","x":"\xff\xfe"}',
    "UTF-16": '{"type":"heartbeat"}'.encode("utf-16"),
    "lone surrogate": b'{"type":"output","task_id":"t1","attempt":1,"stream":"stdout",'
    b'"data":"\\ud800"}',
    "empty body": b"",
    "not JSON": b"\x00\x01\x02 hello",
    "extra field": json.dumps({**valid_hello(), "admin": True}).encode(),
    "10001 running refs": json.dumps(
        {**valid_hello(), "running": [{"task_id": "t", "attempt": 1}] * 10_001}
    ).encode(),
}


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_json_in_a_valid_frame_is_the_protocol_error(body: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        for raw in framing.FrameDecoder().feed(frame(body)):
            messages.parse_worker_message(raw)


def test_encoding_refuses_what_is_not_unicode_with_the_protocol_error() -> None:
    with pytest.raises(errors.ProtocolError):
        framing.encode({"type": "output", "data": "\ud800"})


# -- atheris ---------------------------------------------------------------------------------------


def test_atheris_finds_no_crash_in_the_frame_parser(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, message in enumerate(VALID):
        (corpus / f"frame-{i}").write_bytes(b"\x07" + framing.encode(message))  # a stream
        (corpus / f"body-{i}").write_bytes(b"\x06" + json.dumps(message).encode())  # a body
    (corpus / "two").write_bytes(b"\x05" + framing.encode(VALID[1]) + framing.encode(VALID[3]))
    nested = b'{"type":"heartbeat","running":' + b"[" * 600 + b"]" * 600 + b"}"
    (corpus / "nested").write_bytes(b"\x02" + nested)
    (tmp_path / "json.dict").write_text(
        "".join(f"{t!r}\n".replace("'", '"') for t in ["[", "]", "{", "}", '":"', "\\ud800"])
    )
    seconds = 12
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "frames_fuzz_target.py"),
            str(corpus),
            f"-max_total_time={seconds}",
            "-rss_limit_mb=1024",
            "-timeout=10",
            "-max_len=8192",
            f"-dict={tmp_path / 'json.dict'}",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=tmp_path,
    )
    runs = re.findall(r"Done (\d+) runs in (\d+) second", done.stderr)
    cov = re.findall(r"cov: (\d+)", done.stderr)
    print(
        f"\natheris: {runs[-1][0] if runs else '?'} inputs in {runs[-1][1] if runs else '?'} s, "
        f"coverage {cov[-1] if cov else '?'} edges, corpus {len(list(corpus.iterdir()))} files, "
        f"exit {done.returncode}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert runs and int(runs[-1][0]) > 10_000


# -- end to end: a real dispatcher drops garbage and goes on ------------------------------------


async def _open_tls(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(), server_hostname=tls.SERVER_NAME
        ),
        10,
    )


async def _dropped_after(
    port: int, send: Callable[[asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]
) -> float:
    """Seconds from sending garbage until the dispatcher closed the connection."""
    reader, writer = await _open_tls(port)
    try:
        decoder = framing.FrameDecoder()
        challenge: list[dict[str, Any]] = []
        while not challenge:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed before the challenge"
            challenge = decoder.feed(data)
        started = time.monotonic()
        await send(writer, challenge[0])
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await asyncio.wait_for(reader.read(65536), 10):
                pass  # a reject, then the end
        return time.monotonic() - started
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await writer.wait_closed()


def _sender(data: bytes) -> Callable[[asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]:
    async def send(writer: asyncio.StreamWriter, challenge: dict[str, Any]) -> None:
        writer.write(data)
        await writer.drain()

    return send


async def _wrong_proof(writer: asyncio.StreamWriter, challenge: dict[str, Any]) -> None:
    key = auth.derive_auth_key(b"not the cluster's key at all")
    nonce = auth.new_nonce()
    hello = {
        **valid_hello(),
        "nonce": nonce,
        "running": [],
        "proof": auth.worker_proof(
            key,
            dispatcher_nonce=challenge["nonce"],
            worker_nonce=nonce,
            name="w1",
            binding=b"x" * 32,
        ),
    }
    writer.write(framing.encode(hello))
    await writer.drain()


HANDSHAKE_TIMEOUT = 3.0  # --connection-timeout: a peer has this long to say hello
GARBAGE: dict[str, Callable[[asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]] = {
    "random bytes": _sender(bytes(range(256)) * 4),
    "4 GiB length": _sender(HEADER.pack(2**32 - 1) + b"x" * 1000),
    "nested 100k deep": _sender(frame(HOSTILE["nested 100k deep"])),
    "not JSON": _sender(frame(b"\x00\x01 garbage")),
    "lone surrogate": _sender(frame(HOSTILE["lone surrogate"])),
    "result before hello": _sender(frame(_result())),
    "hello with integers past 64 bits": _sender(
        framing.encode({**valid_hello(), "running": [{"task_id": "t", "attempt": 2**64}]})
    ),
    "hello with the wrong key": _wrong_proof,
}


async def test_a_dispatcher_drops_garbage_connections_and_still_serves(tmp_path: Path) -> None:
    port, api_port = procs.free_port(), procs.free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    log = tmp_path / "dispatcher.log"
    base = ["--secret-key", procs.SECRET]
    with procs.processes() as ps:
        ps.append(
            procs.start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data), "--quic-enabled", "false",
                 "--connection-timeout", str(HANDSHAKE_TIMEOUT), *base],
                cwd=tmp_path,
                log=log,
            )
        )  # fmt: skip
        await asyncio.to_thread(procs.wait_healthy, api, ps[0], data_dir=data)
        dropped = {name: await _dropped_after(port, send) for name, send in GARBAGE.items()}
        # and one that is not even TLS
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
        await writer.drain()
        plain = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        print("\ndropped after (s): " + ", ".join(f"{k} {v:.3f}" for k, v in dropped.items()))
        # at once for what is malformed; an unfinished frame when the handshake times out
        assert all(seconds < HANDSHAKE_TIMEOUT + 2 for seconds in dropped.values())
        assert plain == b""  # closed (no TLS handshake, nothing served)

        ps.append(
            procs.start(
                ["worker", "--dispatcher-addr", f"127.0.0.1:{port}", "--name", "w-real",
                 "--transport", "tcp", *base],
                cwd=tmp_path,
            )
        )  # fmt: skip
        status, task = await asyncio.to_thread(
            procs.http, "POST", f"{api}/api/v1/tasks", {"command": "echo still-serving"}
        )
        assert status == 201

        def finished() -> Any:
            got = procs.http("GET", f"{api}/api/v1/tasks/{task['id']}")[1]
            return got if got["status"] in ("completed", "failed") else None

        done = await asyncio.to_thread(procs.wait_for, finished, timeout=60, what="the task")
        assert done["status"] == "completed" and done["stdout"] == "still-serving\n"
        assert (await asyncio.to_thread(procs.http, "GET", f"{api}/health"))[0] == 200
        assert ps[0].poll() is None
        output = log.read_text(errors="replace")
        print(
            f"garbage connections dropped {len(dropped) + 1}/{len(dropped) + 1}; then a real "
            f"worker ran a task ({done['duration_ms']} ms); tracebacks in the log "
            f"{output.count('Traceback')}"
        )
        assert "Traceback" not in output, output[-3000:]


async def _quic_peer(port: int) -> Any:
    """An unauthenticated QUIC peer: the TLS handshake done, its stream opened."""
    from octaskly.transport import quic

    return await quic.connect("127.0.0.1", port, timeout=10)


async def _hold_unfinished_hello(
    port: int, *, over_quic: bool, declared: int, send: int
) -> tuple[Any, Callable[[], bool]]:
    """Declare a hello of `declared` bytes, send `send` of them in 1 MiB pieces; return the
    open connection and a check of whether the dispatcher has dropped it (by now)."""
    piece = b"a" * (1 << 20)
    if over_quic:
        conn = await _quic_peer(port)
        assert (await asyncio.wait_for(conn.recv(), 10) or {}).get("type") == "challenge"
        conn._writer.write(HEADER.pack(declared))
        for _ in range(send // len(piece)):
            if conn._protocol._closed.is_set():
                break
            conn._writer.write(piece)
            await asyncio.sleep(0.05)  # (QUIC has no drain: let aioquic send)
        return conn, conn._protocol._closed.is_set
    reader, writer = await _open_tls(port)
    await asyncio.wait_for(reader.read(65536), 10)  # the challenge
    closed = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await reader.read(1)  # b"" (or an error): the dispatcher closed it
        if not closed.done():
            closed.set_result(None)

    try:
        writer.write(HEADER.pack(declared))
        for _ in range(send // len(piece)):
            writer.write(piece)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        closed.set_result(None)
    watcher = asyncio.ensure_future(watch())
    closed.add_done_callback(lambda _: watcher.cancel())
    return writer, closed.done


async def _until_dropped(held: list[tuple[Any, Callable[[], bool]]], at_least: int) -> int:
    """How many of `held` the dispatcher dropped, once at least `at_least` are (it reads
    and drops them as fast as a loaded machine lets it), or after 30 s."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        dropped = sum(1 for _, gone in held if gone())
        if dropped >= at_least or asyncio.get_running_loop().time() > deadline:
            return dropped
        await asyncio.sleep(0.05)


async def test_unauthenticated_peers_cannot_make_the_dispatcher_hold_much_memory(
    tmp_path: Path,
) -> None:
    """Before its handshake a peer may send a frame of at most 8 MiB (a hello), and all
    peers still in their handshake share 64 MiB, over TCP and QUIC alike; what a dropped
    peer held is given back (a legitimate 7 MB hello is welcomed afterwards)."""
    import psutil

    port, api_port = procs.free_port(), procs.free_port()
    api, data = f"http://127.0.0.1:{api_port}", tmp_path / "data"
    hello_max = framing.HANDSHAKE_MAX_FRAME_BYTES
    with procs.processes() as ps:
        ps.append(
            procs.start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data), "--secret-key", procs.SECRET],
                cwd=tmp_path,
            )
        )  # fmt: skip
        await asyncio.to_thread(procs.wait_healthy, api, ps[0], data_dir=data)
        dispatcher = psutil.Process(ps[0].pid)
        before = dispatcher.memory_info().rss

        # a frame longer than a hello may be: dropped from its 4 header bytes
        too_long = await _dropped_after(port, _sender(HEADER.pack(hello_max + 1)))
        quic_conn, quic_gone = await _hold_unfinished_hello(
            port, over_quic=True, declared=hello_max + 1, send=0
        )
        quic_dropped = await _until_dropped([(quic_conn, quic_gone)], 1)
        quic_conn.close()
        await quic_conn.wait_closed()
        assert too_long < 2 and quic_dropped == 1

        # 12 peers (4 over QUIC) each send 7 MiB of an 8 MiB hello and stop: 84 MiB wanted
        held = await asyncio.gather(
            *(
                _hold_unfinished_hello(
                    port, over_quic=i % 3 == 0, declared=hello_max - 10, send=7 << 20
                )
                for i in range(12)
            )
        )
        dropped = await _until_dropped(list(held), 3)
        grown = dispatcher.memory_info().rss - before
        for conn, _ in held:
            conn.close()
        for conn, _ in held:
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                await conn.wait_closed()
        print(
            f"\n12 unauthenticated peers x 7 MiB of an unfinished hello (4 over QUIC): "
            f"{dropped} dropped, {12 - dropped} held, dispatcher RSS +{grown >> 20} MB"
        )
        assert dropped >= 3  # at most 9 x 7 MiB fit in 64 MiB
        assert grown < 100 * 1024 * 1024

        # what they held was given back: a legitimate 7 MB hello (100,000 finished runs)
        worker = await _authentic_worker(port, finished=100_000)
        assert worker["type"] == "welcome", worker
        print("then a worker's 6.5 MB hello listing 100,000 finished runs was welcomed")
        assert ps[0].poll() is None


async def _authentic_worker(port: int, *, finished: int) -> dict[str, Any]:
    from octaskly.transport import tcp

    conn = await tcp.connect("127.0.0.1", port, timeout=10)
    try:
        challenge = await asyncio.wait_for(conn.recv(), 10)
        assert challenge is not None
        nonce = auth.new_nonce()
        hello = {
            **valid_hello(),
            "name": "w-big",
            "nonce": nonce,
            "running": [],
            "finished": [  # task ids as the dispatcher makes them (UUIDs)
                {"task_id": str(uuid.UUID(int=i)), "attempt": 10} for i in range(finished)
            ],
            "proof": auth.worker_proof(
                auth.derive_auth_key(procs.SECRET.encode()),
                dispatcher_nonce=challenge["nonce"],
                worker_nonce=nonce,
                name="w-big",
                binding=conn.binding,
            ),
        }
        wire = framing.encode(hello)
        assert 6 << 20 < len(wire) < framing.HANDSHAKE_MAX_FRAME_BYTES
        await conn.send(hello)
        answer = await asyncio.wait_for(conn.recv(), 60)
        assert answer is not None
        return answer
    finally:
        conn.close()
        await conn.wait_closed()


async def test_a_quic_peer_cannot_make_the_dispatcher_buffer_gaps_or_open_streams(
    tmp_path: Path,
) -> None:
    """aioquic grows a stream's flow-control window from the highest offset seen, data
    after a gap included, and buffers the gap: a peer sending only the last byte of each
    window made the dispatcher allocate 2.3 GB in 8 s before this was bounded. Also a
    second stream (the protocol uses one) ends the connection."""
    import psutil

    port, api_port = procs.free_port(), procs.free_port()
    api, data = f"http://127.0.0.1:{api_port}", tmp_path / "data"
    with procs.processes() as ps:
        ps.append(
            procs.start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data), "--secret-key", procs.SECRET],
                cwd=tmp_path,
            )
        )  # fmt: skip
        await asyncio.to_thread(procs.wait_healthy, api, ps[0], data_dir=data)
        dispatcher = psutil.Process(ps[0].pid)
        before = dispatcher.memory_info().rss

        conn = await _quic_peer(port)
        quic_state = conn._protocol._quic
        conn._writer.write(HEADER.pack(framing.HANDSHAKE_MAX_FRAME_BYTES - 10))
        start = len(b"octaskly-p2p\n") + HEADER.size
        sent_last_bytes, windows = 0, set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not conn._protocol._closed.is_set():
            stream = quic_state._streams[conn._stream_id]
            window, stop = stream.max_stream_data_remote, stream.sender._buffer_stop
            windows.add(window)
            if stop < window:  # write up to the window, but send only its last byte
                stream.sender.write(bytes(window - stop))
                stream.sender._pending.subtract(max(stop, start), window - 1)
                conn._protocol.transmit()
                sent_last_bytes += 1
            await asyncio.sleep(0.05)
        grown = dispatcher.memory_info().rss - before
        conn.close()
        await conn.wait_closed()
        print(
            f"\nQUIC peer leaving gaps for 6 s: windows granted {sorted(w >> 10 for w in windows)}"
            f" KiB, dispatcher RSS +{grown >> 20} MB"
        )
        assert max(windows) <= 4 * framing.HANDSHAKE_MAX_FRAME_BYTES // 8  # a few MiB at most
        assert grown < 50 * 1024 * 1024

        # a second stream: the connection ends
        conn = await _quic_peer(port)
        assert (await asyncio.wait_for(conn.recv(), 10) or {}).get("type") == "challenge"
        _, writer = await conn._protocol.create_stream()
        writer.write(b"x")
        conn._protocol.transmit()
        await asyncio.wait_for(conn._protocol._closed.wait(), 5)
        writer.close()
        conn.close()
        await conn.wait_closed()
        print("a second QUIC stream ended the connection")
        assert ps[0].poll() is None
        assert (await asyncio.to_thread(procs.http, "GET", f"{api}/health"))[0] == 200
