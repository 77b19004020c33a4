"""Rotating the cluster key with no task dropped: a key file lists the current key first
and keys still accepted after it; dispatcher and workers re-read it when it changes.
Real sockets and processes (tests/cluster.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from octaskly import errors, keyring
from octaskly.domain import models
from octaskly.services import tokens
from octaskly.services import worker as working
from tests.cluster import SECRET, running_cluster, until

K1 = SECRET
K2 = b"the-next-cluster-key-0123456789"


def _write(path: Path, *keys: bytes) -> None:
    path.write_bytes(b"\n".join(keys) + b"\n")
    # (a new mtime even within the same clock tick: the watcher compares inode/size/mtime)
    now = time.time_ns()
    os.utime(path, ns=(now, now))


async def _worker(
    tmp: Path, port: int, name: str, key_file: Path
) -> tuple[working.Worker, asyncio.Task[None]]:
    keys = keyring.Keyring(keyring.parse(key_file.read_bytes(), str(key_file)), key_file)
    w = working.Worker(
        options=working.Options(
            name=name,
            dispatcher_addrs=(("127.0.0.1", port),),
            secret_key=keys.current,
            keys=keys,
            resources=models.Resources(cpu_cores=2, memory_mb=1024),
            max_jobs=2,
            workdir_root=tmp,
            connect_timeout=3.0,
            reconnect_max_delay=0.3,
            transport="tcp",
        )
    )
    return w, asyncio.create_task(w.run(), name=f"worker-{name}")


async def test_a_rotation_accepts_both_keys_in_its_grace_then_only_the_new_one(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "cluster.key"
    _write(key_file, K1)
    keys = keyring.Keyring([K1], key_file)
    async with running_cluster(tmp_path, keys=keys) as cluster:
        d = cluster.dispatcher
        port = cluster.p2p.port
        old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
        _write(old_file, K1)
        _write(new_file, K2)
        veteran, veteran_job = await _worker(tmp_path, port, "veteran", old_file)
        jobs = [veteran_job]
        try:
            await until(lambda: "veteran" in d.peers.sessions, what="veteran joins")
            long = await cluster.submit(command="sleep 2; echo survived")
            await cluster.wait_status(long, "running")
            old_token, _ = tokens.sign(
                tokens.signing_key(K1), subject="a", role="admin", ttl=600, now=time.time()
            )
            # stage 1: K1 current, K2 accepted -> a worker with only K2 joins
            _write(key_file, K1, K2)
            assert keys.reload_if_changed()
            _newcomer, job = await _worker(tmp_path, port, "newcomer", new_file)
            jobs.append(job)
            await until(lambda: "newcomer" in d.peers.sessions, what="K2 worker joins")
            # stage 2: K2 current, K1 still accepted -> a K1-only worker joins and can
            # verify the dispatcher (which proves itself with the key the worker used)
            _write(key_file, K2, K1)
            assert keys.reload_if_changed()
            _late, job = await _worker(tmp_path, port, "late", old_file)
            jobs.append(job)
            await until(lambda: "late" in d.peers.sessions, what="K1 worker joins in grace")
            assert d.tokens.verify(old_token).sub == "a"  # old tokens still good
            issued, _ = await d.tokens.issue(subject="b", role="client", ttl=600)
            assert tokens.decode(tokens.signing_key(K2), issued, now=time.time()).sub == "b"
            # stage 3: K1 retired
            _write(key_file, K2)
            assert keys.reload_if_changed()
            _stale, job = await _worker(tmp_path, port, "stale", old_file)
            jobs.append(job)
            try:
                await asyncio.wait_for(job, 10)
                raise AssertionError("a K1-only worker was admitted after the grace")
            except working.FatalWorkerError as exc:
                assert "refused" in str(exc) and "authentication failed" in str(exc)
            # the worker connected before the rotation kept its task: nothing dropped
            record = await cluster.wait_status(long, "completed")
            assert record["stdout"] == "survived\n" and record["attempts"] == 1
            # a token signed with the retired key is refused now
            with pytest.raises(errors.AuthenticationError, match="signature"):
                d.tokens.verify(old_token)
            # a worker whose file got the new key uses it from its next handshake
            _write(old_file, K2)
            veteran.keys.reload_if_changed()
            assert veteran.keys.current == K2
        finally:
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)


def test_a_broken_key_file_keeps_the_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "k"
    _write(path, K1)
    keys = keyring.Keyring([K1], path)
    for bad in (b"", b"\n\n", b"short\n"):
        path.write_bytes(bad)
        assert not keys.reload_if_changed()
        assert keys.accepted == [K1]
