"""Mutual proof of the cluster secret key in the P2P handshake (HMAC-SHA256).

Neither side ever sends the key: each proves it by a MAC over both sides' fresh nonces,
so a recorded handshake cannot be replayed. The secure-transport work adds encryption
around the whole stream; this module stays the admission check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_CONTEXT = b"octaskly/p2p-auth/v1"


def new_nonce() -> str:
    return secrets.token_hex(16)


def derive_auth_key(secret: bytes) -> bytes:
    """A key used only for P2P admission, separate from any other use of the secret."""
    return hmac.new(secret, _CONTEXT, hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    message = b"\x00".join(p.encode("utf-8") for p in parts)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def worker_proof(key: bytes, *, dispatcher_nonce: str, worker_nonce: str, name: str) -> str:
    return _mac(key, "worker", dispatcher_nonce, worker_nonce, name)


def dispatcher_proof(
    key: bytes, *, dispatcher_nonce: str, worker_nonce: str, worker_id: str
) -> str:
    return _mac(key, "dispatcher", dispatcher_nonce, worker_nonce, worker_id)


def verify(expected: str, given: str) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))
