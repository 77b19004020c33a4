"""Several dispatchers on one PostgreSQL database, all active.

Every dispatcher accepts submits, serves the API and schedules onto the workers connected
to it. The database arbitrates:

- A task is claimed with a compare-and-set update that skips rows another dispatcher is
  claiming at that moment (`FOR UPDATE SKIP LOCKED`); the winner owns the run
  (`tasks.dispatcher_id`) and only then tells its worker. A task runs on at most one
  worker at a time.
- Each dispatcher holds a lease (`dispatchers.lease_until`, the server's clock), renewed
  every lease/3. A dispatcher that dies stops renewing; once its lease has run out,
  another re-queues the runs it held (with a short grace, for their workers to come back
  and re-attach) and forgets it. Workers that reconnect to another dispatcher before then
  re-attach their runs at once (the run changes owner, it is not run again).
- Dispatchers wake each other with LISTEN/NOTIFY: every commit that changes tasks
  notifies the others (ids, new states, the lowest queue position that became queued),
  delivered only if it commits. A dispatcher that missed notifications (its listening
  connection dropped) re-reads its queue from the start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from octaskly import errors, files
from octaskly.domain import models
from octaskly.store import postgres

if TYPE_CHECKING:
    from octaskly.services.dispatcher import Dispatcher

log = logging.getLogger(__name__)

INSTANCE_FILE = "dispatcher.instance"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    lease: float = 15.0
    """Seconds a dispatcher's runs stay its own without a renewal."""
    data_dir: Path | None = None
    """Where the instance id is kept (one per data dir: a restart is the same dispatcher)."""
    p2p_address: str | None = None
    api_url: str | None = None


def instance_id(data_dir: Path | None) -> str:
    """This data dir's dispatcher instance: random, made once, kept 0600."""
    if data_dir is None:
        return secrets.token_hex(16)
    path = data_dir / INSTANCE_FILE
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    value = secrets.token_hex(16)
    files.write_private(path, (value + "\n").encode())
    return value


