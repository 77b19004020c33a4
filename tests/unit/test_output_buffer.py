"""The tail buffer that keeps the last bytes of a task's output stream, and the text view
of what it kept."""

from __future__ import annotations

import pytest

from octaskly.domain import output
from octaskly.executing import tails


@pytest.mark.parametrize(
    ("limit", "chunks", "kept", "dropped"),
    [
        (10, [], b"", 0),
        (10, [b""], b"", 0),
        (10, [b"0123456789"], b"0123456789", 0),  # exactly the limit
        (10, [b"0123456789A"], b"123456789A", 1),  # one over
        (10, [b"01234", b"56789"], b"0123456789", 0),
        (10, [b"01234", b"56789", b"A"], b"123456789A", 1),
        (10, [b"0123456789ABCDEF"], b"6789ABCDEF", 6),  # one chunk bigger than the limit
        (10, [b"xy", b"0123456789ABC"], b"3456789ABC", 5),  # ... on top of kept bytes
        (10, [b"xy", b"0123456789"], b"0123456789", 2),  # ... exactly the limit
        (10, [b"0123456789", b"", b"A"], b"123456789A", 1),
        (3, [b"a", b"b", b"c", b"d", b"e", b"f", b"g"], b"efg", 4),
        (0, [b"abc", b"de"], b"", 5),  # keep nothing, count everything
        (1, [b"abc", b"d"], b"d", 3),
    ],
)
def test_keeps_the_last_limit_bytes_and_counts_the_rest(
    limit: int, chunks: list[bytes], kept: bytes, dropped: int
) -> None:
    buffer = tails.TailBuffer(limit)
    for chunk in chunks:
        buffer.feed(chunk)
    assert buffer.getvalue() == kept
    assert buffer.dropped == dropped


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 999, 1000, 1001, 5000])
def test_result_does_not_depend_on_how_the_stream_was_chunked(chunk_size: int) -> None:
    data = bytes(range(256)) * 12
    buffer = tails.TailBuffer(1000)
    for start in range(0, len(data), chunk_size):
        buffer.feed(data[start : start + chunk_size])
    assert buffer.getvalue() == data[-1000:]
    assert buffer.dropped == len(data) - 1000


@pytest.mark.parametrize(
    ("limit", "data", "text", "dropped"),
    [
        # nothing cut: plain decoding
        (10, "aé", "aé", 0),
        # cut inside a 2-byte character: its continuation byte goes too
        (1, "aé", "", 3),
        (2, "aé", "é", 1),
        # cut inside a 3-byte character (€ = e2 82 ac)
        (2, "x€", "", 4),
        (3, "x€", "€", 1),
        (4, "x€y", "€y", 1),
        (3, "x€y", "y", 4),
        # cut inside a 4-byte character (😀 = f0 9f 98 80)
        (4, "ab😀", "😀", 2),
        (3, "ab😀", "", 6),
        (4, "😀z", "z", 4),
        (5, "ab😀", "b😀", 1),
    ],
)
def test_text_never_starts_with_a_torn_character(
    limit: int, data: str, text: str, dropped: int
) -> None:
    buffer = tails.TailBuffer(limit)
    buffer.feed(data.encode())
    view = output.as_text(buffer.getvalue(), dropped=buffer.dropped)
    assert (view.text, buffer.dropped + view.torn) == (text, dropped)
    assert view.encoding == output.UTF8  # a torn head is not invalid UTF-8
    assert buffer.getvalue() == data.encode()[-limit:]  # the bytes keep the torn head


@pytest.mark.parametrize(
    ("limit", "data", "text", "dropped"),
    [
        (10, b"\x80abc", "\ufffdabc", 0),  # not cut by us: an invalid byte stays visible
        (10, b"a\xffb", "a\ufffdb", 0),
        (10, b"a\xc3", "a\ufffd", 0),  # the task died mid-character
        (10, b"\xff\xfe\x00\x01", "\ufffd\ufffd\x00\x01", 0),
        # after a cut, at most 3 continuation bytes can belong to a torn character
        (5, b"x" + b"\x80" * 5, "\ufffd\ufffd", 4),
    ],
)
def test_invalid_utf8_becomes_replacement_characters(
    limit: int, data: bytes, text: str, dropped: int
) -> None:
    buffer = tails.TailBuffer(limit)
    buffer.feed(data)
    view = output.as_text(buffer.getvalue(), dropped=buffer.dropped)
    assert (view.text, buffer.dropped + view.torn) == (text, dropped)
    assert view.encoding == output.BINARY


@pytest.mark.parametrize(
    ("data", "dropped", "encoding"),
    [
        (b"", 0, output.UTF8),
        (b"plain\n", 0, output.UTF8),
        ("héllo €😀".encode(), 0, output.UTF8),
        (b"\x00\x01\x7f", 0, output.UTF8),  # control characters are valid UTF-8
        (b"\x80", 0, output.BINARY),  # a continuation byte not cut by us
        (b"\x80", 1, output.UTF8),  # ... cut by us
        (bytes(range(256)), 0, output.BINARY),
        ("é".encode() + b"\xc3", 0, output.BINARY),  # ends inside a character
    ],
)
def test_the_text_says_whether_it_is_exact(data: bytes, dropped: int, encoding: str) -> None:
    view = output.as_text(data, dropped=dropped)
    assert view.encoding == encoding
    if encoding == output.UTF8:
        assert view.text.encode() == data[view.torn :]


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        tails.TailBuffer(-1)


@pytest.mark.parametrize(
    ("data", "text", "unfinished", "encoding"),
    [
        (b"ab", "ab", 0, output.UTF8),
        ("a€".encode()[:-1], "a", 2, output.UTF8),  # half a euro sign: still being written
        ("a€".encode()[:-2], "a", 1, output.UTF8),
        ("a😀".encode()[:-1], "a", 3, output.UTF8),
        ("€".encode(), "€", 0, output.UTF8),
        (b"\xff\xe2\x82", "\ufffd", 2, output.BINARY),  # invalid before, unfinished after
        (b"a\x80", "a\ufffd", 0, output.BINARY),  # a lone continuation byte finishes nothing
    ],
)
def test_the_output_so_far_leaves_out_a_character_not_finished_yet(
    data: bytes, text: str, unfinished: int, encoding: str
) -> None:
    view = output.as_text(data, final=False)
    assert (view.text, view.unfinished, view.encoding) == (text, unfinished, encoding)
    ended = output.as_text(data)  # once the stream ended, the same bytes are invalid
    assert ended.unfinished == 0
    assert ended.encoding == (output.BINARY if unfinished else encoding)
