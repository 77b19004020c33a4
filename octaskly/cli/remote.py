"""Client commands: submit, status, list, cancel, logs, workers, stats."""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shlex
import sys
import time
import uuid
from typing import Any, TextIO

from octaskly import errors
from octaskly.cli import progress
from octaskly.cli.client import APIError, Client


def _write_bytes(stream: str, data: bytes) -> None:
    """Write task output to our stdout or stderr exactly as the task wrote it."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.flush()  # what was printed as text before goes first
    out.buffer.write(data)
    out.buffer.flush()


def _output(body: dict[str, Any], field: str) -> bytes:
    """The exact bytes of an output field (`stdout`, `stderr`, `data`) of an API answer:
    its `*_base64` twin; the text, from a dispatcher that predates it."""
    encoded = body.get(f"{field}_base64")
    if isinstance(encoded, str):
        return base64.b64decode(encoded)
    return str(body.get(field, "")).encode()


def _print_json(data: Any, out: TextIO = sys.stdout) -> None:
    json.dump(data, out, indent=2)
    out.write("\n")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _short(text: str | None, width: int = 40) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _command(words: list[str]) -> str:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise errors.ConfigError("no command given: octaskly submit -- COMMAND [ARG...]")
    return words[0] if len(words) == 1 else shlex.join(words)


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise errors.ConfigError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


BATCH = 1000


def submit(client: Client, args: argparse.Namespace) -> int:
    if args.from_file:
        return _submit_file(client, args)
    spec = _spec(args, _command(args.command))
    # Always a key: a submit retried after a failover (or a lost reply) is then the same task.
    headers = {"Idempotency-Key": args.idempotency_key or f"cli-{uuid.uuid4().hex}"}
    task = client.call("POST", "/api/v1/tasks", spec, headers)
    if not (args.wait or args.follow):
        print(task["id"])
        return 0
    print(f"queued {task['id']}", file=sys.stderr)
    if args.wait and not args.follow and progress.is_terminal():
        from rich.console import Console

        with Console(file=sys.stderr).status(f"waiting for task {task['id']}"):
            end = _wait_end(client, task["id"])
        return _finish(client, task["id"], end, live=False)
    return _await_task(client, task["id"], live=args.follow)


def _submit_file(client: Client, args: argparse.Namespace) -> int:
    """One task per non-empty line (a shell command), submitted in batches."""
    if args.command and args.command != ["--"]:
        raise errors.ConfigError("--from-file and a command on the command line exclude each other")
    if args.follow:
        raise errors.ConfigError("--follow follows one task; use --wait with --from-file")
    source = sys.stdin if args.from_file == "-" else None
    try:
        text = source.read() if source is not None else open(args.from_file).read()
    except OSError as exc:
        raise errors.ConfigError(f"--from-file {args.from_file}: {exc.strerror or exc}") from None
    commands = [line.strip() for line in text.splitlines() if line.strip()]
    if not commands:
        raise errors.ConfigError(f"--from-file {args.from_file}: no commands in it")
    key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
    ids: list[str] = []
    for start in range(0, len(commands), BATCH):
        chunk = [_spec(args, c) for c in commands[start : start + BATCH]]
        body = client.call(
            "POST", "/api/v1/tasks/batch", {"tasks": chunk}, {"Idempotency-Key": f"{key}-{start}"}
        )
        ids.extend(body["ids"])
    for task_id in ids:
        print(task_id)
    sys.stdout.flush()
    if not args.wait:
        return 0
    done = progress.wait_all(lambda i: client.call("GET", f"/api/v1/tasks/{i}"), ids)
    bad = {i: s for i, s in done.items() if s != "completed"}
    for task_id, status in bad.items():
        print(f"task {task_id} {status}", file=sys.stderr)
    return 1 if bad else 0


def _spec(args: argparse.Namespace, command: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"command": command}
    for name in (
        "timeout",
        "priority",
        "memory_limit_mb",
        "cpu_seconds",
        "disk_limit_mb",
        "open_files_limit",
        "process_limit",
        "limits_preset",
        "sandbox_level",
    ):
        if getattr(args, name, None) is not None:
            spec[name] = getattr(args, name)
    if args.retries is not None:
        spec["retry_count"] = args.retries
    if args.env:
        spec["env"] = _key_values(args.env, "--env")
    requirements: dict[str, Any] = {}
    if args.cpu_cores is not None:
        requirements["cpu_cores"] = args.cpu_cores
    if args.memory_mb is not None:
        requirements["memory_mb"] = args.memory_mb
    if args.gpu:
        requirements["gpu"] = True
    if args.require_label:
        requirements["labels"] = _key_values(args.require_label, "--require-label")
    if requirements:
        spec["requirements"] = requirements
    return spec


def _wait_end(client: Client, task_id: str) -> dict[str, Any]:
    end: dict[str, Any] = {}
    while not end:
        try:
            for event in client.stream(f"/api/v1/tasks/{task_id}/logs?follow=true"):
                if event.get("event") == "end":
                    end = event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if len(client.urls) == 1:
                raise errors.TemporaryError(f"lost the dispatcher API: {exc}") from None
            time.sleep(0.5)
    return end


def _await_task(client: Client, task_id: str, *, live: bool) -> int:
    end: dict[str, Any] = {}
    while not end:
        try:
            for event in client.stream(f"/api/v1/tasks/{task_id}/logs?follow=true"):
                if "stream" in event and live:
                    _write_bytes(event["stream"], _output(event, "data"))
                elif event.get("event") == "end":
                    end = event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if len(client.urls) == 1:
                raise errors.TemporaryError(f"lost the dispatcher API: {exc}") from None
            # the dispatcher went away mid-stream (a failover?): find the primary again
            print(f"lost the dispatcher API ({exc}); looking for the primary", file=sys.stderr)
            time.sleep(0.5)
    return _finish(client, task_id, end, live=live)


def _finish(client: Client, task_id: str, end: dict[str, Any], *, live: bool) -> int:
    """Print the output (unless it was streamed) and say how the task ended."""
    if not live:
        task = client.call("GET", f"/api/v1/tasks/{task_id}")
        _write_bytes("stdout", _output(task, "stdout"))
        _write_bytes("stderr", _output(task, "stderr"))
    status = end.get("status", "unknown")
    if status == "completed":
        return 0
    detail = end.get("error") or f"exit code {end.get('exit_code')}"
    print(f"task {task_id} {status}: {detail}", file=sys.stderr)
    return 1


def status(client: Client, args: argparse.Namespace) -> int:
    task = client.call("GET", f"/api/v1/tasks/{args.task_id}")
    if args.json:
        _print_json(task)
        return 0
    fields = [
        "id",
        "status",
        "priority",
        "command",
        "worker_id",
        "attempts",
        "exit_code",
        "duration_ms",
        "created_at",
        "started_at",
        "completed_at",
        "error",
        "waiting_reason",
        "retry_at",
    ]
    for name in fields:
        if task.get(name) is not None:
            print(f"{name + ':':<15} {task[name]}")
    return 0


def list_tasks(client: Client, args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}&offset={args.offset}"
    if args.status:
        query += f"&status={args.status}"
    page = client.call("GET", f"/api/v1/tasks{query}")
    if args.json:
        _print_json(page)
        return 0
    rows = [
        [
            t["id"],
            t["status"],
            t["priority"],
            t["worker_id"] or "-",
            str(t["exit_code"]) if t["exit_code"] is not None else "-",
            _short(t["command"]),
        ]
        for t in page["tasks"]
    ]
    print(_table(rows, ["ID", "STATUS", "PRIORITY", "WORKER", "EXIT", "COMMAND"]))
    print(f"({page['returned']} of {page['total']})", file=sys.stderr)
    return 0


def cancel(client: Client, args: argparse.Namespace) -> int:
    result = client.call("DELETE", f"/api/v1/tasks/{args.task_id}")
    print(f"{result['id']} {result['status']}: {result['message']}")
    return 0


def logs(client: Client, args: argparse.Namespace) -> int:
    """A task's output as it wrote it: so far while it runs, all of it with --follow."""
    if args.follow:
        for event in client.stream(f"/api/v1/tasks/{args.task_id}/logs?follow=true"):
            if "stream" in event:
                _write_bytes(event["stream"], _output(event, "data"))
        return 0
    data = client.call("GET", f"/api/v1/tasks/{args.task_id}/logs")
    _write_bytes("stdout", _output(data, "stdout"))
    _write_bytes("stderr", _output(data, "stderr"))
    for stream in ("stdout", "stderr"):
        if data[f"{stream}_dropped_bytes"]:
            print(
                f"[{data[f'{stream}_dropped_bytes']} earlier bytes of {stream} were dropped]",
                file=sys.stderr,
            )
    if data.get("output_source") == "unavailable":
        print(
            f"[task {args.task_id} is running, but this dispatcher does not receive its "
            "output (another one does, or its worker has not reconnected yet): not shown]",
            file=sys.stderr,
        )
    return 0


