"""API tokens: JWT (HS256) signed with a key derived from the cluster secret.

Claims: `sub` (who), `role` (admin, dispatcher, worker, client), `iat`, `exp`, `jti`.
Anyone holding the cluster secret can sign tokens without a running dispatcher
(`octaskly token create`); the dispatcher records the tokens it issues itself and keeps
revocations durably in its database, so a revoked token stays refused across restarts
until it would have expired anyway.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt

from octaskly import errors, keyring
from octaskly.protocol import auth
from octaskly.store import base as store_base

ROLES = ("admin", "dispatcher", "worker", "client")
DEFAULT_TTL = 24 * 3600
MAX_TTL = 366 * 24 * 3600
_ALGORITHM = "HS256"
_LEEWAY = 5.0  # seconds of clock skew between the signer and the dispatcher


@dataclasses.dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    role: str
    iat: float
    exp: float
    jti: str


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "24h" or "7d"; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 24h or 7d")
    return float(int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]])


def signing_key(secret: bytes) -> bytes:
    return auth.derive_key(secret, "api-jwt")


def check_request(subject: str, role: str, ttl: float) -> None:
    """Validate what a token is asked for; ValidationError naming the field."""
    if role not in ROLES:
        raise errors.ValidationError(f"role: must be one of {', '.join(ROLES)}", field="role")
    if not 1 <= len(subject) <= 128 or not subject.isprintable():
        raise errors.ValidationError("subject: 1-128 printable characters", field="subject")
    if not 60 <= ttl <= MAX_TTL:
        raise errors.ValidationError(
            f"ttl: between 60 seconds and {MAX_TTL // 86400} days", field="ttl"
        )


def sign(key: bytes, *, subject: str, role: str, ttl: float, now: float) -> tuple[str, Claims]:
    """A new token (after check_request) and its claims."""
    check_request(subject, role, ttl)
    claims = Claims(sub=subject, role=role, iat=int(now), exp=int(now + ttl), jti=uuid.uuid4().hex)
    return jwt.encode(dataclasses.asdict(claims), key, algorithm=_ALGORITHM), claims


def decode(key: bytes, token: str, *, now: float) -> Claims:
    """The claims of a well-formed, correctly signed, unexpired token; else
    AuthenticationError saying why (never echoing the token)."""
    try:
        raw: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[_ALGORITHM],
            options={"require": ["sub", "role", "iat", "exp", "jti"], "verify_exp": False},
        )
    except jwt.InvalidSignatureError:
        raise errors.AuthenticationError("token signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise errors.AuthenticationError(f"token is malformed: {type(exc).__name__}") from None
    try:
        claims = Claims(
            sub=str(raw["sub"]),
            role=str(raw["role"]),
            iat=float(raw["iat"]),
            exp=float(raw["exp"]),
            jti=str(raw["jti"]),
        )
    except (TypeError, ValueError):
        raise errors.AuthenticationError("token claims have the wrong types") from None
    if claims.role not in ROLES:
        raise errors.AuthenticationError("token has an unknown role")
    if claims.exp + _LEEWAY < now:
        raise errors.AuthenticationError("token has expired")
    return claims


class Tokens:
    """The dispatcher's tokens: issue, verify (signature, expiry, revocation), revoke."""

    def __init__(
        self,
        secret: bytes | keyring.Keyring,
        store: store_base.Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = secret if isinstance(secret, keyring.Keyring) else keyring.Keyring([secret])
        self._store = store
        self._clock = clock
        self._revoked: set[str] = set()

    async def load(self) -> None:
        self._revoked = await self._store.revoked_tokens(self._clock())

    def use_store(self, store: store_base.Store) -> None:
        """Read and write tokens in `store` from now on (a standby installed a snapshot)."""
        self._store = store

    async def issue(
        self, *, subject: str, role: str, ttl: float, record: bool = True
    ) -> tuple[str, Claims]:
        """A new signed token; recorded in the database unless `record` is False (a standby,
        which must not write: the token is valid all the same, like one `token create`
        signs offline)."""
        key = self._keys.derived("api-jwt", signing_key)[0]
        token, claims = sign(key, subject=subject, role=role, ttl=ttl, now=self._clock())
        if not record:
            return token, claims
        await self._store.record_token(
            store_base.TokenRecord(
                jti=claims.jti,
                subject=claims.sub,
                role=claims.role,
                issued_at=claims.iat,
                expires_at=claims.exp,
            )
        )
        return token, claims

    def verify(self, token: str) -> Claims:
        """(during a key rotation, a token signed with any accepted key is good)"""
        keys = self._keys.derived("api-jwt", signing_key)
        for key in keys[:-1]:
            try:
                claims = decode(key, token, now=self._clock())
                break
            except errors.AuthenticationError as exc:
                if "signature" not in str(exc):
                    raise
        else:
            claims = decode(keys[-1], token, now=self._clock())
        if claims.jti in self._revoked:
            raise errors.AuthenticationError("token has been revoked")
        return claims

    async def revoke(self, jti: str) -> bool:
        """Revoke a token by id; False if it was revoked already."""
        if not 1 <= len(jti) <= 64 or not (jti.isascii() and jti.isalnum()):  # not "é" or "٣"
            raise errors.ValidationError("token id: 1-64 letters and digits", field="jti")
        now = self._clock()
        known = await self._store.get_token(jti)
        expires = known.expires_at if known is not None else now + MAX_TTL
        changed = await self._store.revoke_token(jti, revoked_at=now, expires_at=expires)
        self._revoked.add(jti)
        return changed
