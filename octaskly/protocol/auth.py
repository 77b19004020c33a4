"""Mutual proof of the cluster secret key in the P2P handshake, bound to the channel.

Keys: the secret is stretched once with scrypt (so a captured proof cannot be used to
guess a weak secret quickly), then HKDF-SHA256 derives one key per purpose; the secret
itself is never used directly and never sent.

Proofs: each side sends an HMAC-SHA256 over both sides' fresh nonces, its role, the
worker's name or id and the **channel binding**: the SHA-256 of the dispatcher's TLS
certificate as this side sees it (the idea of RFC 5929's tls-server-end-point). A
man-in-the-middle who terminates TLS shows the worker its own certificate, so the two
sides compute proofs over different bindings and both refuse; fresh nonces make a
recorded handshake useless for a replay. Everything after the handshake is protected by
TLS 1.3 (TCP) or QUIC's TLS 1.3 (UDP) record protection.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

_SALT = b"octaskly/cluster-secret/v2"
# scrypt cost: about 30 ms and 16 MiB once per process start; a guess costs the same.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def new_nonce() -> str:
    return secrets.token_hex(16)


@functools.lru_cache(maxsize=8)
def _stretched(secret: bytes) -> bytes:
    kdf = Scrypt(salt=_SALT, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return kdf.derive(secret)


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (e.g. "p2p-auth"), independent of every other."""
    info = f"octaskly/{purpose}/v2".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        _stretched(secret)
    )


def derive_auth_key(secret: bytes) -> bytes:
    """The key for P2P admission proofs."""
    return derive_key(secret, "p2p-auth")


def _mac(key: bytes, *parts: str | bytes) -> str:
    encoded = [p if isinstance(p, bytes) else p.encode("utf-8") for p in parts]
    # Length-prefixed: no two different part lists give the same message.
    message = b"".join(len(p).to_bytes(4, "big") + p for p in encoded)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def worker_proof(
    key: bytes, *, dispatcher_nonce: str, worker_nonce: str, name: str, binding: bytes
) -> str:
    return _mac(key, "worker", dispatcher_nonce, worker_nonce, name, binding)


def dispatcher_proof(
    key: bytes, *, dispatcher_nonce: str, worker_nonce: str, worker_id: str, binding: bytes
) -> str:
    return _mac(key, "dispatcher", dispatcher_nonce, worker_nonce, worker_id, binding)


def verify(expected: str, given: str) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))


def first_key(keys: list[bytes], expected: Callable[[bytes], str], proof: str) -> bytes | None:
    """The first of `keys` whose `expected(key)` proof matches `proof` (None: none does)."""
    for key in keys:
        if verify(expected(key), proof):
            return key
    return None