def workers(client: Client, args: argparse.Namespace) -> int:
    data = client.call("GET", "/api/v1/workers")
    if args.json:
        _print_json(data)
        return 0
    rows = [
        [
            w["id"],
            w["state"],
            f"{w['current_jobs']}/{w['max_jobs']}",
            f"{w['resources']['cpu_cores']:g}",
            str(w["resources"]["memory_mb"]),
            # the levels a run there can get (a federation member of an older version
            # publishes only the worker's own)
            ",".join(w.get("sandbox_levels", [w["sandbox_level"]])) or "-",
            w["address"],
            w["last_heartbeat"],
        ]
        for w in data["workers"]
    ]
    header = ["NAME", "STATE", "JOBS", "CPUS", "MEMORY_MB", "SANDBOX", "ADDRESS", "LAST_HEARTBEAT"]
    print(_table(rows, header))
    return 0


def stats(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.call("GET", "/api/v1/stats"))
    return 0


def ha_status(client: Client, args: argparse.Namespace) -> int:
    """Every node's view: role, term, replication state and lag, failover state."""
    views = client.call_each("GET", "/api/v1/ha/status")
    if args.json:
        _print_json(
            [
                {"api": url, **(body if isinstance(body, dict) else {"error": str(body)})}
                for url, body in views
            ]
        )
        return 0 if any(isinstance(b, dict) for _, b in views) else 1
    rows = []
    for url, body in views:
        if not isinstance(body, dict):
            rows.append([url, "-", "-", "-", "-", "-", "-", _short(str(body), 50)])
            continue
        rep = body.get("replication") or {}
        sync = rep.get("mode", "-")
        if rep:
            sync += " (in sync)" if rep.get("synced") else " (NOT in sync)"
        note = body.get("degraded") or (body.get("failover") or {}).get("blocked") or ""
        rows.append(
            [
                url,
                body["role"],
                str(body["term"]),
                str(body.get("lsn", "-")),
                sync,
                str(rep.get("lag_records", 0)),
                f"{rep.get('lag_seconds', 0.0):.3f}",
                _short(note, 60),
            ]
        )
    headers = ["API", "ROLE", "TERM", "LSN", "REPLICATION", "LAG_RECORDS", "LAG_SECONDS", "NOTE"]
    print(_table(rows, headers))
    return 0 if any(isinstance(b, dict) for _, b in views) else 1


