"""The one error hierarchy of octaskly.

Errors are translated only at the edges: to HTTP statuses in the API middleware, to exit
codes in the CLI. Temporary errors may succeed when retried; permanent ones will not.
"""

from __future__ import annotations


class OctasklyError(Exception):
    """Root of every error octaskly raises on purpose."""


class TemporaryError(OctasklyError):
    """A failure that may go away by itself (busy, full, unreachable)."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(OctasklyError):
    """A failure that retrying the same request cannot fix."""


class ConfigError(PermanentError):
    """A bad flag, variable or configuration file; the CLI exits 2 with this message."""


class ValidationError(PermanentError):
    """Input that breaks the contract; `field` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AuthenticationError(PermanentError):
    """No valid credentials: a missing, malformed, forged, expired or revoked token (401),
    or a peer that failed to prove knowledge of the cluster secret key."""


class PermissionDeniedError(PermanentError):
    """Valid credentials whose role may not do this (403)."""


class NotFoundError(PermanentError):
    """The named object does not exist (or is not visible to the caller)."""


class ConflictError(PermanentError):
    """The request contradicts the object's current state (e.g. cancelling a finished task)."""


class QueueFullError(TemporaryError):
    """The queue holds `task_queue_size` tasks; retry later."""


class StorageError(OctasklyError):
    """The database cannot be used (corrupt, read-only, missing)."""


class StorageFullError(StorageError, TemporaryError):
    """The disk holding the database is full."""


class ProtocolError(PermanentError):
    """A peer sent a frame that breaks the P2P protocol; the connection is dropped."""
