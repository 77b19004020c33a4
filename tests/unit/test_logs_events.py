"""The followed logs' JSON events: text decoded per stream across chunks, exact bytes."""

from __future__ import annotations

import base64
from typing import Any

from octaskly.api import logs


def _convert(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    text = logs.EventText()
    return [out for event in events for out in text.events(event)]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_character_split_between_chunks_is_decoded_whole() -> None:
    euro = "€".encode()
    out = _convert(
        [
            {"event": "attempt", "attempt": 1},
            {"stream": "stdout", "data": b"a" + euro[:1]},
            {"stream": "stderr", "data": b"e"},
            {"stream": "stdout", "data": euro[1:] + b"b"},
            {"event": "end", "status": "completed", "exit_code": 0, "error": None},
        ]
    )
    assert out == [
        {"event": "attempt", "attempt": 1},
        {"stream": "stdout", "data": "a", "data_base64": _b64(b"a" + euro[:1])},
        {"stream": "stderr", "data": "e", "data_base64": _b64(b"e")},
        {"stream": "stdout", "data": "€b", "data_base64": _b64(euro[1:] + b"b")},
        {"event": "end", "status": "completed", "exit_code": 0, "error": None},
    ]


def test_what_a_stream_left_undecoded_shows_once_before_the_next_event() -> None:
    out = _convert(
        [
            {"stream": "stdout", "data": b"x\xc3"},
            {"event": "end", "status": "failed", "exit_code": 1, "error": "exit status 1"},
        ]
    )
    assert [e.get("data") for e in out] == ["x", "\ufffd", None]
    assert out[1] == {"stream": "stdout", "data": "\ufffd", "data_base64": ""}
    assert out[2]["event"] == "end"


def test_after_a_gap_a_torn_character_is_left_out_of_the_text_only() -> None:
    euro = "€".encode()
    out = _convert(
        [
            {"stream": "stdout", "data": b"before"},
            {"event": "dropped"},
            {"stream": "stdout", "data": euro[1:] + b"after"},  # the gap cut the euro sign
            {"stream": "stdout", "data": b"\x80"},  # later: really invalid
        ]
    )
    assert [e.get("data") for e in out] == ["before", None, "after", "\ufffd"]
    assert out[2]["data_base64"] == _b64(euro[1:] + b"after")  # the bytes are all there


def test_invalid_bytes_are_replaced_in_the_text_and_kept_in_the_base64() -> None:
    every = bytes(range(256))
    out = _convert([{"stream": "stdout", "data": every}, {"event": "end"}])
    assert base64.b64decode(out[0]["data_base64"]) == every
    assert "".join(e.get("data", "") for e in out) == every.decode("utf-8", errors="replace")
