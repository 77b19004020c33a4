"""Frame codec and message validation, fed bytes directly (no sockets)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from octaskly import errors
from octaskly.protocol import auth, framing, messages


def test_roundtrip_across_arbitrary_chunking() -> None:
    msgs = [{"type": "heartbeat", "running": []}, {"type": "output", "data": "héllo\n" * 100}]
    wire = b"".join(framing.encode(m) for m in msgs)
    for size in (1, 2, 3, 7, 64, len(wire)):
        dec = framing.FrameDecoder()
        got = []
        for i in range(0, len(wire), size):
            got.extend(dec.feed(wire[i : i + size]))
        assert got == msgs
        assert dec.buffered == 0


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (struct.pack(">I", 3) + b"{x}", "not valid JSON"),
        (struct.pack(">I", 2) + b"[]", "string 'type'"),
        (struct.pack(">I", 11) + b'{"type": 1}', "string 'type'"),
        (struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc", "not valid JSON"),
        (struct.pack(">I", 0xFFFFFFFF), "exceeds"),
    ],
)
def test_garbage_is_rejected(wire: bytes, complaint: str) -> None:
    with pytest.raises(errors.ProtocolError, match=complaint):
        framing.FrameDecoder().feed(wire)


def test_partial_frame_waits_for_more() -> None:
    dec = framing.FrameDecoder()
    frame = framing.encode({"type": "heartbeat"})
    assert dec.feed(frame[:-1]) == []
    assert dec.buffered == len(frame) - 1
    assert dec.feed(frame[-1:]) == [{"type": "heartbeat"}]


def test_connections_in_their_handshake_share_one_byte_budget() -> None:
    budget = framing.ByteBudget(100)
    a = framing.FrameDecoder(max_frame=1000, budget=budget)
    b = framing.FrameDecoder(max_frame=1000, budget=budget)
    big = framing.encode({"type": "hello", "pad": "x" * 200})
    assert a.feed(big[:60]) == [] and budget.used == 60
    assert b.feed(big[:40]) == [] and budget.used == 100
    with pytest.raises(errors.ProtocolError, match="already hold 100 bytes"):
        b.feed(big[40:41])  # one byte too many: refused before it is buffered
    assert budget.used == 100 and b.buffered == 40
    b.release()  # its connection is dropped: what it held goes back
    assert budget.used == 60
    c = framing.FrameDecoder(max_frame=1000, budget=budget)
    small = framing.encode({"type": "hello"})
    assert c.feed(small) == [{"type": "hello"}]  # a whole frame gives its bytes back
    assert budget.used == 60


def test_trust_lifts_the_handshake_limits() -> None:
    with pytest.raises(errors.ProtocolError, match="frame length 21 exceeds 20"):
        framing.FrameDecoder(max_frame=20, budget=framing.ByteBudget(50)).feed(
            framing.HEADER.pack(21)
        )
    budget = framing.ByteBudget(50)
    dec = framing.FrameDecoder(max_frame=20, budget=budget)
    big = {"type": "output", "data": "x" * 500}
    wire = framing.encode(big)
    hello = framing.encode({"type": "hello"})
    assert dec.feed(hello + wire[:2]) == [{"type": "hello"}]
    assert budget.used == 2  # half of the next frame's header
    dec.trust()  # the hello's proof checked out
    assert budget.used == 0
    assert dec.feed(wire[2:]) == [big]  # over the 20-byte frame limit and the 50-byte budget
    assert budget.used == 0


def hello_frame(**overrides: object) -> dict[str, object]:
    """A valid worker hello as it arrives (a dict), with `overrides`."""
    base: dict[str, object] = {
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
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"type": "nonsense"}, "invalid"),
        (hello_frame(max_jobs=0), "max_jobs"),
        (hello_frame(name="../../etc"), "name"),
        (hello_frame(extra=1), "extra"),
        (hello_frame(resources={"cpu_cores": -1, "memory_mb": 1}), "cpu_cores"),
        (
            {
                "type": "result",
                "task_id": "x",
                "attempt": 0,
                "status": "completed",
                "duration_ms": 1,
            },
            "attempt",
        ),
        (
            {
                "type": "result",
                "task_id": "x",
                "attempt": 1,
                "status": "exploded",
                "duration_ms": 1,
            },
            "status",
        ),
        ({"type": "output", "task_id": "x", "attempt": 1, "stream": "stdin", "data": ""}, "stream"),
    ],
)
def test_invalid_worker_messages(raw: dict[str, object], complaint: str) -> None:
    with pytest.raises(errors.ProtocolError, match=complaint):
        messages.parse_worker_message(raw)


def test_worker_cannot_send_dispatcher_messages() -> None:
    with pytest.raises(errors.ProtocolError):
        messages.parse_worker_message({"type": "assign", "task": {}})


def test_valid_hello_parses() -> None:
    hello = messages.parse_worker_message(hello_frame())
    assert isinstance(hello, messages.Hello) and hello.name == "w1"


def test_proofs_bind_nonces_names_the_key_and_the_channel() -> None:
    key = auth.derive_auth_key(b"secret-one-secret-one")
    other = auth.derive_auth_key(b"secret-two-secret-two")
    chan, mitm = b"\x01" * 32, b"\x02" * 32

    def worker(
        k: bytes = key, d: str = "n1", w: str = "n2", name: str = "w", b: bytes = chan
    ) -> str:
        return auth.worker_proof(k, dispatcher_nonce=d, worker_nonce=w, name=name, binding=b)

    proof = worker()
    assert auth.verify(proof, worker())
    for changed in (
        worker(k=other),
        worker(d="n9"),
        worker(w="n9"),
        worker(name="x"),
        worker(b=mitm),  # the certificate a man-in-the-middle shows
        worker(d="n1n", w="2"),  # parts are length-prefixed: no shifting between them
        auth.dispatcher_proof(
            key, dispatcher_nonce="n1", worker_nonce="n2", worker_id="w", binding=chan
        ),
    ):
        assert not auth.verify(proof, changed)
    assert not auth.verify(proof, "ünicode")


def test_keys_come_from_a_kdf_and_differ_by_purpose() -> None:
    secret = b"a-cluster-secret-of-some-length"
    auth_key = auth.derive_auth_key(secret)
    assert len(auth_key) == 32 and auth_key == auth.derive_auth_key(secret)
    assert auth_key != auth.derive_key(secret, "api-jwt")
    assert secret not in auth_key and auth_key != hashlib.sha256(secret).digest()