def ha_switchover(client: Client, args: argparse.Namespace) -> int:
    body = {"timeout": args.timeout}
    result = client.call("POST", "/api/v1/ha/switchover", body)
    print(
        f"switched over in {result['seconds']}s: the primary is now {result['primary']} "
        f"(term {result['term']}, at transaction {result['lsn']})"
    )
    return 0


def ha_promote(client: Client, args: argparse.Namespace) -> int:
    standbys = [
        url
        for url, body in client.call_each("GET", "/api/v1/ha/status")
        if isinstance(body, dict) and body.get("role") == "standby"
    ]
    if not standbys:
        raise errors.TemporaryError("no standby among the API URLs given (--api-url)")
    single = Client(standbys[0], token=client.token)
    result = single.call("POST", "/api/v1/ha/promote", {"force": bool(args.force)})
    print(f"{standbys[0]} is now {result['role']} of term {result['term']}")
    return 0


def top(client: Client, args: argparse.Namespace) -> int:
    if args.interval <= 0 or (args.iterations is not None and args.iterations < 1):
        raise errors.ConfigError("--interval must be positive and --iterations at least 1")

    def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return client.call("GET", "/api/v1/stats"), client.call("GET", "/api/v1/workers")["workers"]

    try:
        progress.top(fetch, interval=args.interval, iterations=args.iterations)
    except KeyboardInterrupt:
        pass
    return 0


COMMANDS = {
    "submit": submit,
    "status": status,
    "list": list_tasks,
    "cancel": cancel,
    "logs": logs,
    "workers": workers,
    "stats": stats,
    "top": top,
    "ha-status": ha_status,
    "ha-switchover": ha_switchover,
    "ha-promote": ha_promote,
}


def run(args: argparse.Namespace, *, api_url: str, token: str | None) -> int:
    client = Client(api_url, token=token)
    try:
        return COMMANDS[args.command_name](client, args)
    except APIError as exc:
        print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
        return 2 if exc.status == 400 else 1
