"""How the API shows a task's output: the exact bytes, and text for clients that want text.

In JSON, each stream is four fields: `stdout` (text: UTF-8 decoded, U+FFFD where the bytes
are not UTF-8, as before output was kept as bytes), `stdout_base64` (the exact bytes),
`stdout_encoding` ("utf-8": the text is exactly the bytes; "binary": it is not, read
`stdout_base64`) and `stdout_dropped_bytes` (bytes cut from the head of the stream before
`stdout_base64`; after such a cut, the rest of a torn character is left out of the text;
so is the start of a character a running task has not finished writing). `output_source`
says where the output shown comes from (see `live.OutputSource`).
`?format=raw&stream=stdout` answers the bytes themselves. Followed logs (NDJSON) carry
each chunk as `data` (text, decoded across chunk boundaries) and `data_base64`.
"""

from __future__ import annotations

import base64
import codecs
from collections.abc import Mapping
from typing import Any

from octaskly.domain import models, output
from octaskly.services import live

STREAMS = ("stdout", "stderr")
FORMATS = ("json", "raw")


def stream_fields(name: str, data: bytes, dropped: int, *, final: bool = True) -> dict[str, Any]:
    """The four JSON fields of one stream (`final`: the stream has ended)."""
    view = output.as_text(data, dropped=dropped, final=final)
    return {
        name: view.text,
        f"{name}_base64": base64.b64encode(data).decode("ascii"),
        f"{name}_encoding": view.encoding,
        f"{name}_dropped_bytes": dropped,
    }


def output_fields(task: models.Task, source: live.OutputSource) -> dict[str, Any]:
    """Both streams' fields and `output_source`."""
    final = source != "live"
    return {
        **stream_fields("stdout", task.stdout, task.stdout_dropped, final=final),
        **stream_fields("stderr", task.stderr, task.stderr_dropped, final=final),
        "output_source": source,
    }


def raw(task: models.Task, stream: str) -> tuple[bytes, int]:
    """One stream's bytes and how many were dropped before them."""
    if stream == "stdout":
        return task.stdout, task.stdout_dropped
    return task.stderr, task.stderr_dropped


class EventText:
    """Turns the dispatcher's follow events into JSON ones: a chunk gets `data` (text,
    decoded per stream across chunk boundaries, so that a character split between two
    chunks is not torn) and `data_base64` (its exact bytes). After a `dropped` event, the
    rest of a character torn by the gap is left out of the text, as in `output.as_text`."""

    def __init__(self) -> None:
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}
        self._cut: set[str] = set()

    def events(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The JSON events for one of the dispatcher's (usually one)."""
        if "stream" not in event:
            # a new attempt, a gap or the end: what a stream left undecoded shows as U+FFFD
            out = [
                {"stream": stream, "data": text, "data_base64": ""}
                for stream, decoder in self._decoders.items()
                if (text := decoder.decode(b"", final=True))
            ]
            self._decoders.clear()
            self._cut = set(STREAMS) if event.get("event") == "dropped" else set()
            return [*out, dict(event)]
        stream, data = event["stream"], event["data"]
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = data
        if stream in self._cut:
            self._cut.discard(stream)
            text = data[output.as_text(data[:3], dropped=1).torn :]
        return [
            {
                "stream": stream,
                "data": decoder.decode(text),
                "data_base64": base64.b64encode(data).decode("ascii"),
            }
        ]
