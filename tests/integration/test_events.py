"""`GET /api/v1/events`: server-sent events a live view reads — changed tasks as they
change, stats once a second; a client sees only its own tasks; no token, no stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from octaskly.services import tokens
from tests.cluster import SECRET, running_cluster


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    name = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name is not None:
            yield name, json.loads(line[6:])
            name = None


def token(role: str, subject: str) -> str:
    signed, _ = tokens.sign(
        tokens.signing_key(SECRET), subject=subject, role=role, ttl=600, now=time.time()
    )
    return signed


async def test_a_task_is_seen_from_submit_to_completion_and_stats_flow(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        await cluster.add_worker("w1")
        async with cluster.http.get(cluster.base_url + "/api/v1/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            stream = read_events(resp)
            kind, first = await asyncio.wait_for(anext(stream), 5)
            assert kind == "stats" and first["workers"]["total"] == 1
            assert first["workers_list"][0]["id"] == "w1"
            task_id = await cluster.submit(command="sleep 0.3")
            seen: list[str] = []
            stats_seen = 1

            async def until_completed() -> None:
                nonlocal stats_seen
                async for kind, data in stream:
                    if kind == "stats":
                        stats_seen += 1
                    for task in data if kind == "tasks" else []:
                        if task["id"] == task_id:
                            seen.append(task["status"])
                            if task["status"] == "completed":
                                return

            await asyncio.wait_for(until_completed(), 10)
        print(f"statuses seen live: {seen}; stats events: {stats_seen}")
        assert seen[0] in ("queued", "running") and seen[-1] == "completed"


async def test_clients_see_only_their_own_tasks_and_no_cluster_stats(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, require_auth=True) as cluster:
        alice = {"Authorization": f"Bearer {token('client', 'alice')}"}
        bob = {"Authorization": f"Bearer {token('client', 'bob')}"}
        async with cluster.http.get(cluster.base_url + "/api/v1/events") as resp:
            assert resp.status == 401
        async with cluster.http.get(cluster.base_url + "/api/v1/events?x=1", headers=alice) as resp:
            assert resp.status == 400
        async with cluster.http.get(cluster.base_url + "/api/v1/events", headers=alice) as resp:
            stream = read_events(resp)
            kind, stats = await asyncio.wait_for(anext(stream), 5)
            assert kind == "stats" and set(stats) == {"time"}  # nothing of the cluster
            async with cluster.http.post(
                cluster.base_url + "/api/v1/tasks", json={"command": "true"}, headers=bob
            ) as r:
                bobs = (await r.json())["id"]
            async with cluster.http.post(
                cluster.base_url + "/api/v1/tasks", json={"command": "true"}, headers=alice
            ) as r:
                alices = (await r.json())["id"]

            async def first_task_event() -> list[str]:
                async for kind, data in stream:
                    if kind == "tasks":
                        return [t["id"] for t in data]
                return []

            ids = await asyncio.wait_for(first_task_event(), 5)
        assert alices in ids and bobs not in ids


async def test_shutdown_ends_open_event_and_log_streams_cleanly(tmp_path: Path) -> None:
    """A dispatcher stopping (SIGTERM) ends its endless responses itself instead of
    waiting out aiohttp's 60 s grace for readers that never leave: each reader sees a
    complete response end, not a cut connection, and goes to reconnect or fail over."""
    async with running_cluster(tmp_path) as cluster:
        task_id = await cluster.submit(command="true")  # no worker: it stays queued
        events = await cluster.http.get(f"{cluster.base_url}/api/v1/events")
        logs = await cluster.http.get(f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?follow=true")
        assert (events.status, logs.status) == (200, 200)
        assert (await events.content.readuntil(b"\n\n")).startswith(b"event: stats")
        stopping = asyncio.create_task(cluster.runner.cleanup())
        rest = await asyncio.gather(events.read(), logs.read())  # a cut stream raises here
        await stopping
        assert rest[1] == b""  # nothing was said about the queued task, and no error
        events.release()
        logs.release()