class Federation:
    def __init__(self, d: Dispatcher, options: Options) -> None:
        self.d = d
        self.options = options
        self.instance = ""
        self.taken_over = 0
        """Runs re-queued from dispatchers whose lease ran out (for stats and tests)."""
        self.lease_lost = False
        self._maintaining: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return isinstance(self.d.store, postgres.PostgresStore)

    @property
    def store(self) -> postgres.PostgresStore:
        store = self.d.store
        assert isinstance(store, postgres.PostgresStore)
        return store

    @property
    def name(self) -> str:
        return self.store.owner

    # -- lifecycle ---------------------------------------------------------------------
    async def register(self) -> None:
        """Take this dispatcher's place among those sharing the database."""
        if not self.enabled:
            return
        self.instance = instance_id(self.options.data_dir)
        await self.store.register(
            instance=self.instance,
            p2p_address=self.options.p2p_address,
            api_url=self.options.api_url,
            lease=self.options.lease,
        )
        log.info(
            "federated on %s as %r (lease %gs)",
            self.store.where,
            self.name,
            self.options.lease,
        )

    def start(self) -> None:
        """Listen to the other dispatchers and keep the lease (once serving)."""
        if not self.enabled:
            return
        self.store.listen(self.on_change, self.on_gap)
        self._maintaining = self.d.spawn(self._maintain_forever(), "federation-lease")

    async def stop(self) -> None:
        """Give the lease back: the others take over what is left at once."""
        for check in list(self._checks):
            check.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        if not self.enabled or not self.instance or self.lease_lost:
            return
        try:
            await self.store.release(instance=self.instance)
        except errors.StorageError as exc:
            log.warning("could not release the lease (the others wait for it to run out): %s", exc)

    # -- the shared view (API) ------------------------------------------------------------
    async def others(self) -> list[dict[str, Any]]:
        """The other live dispatchers, as they last published themselves (at most
        lease/3 old)."""
        if not self.enabled:
            return []
        return [d for d in await self.store.dispatchers() if d["id"] != self.name]

    async def worker_views(self) -> list[dict[str, Any]]:
        """Every worker of the federation, each with the dispatcher it is connected to."""
        if not self.enabled:
            return self.d.peers.views()
        views = [{**v, "dispatcher": self.name} for v in self.d.peers.views()]
        for other in await self.others():
            for view in (other["summary"] or {}).get("workers", []):
                if isinstance(view, dict):
                    views.append({**view, "dispatcher": other["id"]})
        return sorted(views, key=lambda v: (str(v.get("id")), str(v.get("dispatcher"))))

    async def summary(self) -> dict[str, Any]:
        """This dispatcher's place in the federation (stats)."""
        members = [
            {
                "id": self.name,
                "api_url": self.options.api_url,
                "p2p_address": self.options.p2p_address,
                "workers": len(self.d.peers.sessions),
                "running": len(self.d.runs),
                "renewed_seconds_ago": 0.0,
            }
        ]
        for other in await self.others():
            published = other["summary"] or {}
            members.append(
                {
                    "id": other["id"],
                    "api_url": other["api_url"],
                    "p2p_address": other["p2p_address"],
                    "workers": len(published.get("workers", [])),
                    "running": int(published.get("running", 0)),
                    "renewed_seconds_ago": other["renewed_seconds_ago"],
                }
            )
        return {
            "name": self.name,
            "lease_seconds": self.options.lease,
            "dispatchers": members,
            "taken_over": self.taken_over,
        }

    # -- the lease -------------------------------------------------------------------------
    async def _maintain_forever(self) -> None:
        interval = self.options.lease / 3
        while True:
            try:
                await self.maintain()
            except errors.StorageError as exc:
                log.error("cannot renew the lease on %s: %s", self.store.where, exc)
            if self.lease_lost:  # ends the dispatcher (a failed background task)
                raise errors.StorageError(f"dispatcher {self.name!r} lost its lease")
            await asyncio.sleep(interval)

    async def maintain(self) -> None:
        """Renew the lease, take over the runs of dispatchers whose lease ran out, and
        refresh the count of unfinished tasks (the queue-size limit is shared)."""
        summary = json.dumps(
            {"workers": self.d.peers.views(), "running": len(self.d.runs)},
            separators=(",", ":"),
        )
        if not await self.store.renew(
            instance=self.instance, lease=self.options.lease, summary=summary
        ):
            self._lost_lease()
            return
        grace = self.d.clock() + 2 * self.d.options.keepalive_interval
        taken = await self.store.take_over_expired(not_before=grace)
        for dead, ids in taken.items():
            self.taken_over += len(ids)
            if ids:
                log.warning(
                    "dispatcher %r left (its lease ended): re-queued the %d tasks it still "
                    "held (their workers have %gs to re-attach them)",
                    dead,
                    len(ids),
                    2 * self.d.options.keepalive_interval,
                )
            else:
                log.info("dispatcher %r left (its lease ended) holding no runs", dead)
            self.d.audit.record(
                "dispatcher_taken_over",
                action="take-over",
                severity="warning" if ids else "info",
                actor=self.name,
                details={"dispatcher": dead, "requeued": len(ids)},
            )
        # Read the queue from its start now and then (and after a take-over): whatever a
        # missed or mis-ordered notification hid is found within one lease/3.
        self.on_gap(notify=False)
        counts = await self.d.store.count_by_status()
        self.d.queued_count = counts[models.TaskStatus.QUEUED] + counts[models.TaskStatus.RUNNING]

    def _lost_lease(self) -> None:
        """Our lease ran out and another dispatcher took our runs: serving on would run
        tasks twice. Stop; the service manager starts us again, as a new member."""
        self.lease_lost = True
        log.error(
            "lost the lease on %s (not renewed in time; another dispatcher took over its "
            "runs): stopping",
            self.store.where,
        )

    # -- the others' changes -----------------------------------------------------------------
    def on_change(self, message: dict[str, Any]) -> None:
        d = self.d
        queued = message.get("q")
        if isinstance(queued, dict):
            for priority, seq in queued.items():
                try:
                    d.queue.rewind(models.Priority(int(priority)), int(seq) - 1)
                except (ValueError, TypeError):
                    continue
        changes = message.get("c")
        if isinstance(changes, list):
            for item in changes:
                if not (isinstance(item, list) and len(item) == 2):
                    continue
                task_id, code = item
                status = postgres.STATUS_OF_CODE.get(code)
                if not isinstance(task_id, str) or status is None:
                    continue
                self._changed(task_id, status)
        d.wake()

    def _changed(self, task_id: str, status: models.TaskStatus) -> None:
        d = self.d
        if status != models.TaskStatus.QUEUED:
            d.queue.remove(task_id)  # claimed or ended elsewhere: not ours to assign
        if status.is_terminal and task_id in d.runs:
            # ended by another dispatcher (cancelled through its API): stop our worker's run,
            # once the database confirms it (a notification is a hint, not the truth)
            check = asyncio.get_running_loop().create_task(self._stop_if_ended(task_id))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
        # (a run of ours that another dispatcher adopted: its worker left us, and our
        # "worker lost" update, which must own the run, changes nothing)
        d.watchers.notify(task_id)

    async def _stop_if_ended(self, task_id: str) -> None:
        d = self.d
        try:
            task = await d.store.get_task(task_id)
        except errors.StorageError as exc:
            log.warning("could not check task %s: %s", task_id, exc)
            return
        run = d.runs.get(task_id)
        if run is not None and (task is None or task.status.is_terminal):
            log.info("task %s was ended by another dispatcher: stopping its run", task_id)
            d.end_run(run)
            d.peers.send_cancel(run.worker_id, task_id, run.attempt)

    def on_gap(self, *, notify: bool = True) -> None:
        """Notifications may have been missed: read the queue again from its start (and
        wake every follower to look at its task again)."""
        for priority in models.Priority:
            self.d.queue.rewind(priority, 0)
        if notify:
            self.d.watchers.notify_all()
        self.d.wake()
