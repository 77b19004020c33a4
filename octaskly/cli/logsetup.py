"""Process-wide logging: plain text on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _MalformedRequests(logging.Filter):
    """A request the HTTP layer cannot parse (garbage, a header line over 8 KiB) is the
    client's fault and already answered 400: one warning line, not an error with a
    traceback per request, which anyone reaching the port could use to flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp import http_exceptions  # (aiohttp is slow to import; only when used)

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            record.msg = f"{record.msg}: refused a malformed request ({type(exc).__name__})"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED = _MalformedRequests()


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log line per request is noise at info level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)
    if root.level > logging.DEBUG:
        # aioquic logs every connection's negotiation at INFO; its failures are WARNING+.
        logging.getLogger("quic").setLevel(logging.WARNING)
