"""The `octaskly` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/config error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from octaskly import __version__, errors
from octaskly.cli import logsetup
from octaskly.config import loading, template

log = logging.getLogger("octaskly")

COMMON_KEYS = ["log_level", "log_format"]
DISPATCHER_KEYS = [
    "port",
    "api_port",
    "bind_address",
    "db_path",
    "db_url",
    "data_dir",
    "secret_key",
    "secret_key_file",
    "require_auth",
    "whitelist",
    "role",
    "primary_addr",
    "replication",
    "failover_timeout",
    "auto_failover",
    "node_name",
    "lease_seconds",
    "client_min_sandbox_level",
    "quic_enabled",
    "task_queue_size",
    "keepalive_interval",
    "connection_timeout",
    "default_timeout",
    "sqlite_synchronous",
    "task_retention_hours",
    "tls_cert",
    "tls_key",
    *COMMON_KEYS,
]
WORKER_KEYS = [
    "dispatcher_addr",
    "name",
    "cpu_cores",
    "memory",
    "gpu",
    "max_jobs",
    "drain_timeout",
    "labels",
    "sandbox_level",
    "transport",
    "secret_key",
    "secret_key_file",
    "data_dir",
    "output_limit_kb",
    "work_dir",
    "task_user",
    "sandbox_read_only_paths",
    "containment",
    "connection_timeout",
    *COMMON_KEYS,
]
CLIENT_KEYS = ["api_url", "token", "data_dir", *COMMON_KEYS]
TOKEN_KEYS = [*CLIENT_KEYS[:-2], "secret_key", "secret_key_file", *COMMON_KEYS]


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line reason (its default, kept explicit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"octaskly: error: {message}\n")


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration file (env OCTASKLY_CONFIG; else ./octaskly.toml, "
        "~/.octaskly/octaskly.toml, /etc/octaskly/octaskly.toml)",
    )


def _client_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _with_config(p)
        loading.add_flags(p, CLIENT_KEYS)
        p.set_defaults(kind="client", command_name=name)
        return p

    p = add("submit", "Queue a shell command as a task")
    p.add_argument("--timeout", type=int, help="seconds before the task is killed (1-86400)")
    p.add_argument("--priority", choices=["low", "normal", "high", "critical"])
    p.add_argument("--retries", type=int, help="retries after failure (0-10)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="task environment")
    p.add_argument("--memory-limit-mb", type=int, dest="memory_limit_mb")
    p.add_argument("--cpu-seconds", type=int, dest="cpu_seconds")
    p.add_argument("--disk-limit-mb", type=int, dest="disk_limit_mb")
    p.add_argument("--open-files-limit", type=int, dest="open_files_limit")
    p.add_argument("--process-limit", type=int, dest="process_limit")
    p.add_argument(
        "--limits-preset",
        choices=["strict", "relaxed"],
        dest="limits_preset",
        help="strict: 300 s, 512 MB, 1000 MB, 100 files, 10 processes; relaxed: 86400 s, "
        "8192 MB, 102400 MB, 4096 files, 1024 processes (explicit limits win)",
    )
    p.add_argument("--sandbox-level", choices=["none", "basic", "strict", "very-strict"])
    p.add_argument("--cpu-cores", type=float, help="required CPU cores on the worker")
    p.add_argument("--memory-mb", type=int, help="required memory (MB) on the worker")
    p.add_argument("--gpu", action="store_true", help="require a worker with a GPU")
    p.add_argument(
        "--require-label", action="append", metavar="KEY=VALUE", help="require a worker label"
    )
    p.add_argument("--idempotency-key", help="repeat-safe submit: same key, same task")
    p.add_argument(
        "--from-file",
        metavar="FILE",
        help="submit one task per line of FILE (- for stdin), in batches; prints the ids "
        "(with --wait: a progress bar, then exit 0 only if all completed)",
    )
    p.add_argument("--wait", action="store_true", help="wait, then print the task's output")
    p.add_argument("--follow", action="store_true", help="stream the output while it runs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    for name, text in (("status", "Show a task"), ("cancel", "Cancel a queued or running task")):
        p = add(name, text)
        p.add_argument("task_id")
        p.add_argument("--json", action="store_true")
    p = add("list", "List tasks, newest first")
    p.add_argument(
        "--status", choices=["queued", "running", "completed", "failed", "timed_out", "cancelled"]
    )
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p = add("logs", "Print a task's stdout and stderr")
    p.add_argument("task_id")
    p.add_argument("--follow", action="store_true", help="stream until the task ends")
    p = add("workers", "List connected workers")
    p.add_argument("--json", action="store_true")
    add("stats", "Cluster statistics (JSON)")
    p = add("top", "A live view of workers and the queue (Ctrl-C to quit)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    p.add_argument("--iterations", type=int, help="stop after N updates (default: never)")

    p = sub.add_parser(
        "ha",
        help="High availability: status of primary and standby, switchover, promote",
        description="Give every dispatcher's API: --api-url http://a:3000,http://b:3000",
    )
    hsub = p.add_subparsers(dest="ha_command", metavar="ACTION", parser_class=_Parser)
    hsub.required = True
    for name, text in (
        ("status", "Role, term, replication mode, sync state and lag of every node given"),
        ("switchover", "Hand the primary role to the standby, losing nothing (admin)"),
        ("promote", "Promote the standby now, e.g. when the primary is gone for good (admin)"),
    ):
        h = hsub.add_parser(name, help=text, description=text)
        _with_config(h)
        loading.add_flags(h, CLIENT_KEYS)
        h.set_defaults(kind="client", command_name=f"ha-{name}")
        if name == "status":
            h.add_argument("--json", action="store_true")
        elif name == "switchover":
            h.add_argument(
                "--timeout", type=float, default=30, help="seconds for the standby to catch up"
            )
        else:
            h.add_argument(
                "--force",
                action="store_true",
                help="promote even a standby that may lack acknowledged writes (it was not "
                "in sync when the primary was lost)",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="octaskly", description="Distributed task runner with a durable queue.")
    parser.add_argument("--version", action="version", version=f"octaskly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("dispatcher", help="Run the dispatcher (queue, scheduler, REST API)")
    _with_config(p)
    loading.add_flags(p, DISPATCHER_KEYS)
    p.set_defaults(kind="dispatcher")

    p = sub.add_parser("worker", help="Run a worker that executes tasks")
    _with_config(p)
    loading.add_flags(p, WORKER_KEYS)
    p.set_defaults(kind="worker")

    p = sub.add_parser(
        "dev",
        help="Dispatcher + local workers in one process tree "
        "(data in ./.octaskly/, API on 127.0.0.1)",
    )
    p.add_argument("--workers", type=int, default=2, help="local workers to start (default 2)")
    _with_config(p)
    loading.add_flags(p, ["port", "api_port", "data_dir", *COMMON_KEYS])
    p.set_defaults(kind="dev")

    _client_parsers(sub)

    p = sub.add_parser("token", help="Create or revoke API tokens")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    t = tsub.add_parser(
        "create",
        help="Create a token: signed here with the cluster key if this machine has it, "
        "else issued by the dispatcher (needs an admin --token)",
    )
    t.add_argument("--role", required=True, choices=["admin", "dispatcher", "worker", "client"])
    t.add_argument("--subject", help="who the token is for (required unless --role admin)")
    t.add_argument("--ttl", default="24h", help="lifetime: 90s, 30m, 24h, 7d (default 24h)")
    t.add_argument("--json", action="store_true", help="print id, subject, role, expiry too")
    _with_config(t)
    loading.add_flags(t, TOKEN_KEYS)
    t.set_defaults(kind="token", token_command="create")
    t = tsub.add_parser("revoke", help="Revoke a token by its id (needs an admin token)")
    t.add_argument("token_id")
    _with_config(t)
    loading.add_flags(t, CLIENT_KEYS)
    t.set_defaults(kind="token", token_command="revoke")

    p = sub.add_parser(
        "backup",
        help="Copy the database consistently while the dispatcher runs (SQLite backup API)",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="where to write the copy")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    _with_config(p)
    loading.add_flags(
        p,
        ["data_dir", "db_path", "api_url", "token", "secret_key", "secret_key_file", *COMMON_KEYS],
    )
    p.set_defaults(kind="backup")
    p = sub.add_parser(
        "restore",
        help="Replace the database by a backup (dispatcher stopped; the old one is kept)",
    )
    p.add_argument("file", help="a file written by octaskly backup")
    _with_config(p)
    loading.add_flags(p, ["data_dir", "db_path", *COMMON_KEYS])
    p.set_defaults(kind="restore")

    p = sub.add_parser(
        "migrate",
        help="Move an installation from its SQLite file to PostgreSQL and verify the copy",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="sqlite:PATH",
        help="the SQLite database (default: the configured one, <data dir>/octaskly.db)",
    )
    p.add_argument(
        "--to",
        dest="target",
        metavar="postgresql://…",
        help="the PostgreSQL database (default: db_url / $OCTASKLY_DB_URL; the variable "
        "keeps the password out of the process list)",
    )
    p.add_argument(
        "--audit-log",
        metavar="FILE",
        help="audit log to bring along (default <data dir>/logs/audit.log)",
    )
    p.add_argument("--no-audit", action="store_true", help="leave the audit log behind")
    p.add_argument(
        "--replace", action="store_true", help="delete octaskly data already in the target"
    )
    _with_config(p)
    loading.add_flags(p, ["data_dir", "db_url", "secret_key", "secret_key_file", *COMMON_KEYS])
    p.set_defaults(kind="migrate")

    p = sub.add_parser("audit", help="Check the audit log")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    asub.required = True
    a = asub.add_parser(
        "verify",
        help="Verify the audit log's hash chain: exit 0 if intact, 1 naming every broken line",
    )
    a.add_argument("--file", help="audit log to check (default <data dir>/logs/audit.log)")
    _with_config(a)
    loading.add_flags(a, ["data_dir", "db_path", "secret_key", "secret_key_file", *COMMON_KEYS])
    a.set_defaults(kind="audit-verify")

    p = sub.add_parser("config", help="Write, show or check configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    c = csub.add_parser("init", help="Write a commented default octaskly.toml")
    c.add_argument("--output", default="octaskly.toml", help="file to write (- for stdout)")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c.set_defaults(kind="config-init")
    c = csub.add_parser("show", help="Effective configuration and where each value came from")
    _with_config(c)
    loading.add_flags(c, [*DISPATCHER_KEYS, *[k for k in WORKER_KEYS if k not in DISPATCHER_KEYS]])
    c.set_defaults(kind="config-show")
    c = csub.add_parser("check", help="Validate a configuration file")
    c.add_argument("file")
    c.set_defaults(kind="config-check")
    return parser


def _load(args: argparse.Namespace, **overrides: object) -> loading.Loaded:
    flags = loading.flags_from_namespace(args)
    for key, value in overrides.items():
        flags.setdefault(key, value)
    loaded = loading.load(flags=flags, config_file=getattr(args, "config", None))
    logsetup.configure(loaded.settings.logging.log_level, loaded.settings.logging.log_format)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return loaded


def _config_command(args: argparse.Namespace) -> int:
    if args.kind == "config-init":
        text = template.render_default_toml()
        if args.output == "-":
            sys.stdout.write(text)
            return 0
        out = Path(args.output)
        if out.exists() and not args.force:
            raise errors.ConfigError(f"{out} exists; pass --force to overwrite it")
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.kind == "config-check":
        loading.check_file(Path(args.file))
        print(f"{args.file}: OK")
        return 0
    sys.stdout.write(template.render_effective(_load(args)))
    return 0


def _backup_or_restore(args: argparse.Namespace) -> int:
    from octaskly.cli import serving
    from octaskly.store import backup

    settings = _load(args).settings
    db_path = settings.db_file()
    via_api = args.kind == "backup" and getattr(args, loading.flag_dest("api_url"), None)
    if settings.storage.db_url is not None and not via_api:
        raise errors.ConfigError(
            f"octaskly {args.kind} works on SQLite databases; this configuration uses "
            "PostgreSQL (db_url): use pg_dump / pg_restore, or the server's own backups"
        )
    if via_api:
        from octaskly.cli import tokens_cmd
        from octaskly.cli.client import APIError

        url = settings.api.api_url
        try:
            info = tokens_cmd.download_backup(settings, Path(args.output), force=args.force)
        except APIError as exc:
            print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
            return 1
        print(f"backed up {url} to {info.path}: {info.tasks} tasks, {info.bytes} bytes")
        return 0
    if args.kind == "backup":
        info = backup.backup(db_path, Path(args.output), force=args.force)
        print(f"backed up {db_path} to {info.path}: {info.tasks} tasks, {info.bytes} bytes")
        return 0
    if serving.data_dir_in_use(settings.data_dir()):
        raise errors.ConfigError(
            f"a dispatcher is running with data dir {settings.data_dir()}: stop it first "
            "(systemctl stop octaskly-dispatcher)"
        )
    info, kept = backup.restore(Path(args.file), db_path)
    print(f"restored {db_path} from {args.file}: {info.tasks} tasks")
    if kept is not None:
        print(f"the previous database is kept as {kept}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from octaskly.cli import tokens_cmd
    from octaskly.services import auditing

    settings = _load(args).settings
    path = Path(args.file) if args.file else settings.data_dir() / auditing.FILE
    secret = tokens_cmd.local_secret(settings)
    if secret is None:
        raise errors.ConfigError(
            "the audit log is keyed with the cluster secret: pass --secret-key-file PATH"
        )
    if not path.is_file():
        raise errors.ConfigError(f"no audit log at {path}")
    verdict = auditing.verify(path, settings.secret_keys() or [secret])
    for problem in verdict.problems:
        print(f"{path}: {problem}")
    if verdict.ok:
        print(
            f"{path}: OK, {verdict.entries} entries, chain intact "
            f"(seq {verdict.first_seq}..{verdict.last_seq})"
        )
        return 0
    return 1


def _migrate(args: argparse.Namespace) -> int:
    from octaskly.cli import migrate_cmd, tokens_cmd
    from octaskly.services import auditing
    from octaskly.store import postgres

    settings = _load(args).settings
    source = migrate_cmd.parse_source(args.source) if args.source else settings.db_file()
    url = args.target or settings.storage.db_url
    if url is None:
        raise errors.ConfigError("say where to: --to postgresql://… or OCTASKLY_DB_URL")
    if not url.startswith("postgresql://"):
        raise errors.ConfigError("--to must be a postgresql:// URL")
    audit_log = None
    if not args.no_audit:
        audit_log = Path(args.audit_log) if args.audit_log else settings.data_dir() / auditing.FILE
    secret = tokens_cmd.local_secret(settings)
    secrets = settings.secret_keys() or ([secret] if secret is not None else [])
    report = asyncio.run(
        migrate_cmd.migrate(source, url, audit_log=audit_log, secrets=secrets, replace=args.replace)
    )
    where = postgres.describe(url)
    counts = ", ".join(f"{n} {s}" for s, n in report.tasks.items() if n)
    print(f"copied {sum(report.tasks.values())} tasks from {source} to PostgreSQL {where}: "
          f"{counts or 'none'} (counts checked on both sides)")  # fmt: skip
    if report.requeued:
        print(f"{report.requeued} running tasks are queued there; their workers re-attach "
              "them when they connect to a dispatcher on PostgreSQL")  # fmt: skip
    print(f"copied {report.tokens} tokens ({report.revoked} revoked)")
    if report.audit_entries is not None:
        print(f"copied the audit chain of {audit_log}: {report.audit_entries} entries, "
              "verified again from PostgreSQL with the cluster key")  # fmt: skip
    print("next: start the dispatchers with OCTASKLY_DB_URL set (and workers with all their "
          "addresses); keep the SQLite file until you are satisfied")  # fmt: skip
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.kind.startswith("config-"):
        return _config_command(args)
    if args.kind == "audit-verify":
        return _audit_verify(args)
    if args.kind in ("backup", "restore"):
        return _backup_or_restore(args)
    if args.kind == "migrate":
        return _migrate(args)
    if args.kind in ("client", "token"):
        from octaskly.cli import tokens_cmd

        settings = _load(args).settings
        token = tokens_cmd.find_token(
            settings, data_dir_given=getattr(args, "data_dir", None) is not None
        )
        if args.kind == "token":
            command = tokens_cmd.create if args.token_command == "create" else tokens_cmd.revoke
            return command(args, settings, token)
        from octaskly.cli import remote

        return remote.run(args, api_url=settings.api.api_url, token=token)
    from octaskly.cli import serving

    if args.kind == "dev":
        if args.workers < 0 or args.workers > 64:
            raise errors.ConfigError("--workers must be between 0 and 64")
        settings = _load(args, data_dir=".octaskly", bind_address="127.0.0.1").settings
        return asyncio.run(serving.run_dev(settings, args.workers))
    settings = _load(args).settings
    if args.kind == "dispatcher":
        return asyncio.run(serving.run_dispatcher(settings))
    return asyncio.run(serving.run_worker(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except errors.ConfigError as exc:
        print(f"octaskly: {exc}", file=sys.stderr)
        return 2
    except errors.OctasklyError as exc:
        print(f"octaskly: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `octaskly list | head`: the reader went away; end quietly, as if by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
