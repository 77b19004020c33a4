"""Task output is bytes, end to end: a real worker runs a real process that writes every
byte value; the dispatcher (SQLite here, PostgreSQL in the second pass of `make test`)
stores it and the API and the CLI (a real `octaskly` subprocess) give back exactly those
bytes. A running task shows its output so far. Hostile query values are 400s."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from octaskly.domain import models
from octaskly.store import base as store_base
from tests.cluster import Cluster, running_cluster, until
from tests.e2e import procs

EVERY_BYTE = bytes(range(256))
WRITE_EVERY_BYTE = (
    f"{sys.executable} -c 'import sys; sys.stdout.buffer.write(bytes(range(256))); "
    "sys.stderr.buffer.write(bytes(reversed(range(256))))'"
)


@pytest.fixture
async def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_cluster(tmp_path) as c:
        yield c


async def raw(cluster: Cluster, task_id: str, stream: str) -> tuple[int, bytes, Any]:
    url = f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?format=raw&stream={stream}"
    async with cluster.http.get(url) as resp:
        return resp.status, await resp.read(), resp.headers


async def octaskly(cluster: Cluster, *args: str) -> tuple[int, bytes, bytes]:
    """The CLI as a subprocess (not blocking the loop the dispatcher runs on)."""
    proc = await asyncio.create_subprocess_exec(
        *procs.OCTASKLY,
        *args,
        env=procs.clean_env(OCTASKLY_API_URL=cluster.base_url, HOME=str(cluster.tmp)),
        cwd=cluster.tmp,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_every_byte_value_comes_back_exactly(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command=WRITE_EVERY_BYTE)
    record = await cluster.wait_status(task_id, "completed")

    # the exact bytes: raw, and base64 in the record and in the JSON logs
    for stream, expected in (("stdout", EVERY_BYTE), ("stderr", EVERY_BYTE[::-1])):
        status, body, headers = await raw(cluster, task_id, stream)
        assert (status, body) == (200, expected)
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Octaskly-Dropped-Bytes"] == "0"
        assert headers["X-Octaskly-Task-Status"] == "completed"
        assert headers["X-Octaskly-Output-Source"] == "store"
        assert base64.b64decode(record[f"{stream}_base64"]) == expected
        assert record[f"{stream}_encoding"] == "binary"
        assert record[stream] == expected.decode("utf-8", errors="replace")  # as before
        assert record[f"{stream}_dropped_bytes"] == 0
    assert record["output_source"] == "store"
    status, logs = await cluster.api("GET", f"/api/v1/tasks/{task_id}/logs")
    assert status == 200 and logs["status"] == "completed"
    assert base64.b64decode(logs["stdout_base64"]) == EVERY_BYTE
    assert base64.b64decode(logs["stderr_base64"]) == EVERY_BYTE[::-1]

    # followed: the chunks' bytes add up to the output
    async with cluster.http.get(
        f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?follow=true"
    ) as resp:
        events = [json.loads(line) async for line in resp.content]
    followed = {
        s: b"".join(base64.b64decode(e["data_base64"]) for e in events if e.get("stream") == s)
        for s in ("stdout", "stderr")
    }
    assert followed == {"stdout": EVERY_BYTE, "stderr": EVERY_BYTE[::-1]}
    assert events[-1]["event"] == "end"

    # the CLI writes the bytes themselves
    code, out, err = await octaskly(cluster, "logs", task_id)
    assert (code, out, err) == (0, EVERY_BYTE, EVERY_BYTE[::-1])
    code, out, err = await octaskly(cluster, "logs", "--follow", task_id)
    assert (code, out, err) == (0, EVERY_BYTE, EVERY_BYTE[::-1])
    code, out, err = await octaskly(cluster, "submit", "--wait", "--", WRITE_EVERY_BYTE)
    assert code == 0 and out == EVERY_BYTE
    assert err.endswith(EVERY_BYTE[::-1]) and err.startswith(b"queued ")


async def test_text_stays_text_and_says_when_it_is_exact(cluster: Cluster) -> None:
    """A client that only reads `stdout` keeps working: UTF-8 output is that text."""
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command="printf 'h\\303\\251llo \\342\\202\\254\\n'")
    record = await cluster.wait_status(task_id, "completed")
    assert (record["stdout"], record["stdout_encoding"]) == ("héllo €\n", "utf-8")
    assert base64.b64decode(record["stdout_base64"]) == "héllo €\n".encode()
    assert (record["stderr"], record["stderr_base64"], record["stderr_encoding"]) == (
        "",
        "",
        "utf-8",
    )


async def test_a_character_split_between_chunks_is_whole_in_the_followed_text(
    cluster: Cluster,
) -> None:
    """The worker sends output in chunks as it comes; a character may straddle two. The
    followed text is decoded per stream, so it shows the character, not two U+FFFD."""
    await cluster.add_worker("w1")
    gate = cluster.tmp / "gate"
    task_id = await cluster.submit(
        command=f"printf 'a\\342\\202'; while [ ! -e {gate} ]; do sleep 0.02; done; "
        "printf '\\254b\\303'"
    )
    async with cluster.http.get(
        f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?follow=true"
    ) as resp:
        events = []
        async for line in resp.content:
            event = json.loads(line)
            events.append(event)
            if event.get("data_base64") and not gate.exists():
                gate.touch()  # the first chunk arrived: write the rest
    chunks = [e for e in events if e.get("stream") == "stdout"]
    assert len([c for c in chunks if c["data_base64"]]) >= 2
    assert b"".join(base64.b64decode(c["data_base64"]) for c in chunks) == b"a\xe2\x82\xacb\xc3"
    assert "".join(c["data"] for c in chunks) == "a€b\ufffd"  # the torn end shows, once


async def test_a_running_tasks_record_and_logs_show_the_output_so_far(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    gate = cluster.tmp / "gate"
    so_far, err_so_far = EVERY_BYTE + b"first\n", b"oops \xe2\x82"  # half a euro sign
    task_id = await cluster.submit(
        command=f"{WRITE_EVERY_BYTE} 2>/dev/null; echo first; printf 'oops \\342\\202' >&2; "
        f"while [ ! -e {gate} ]; do sleep 0.02; done; echo second; printf '\\254\\n' >&2"
    )

    async def shows_it() -> bool:
        record = await cluster.task(task_id)
        return base64.b64decode(record["stdout_base64"]) == so_far and base64.b64decode(
            record["stderr_base64"]
        ) == (err_so_far)

    await until(shows_it, timeout=30, what="the record to show the output so far")
    record = await cluster.task(task_id)
    assert record["status"] == "running" and record["output_source"] == "live"
    assert (record["stdout_dropped_bytes"], record["stdout_encoding"]) == (0, "binary")
    # the character it is still writing is left out of the text, not shown as U+FFFD
    assert (record["stderr"], record["stderr_encoding"]) == ("oops ", "utf-8")
    status, body, headers = await raw(cluster, task_id, "stdout")
    assert (status, body) == (200, so_far)
    assert (headers["X-Octaskly-Task-Status"], headers["X-Octaskly-Output-Source"]) == (
        "running",
        "live",
    )
    status, logs = await cluster.api("GET", f"/api/v1/tasks/{task_id}/logs")
    assert (logs["status"], logs["output_source"], logs["stderr"]) == ("running", "live", "oops ")
    code, out, err = await octaskly(cluster, "logs", task_id)
    assert (code, out, err) == (0, so_far, err_so_far)

    gate.touch()
    record = await cluster.wait_status(task_id, "completed")
    assert base64.b64decode(record["stdout_base64"]) == so_far + b"second\n"
    assert (record["stderr"], record["stderr_encoding"]) == ("oops €\n", "utf-8")
    assert record["output_source"] == "store"


async def test_a_running_task_whose_output_this_dispatcher_does_not_receive_says_so(
    cluster: Cluster,
) -> None:
    """Running by the database, but no run here (its worker has not reconnected, or
    another dispatcher of a federation holds it): what the store has, and `unavailable`."""
    task_id = await cluster.submit(command="true")  # no worker: it stays queued
    mark = {"status": models.TaskStatus.RUNNING, "attempts": 1, "stdout": b"attempt 0\xff"}
    assert await cluster.dispatcher.store.apply([store_base.TaskUpdate(task_id, mark)]) == [True]
    record = await cluster.task(task_id)
    assert (record["status"], record["output_source"]) == ("running", "unavailable")
    assert base64.b64decode(record["stdout_base64"]) == b"attempt 0\xff"
    code, out, err = await octaskly(cluster, "logs", task_id)
    assert (code, out) == (0, b"attempt 0\xff")
    assert b"this dispatcher does not receive its output" in err


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("format=xml", "format"),
        ("format=RAW&stream=stdout", "format"),
        ("format=", "format"),
        ("format=raw", "stream"),
        ("format=raw&stream=stdin", "stream"),
        ("format=raw&stream=", "stream"),
        ("format=raw&stream=stdout%00", "stream"),
        ("stream=stdout", "stream"),
        ("format=json&stream=stderr", "stream"),
        ("format=raw&stream=stdout&follow=true", "format"),
        ("format=raw&stream=stdout&follow=maybe", "follow"),
        ("encoding=base64", "encoding"),
    ],
)
async def test_bad_logs_parameters_are_400_naming_the_parameter(
    cluster: Cluster, query: str, field: str
) -> None:
    task_id = await cluster.submit(command="true")
    status, answer = await cluster.api("GET", f"/api/v1/tasks/{task_id}/logs?{query}")
    assert status == 400, answer
    assert answer["field"] == field and answer["status"] == 400
