"""Long-running commands: dispatcher, worker and dev (dispatcher + local workers)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import pwd
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from octaskly import __version__, errors, executing, files, keyring
from octaskly.api import app as api_app
from octaskly.cli import tokens_cmd
from octaskly.config import settings as config_settings
from octaskly.domain import models
from octaskly.protocol import messages
from octaskly.services import auditing, federation, ha
from octaskly.services import dispatcher as dispatching
from octaskly.services import worker as working
from octaskly.store import base as store_base
from octaskly.store import postgres, sqlite
from octaskly.transport import discovery, p2p, tls

log = logging.getLogger("octaskly")
API_BACKLOG = 1024
LINGERING_SECONDS = 2.0
"""After answering a request whose body was not read (413, 408): how long to read and drop
the rest, so that the client sees the answer, before closing."""
SECRET_FILE = "secret.key"
LOCK_FILE = "dispatcher.lock"
TLS_DIR = "tls"
DISCOVERY_SECONDS = 3.0


# -- secrets --------------------------------------------------------------------------------
def ensure_secret(settings: config_settings.Settings, data_dir: Path) -> bytes:
    """The configured secret key, else the one in the data dir, created 0600 if missing."""
    key = settings.secret_bytes()
    if key is not None:
        return key
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        log.warning(
            "no secret key configured: generated one in %s (workers need it: --secret-key-file %s)",
            path,
            path,
        )
    return path.read_text().strip().encode()


def find_secret(settings: config_settings.Settings, data_dir: Path) -> bytes:
    key = settings.secret_bytes()
    if key is not None:
        return key
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip().encode()
    raise errors.ConfigError(
        "no secret key: pass --secret-key-file PATH (or --secret-key, or set "
        "OCTASKLY_SECRET_KEY) with the dispatcher's key"
    )


# -- dispatcher -----------------------------------------------------------------------------
def key_ring(settings: config_settings.Settings, secret: bytes) -> keyring.Keyring:
    """The configured keys; backed by `secret_key_file` (re-read when it changes) if set."""
    path = settings.security.secret_key_file if settings.security.secret_key is None else None
    keys = settings.secret_keys() if path is not None else None
    return keyring.Keyring(keys or [secret], path)


def dispatcher_options(settings: config_settings.Settings, secret: bytes) -> dispatching.Options:
    return dispatching.Options(
        secret_key=secret,
        keys=key_ring(settings, secret),
        whitelist=frozenset(settings.security.whitelist),
        default_timeout=settings.limits.default_timeout,
        default_cpu_seconds=settings.limits.default_cpu_seconds,
        default_memory_mb=settings.limits.default_memory_mb,
        task_queue_size=settings.performance.task_queue_size,
        keepalive_interval=settings.performance.keepalive_interval,
        connection_timeout=settings.performance.connection_timeout,
        output_limit=settings.worker.output_limit_kb * 1024,
        ha=ha_options(settings),
        federation=federation_options(settings),
        audit_path=(
            settings.data_dir() / auditing.FILE if settings.security.audit_logging else None
        ),
        audit_retention_days=settings.storage.log_retention_days,
        task_retention_hours=settings.storage.task_retention_hours,
        client_min_sandbox_level=settings.dispatcher.client_min_sandbox_level,
    )


def federation_options(settings: config_settings.Settings) -> federation.Options:
    net = settings.network
    host = socket.gethostname() if net.bind_address in ("0.0.0.0", "::", "") else net.bind_address
    scheme = "https" if settings.api.tls_cert is not None else "http"
    return federation.Options(
        lease=settings.dispatcher.lease_seconds,
        data_dir=settings.data_dir(),
        p2p_address=f"{host}:{net.port}",
        api_url=f"{scheme}://{host}:{net.api_port}",
    )


def ha_options(settings: config_settings.Settings) -> ha.Options:
    d = settings.dispatcher
    return ha.Options(
        role=d.role,
        primary_addr=d.primary_addr,
        replication=d.replication,
        failover_timeout=d.failover_timeout,
        auto_failover=d.auto_failover,
        connect_timeout=min(5.0, settings.performance.connection_timeout),
        name=node_name(settings),
        state_dir=settings.data_dir(),
        advertise_host=(
            None
            if settings.network.bind_address in ("0.0.0.0", "::", "")
            else settings.network.bind_address
        ),
    )


class RunningDispatcher:
    """A dispatcher with its P2P listener and API site, for the CLI and the tests."""

    def __init__(
        self,
        dispatcher: dispatching.Dispatcher,
        listener: p2p.Listener,
        runner: web.AppRunner,
        api_port: int,
        advertising: asyncio.Task[None] | None = None,
        advertiser: discovery.Advertiser | None = None,
        lock: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.p2p = listener
        self.runner = runner
        self.api_port = api_port
        self.advertising = advertising
        self.advertiser = advertiser
        self.lock = lock
        """The data dir lock's fd (see lock_data_dir), released by close()."""

    async def close(self) -> None:
        if self.advertising is not None:
            self.advertising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.advertising
        if self.advertiser is not None:
            await self.advertiser.close()
        self.p2p.close()
        await self.runner.cleanup()
        await self.dispatcher.stop()
        await self.p2p.wait_closed()
        if self.lock is not None:
            os.close(self.lock)  # releases the data dir
            self.lock = None


def _check_storage(settings: config_settings.Settings) -> None:
    """With PostgreSQL every dispatcher is active on the shared database: a standby that
    replicates a primary's SQLite file has no meaning there (PostgreSQL's own replication
    carries durability)."""
    d = settings.dispatcher
    if settings.storage.db_url is not None and (d.role == "standby" or d.primary_addr):
        raise errors.ConfigError(
            "role standby / primary_addr replicate a primary's SQLite database; with db_url "
            "(PostgreSQL) run several dispatchers on the same database instead, all active"
        )


def make_store(settings: config_settings.Settings) -> store_base.Store:
    """The store the settings ask for: PostgreSQL with db_url, else the SQLite file."""
    url = settings.storage.db_url
    if url is not None:
        name = node_name(settings)
        return postgres.PostgresStore(url, application_name=f"octaskly {name}", owner=name)
    return sqlite.SQLiteStore(settings.db_file(), synchronous=settings.storage.sqlite_synchronous)


def node_name(settings: config_settings.Settings) -> str:
    return settings.dispatcher.node_name or f"{socket.gethostname()}:{settings.network.port}"


def store_description(store: store_base.Store) -> str:
    """Where the data is, for logs (never a password)."""
    if isinstance(store, postgres.PostgresStore):
        return f"PostgreSQL {store.where}"
    return str(getattr(store, "path", "memory"))


def api_tls_context(settings: config_settings.Settings) -> ssl.SSLContext | None:
    """HTTPS for the API with `tls_cert`/`tls_key`; None for plain HTTP."""
    api = settings.api
    if api.tls_cert is None or api.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(api.tls_cert, api.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            f"tls_cert/tls_key ({api.tls_cert}, {api.tls_key}): cannot load: {exc}"
        ) from None
    return context


ADMIN_TOKEN_TTL = 365 * 24 * 3600
ADMIN_TOKEN_RENEW = 30 * 24 * 3600


async def ensure_admin_token(dispatcher: dispatching.Dispatcher, data_dir: Path) -> None:
    """Keep a valid admin token in `<data dir>/admin.token` (0600) for this machine's owner:
    the local CLI finds it there. A revoked, foreign or soon-expiring one is replaced."""
    path = data_dir / tokens_cmd.TOKEN_FILE
    with contextlib.suppress(OSError, errors.AuthenticationError):
        claims = dispatcher.tokens.verify(path.read_text().strip())
        if claims.role == "admin" and claims.exp - dispatcher.clock() > ADMIN_TOKEN_RENEW:
            os.chmod(path, 0o600)
            return
    token, claims = await dispatcher.tokens.issue(
        subject="local-admin",
        role="admin",
        ttl=ADMIN_TOKEN_TTL,
        record=dispatcher.role == "primary",  # a standby must not write
    )
    files.write_private(path, (token + "\n").encode())
    dispatcher.audit.record(
        "token_issued",
        action="issue token",
        actor="dispatcher",
        details={"jti": claims.jti, "subject": claims.sub, "role": "admin", "file": str(path)},
    )
    log.info("wrote the local admin token to %s (mode 0600)", path)


async def _serve(
    settings: config_settings.Settings,
    dispatcher: dispatching.Dispatcher,
    identity: tls.Identity,
    api_tls: ssl.SSLContext | None,
    data_dir: Path,
) -> tuple[p2p.Listener, web.AppRunner]:
    """The P2P listener and the API site of a started dispatcher."""
    net = settings.network
    try:
        listener = await p2p.listen(
            net.bind_address,
            net.port,
            dispatcher.peers.handle,
            identity=identity,
            quic_enabled=net.quic_enabled,
        )
    except OSError as exc:
        raise errors.ConfigError(
            f"cannot listen on {net.bind_address}:{net.port} (P2P, TCP"
            f"{' and UDP' if net.quic_enabled else ''}): {exc.strerror or exc}"
        ) from None
    runner: web.AppRunner | None = None
    try:
        if settings.security.require_auth:
            await ensure_admin_token(dispatcher, data_dir)
        app = api_app.build(dispatcher, require_auth=settings.security.require_auth)
        # An API connection with no request in progress — idle after a response, or still
        # sending its request's headers (slowloris) — is closed after connection_timeout
        # (aiohttp's default: 3630 s, time enough to use up the fd limit).
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=settings.performance.connection_timeout,
            # after answering a request whose body was not read (413, 408), read and drop
            # the rest for at most this long so the client sees the answer, then close
            lingering_time=LINGERING_SECONDS,
        )
        await runner.setup()
        site = web.TCPSite(
            runner,
            net.bind_address,
            net.api_port,
            reuse_address=True,
            ssl_context=api_tls,
            # room for a burst of connections (aiohttp's 128 fills in a few milliseconds,
            # after which Linux drops SYNs and clients wait a 1 s retransmission)
            backlog=API_BACKLOG,
        )
        try:
            await site.start()
        except OSError as exc:
            raise errors.ConfigError(
                f"cannot listen on {net.bind_address}:{net.api_port} (API): {exc.strerror or exc}"
            ) from None
    except BaseException:
        listener.close()
        await listener.wait_closed()
        if runner is not None:
            await runner.cleanup()
        raise
    return listener, runner


def lock_data_dir(data_dir: Path) -> int:
    """Hold `<data dir>/dispatcher.lock` (flock) for the life of this process: one
    dispatcher per data dir, and `octaskly restore` can tell one is running. The kernel
    drops the lock when the process dies, kill -9 included. Returns the fd."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise errors.ConfigError(
            f"another dispatcher is running with data dir {data_dir} (it holds {LOCK_FILE})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def data_dir_error(data_dir: Path, exc: OSError) -> errors.StorageError:
    """A data dir the dispatcher cannot write (a read-only mount, say): which and why."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = f"{where}{exc.strerror or exc}"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return errors.StorageError(
            f"data dir {data_dir} is read-only ({reason}): the dispatcher must write its lock, "
            "database, keys and logs there. Check the permissions, the mount options and "
            "`lsattr`, or choose another --data-dir"
        )
    return errors.StorageError(f"cannot use data dir {data_dir} ({reason})")


def data_dir_in_use(data_dir: Path) -> bool:
    """Whether a dispatcher holds the lock of `data_dir` now."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def start_dispatcher(settings: config_settings.Settings) -> RunningDispatcher:
    _check_storage(settings)
    api_tls = api_tls_context(settings)  # before anything starts: bad files fail fast
    data_dir = settings.data_dir()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = lock_data_dir(data_dir)
    except OSError as exc:
        raise data_dir_error(data_dir, exc) from None
    try:
        return await _start_locked(settings, data_dir, api_tls, lock)
    except BaseException:
        os.close(lock)
        raise


async def _start_locked(
    settings: config_settings.Settings, data_dir: Path, api_tls: ssl.SSLContext | None, lock: int
) -> RunningDispatcher:
    secret = ensure_secret(settings, data_dir)
    identity = tls.load_or_create(data_dir / TLS_DIR)
    store = make_store(settings)
    dispatcher = dispatching.Dispatcher(options=dispatcher_options(settings, secret), store=store)
    dispatcher.ha.p2p_port = settings.network.port
    await dispatcher.start()
    net = settings.network
    try:
        listener, runner = await _serve(settings, dispatcher, identity, api_tls, data_dir)
    except BaseException:
        await dispatcher.stop()  # its writer thread would keep the process alive
        raise
    api_port = runner.addresses[0][1] if runner.addresses else net.api_port
    dispatcher.ha.p2p_port = listener.port
    log.info(
        "dispatcher ready: P2P %s:%d (TLS over TCP%s), API %s://%s:%d, database %s",
        net.bind_address,
        listener.port,
        ", QUIC over UDP" if listener.quic is not None else "; QUIC disabled",
        "https" if settings.api.tls_cert is not None else "http",
        net.bind_address,
        api_port,
        store_description(store),
    )
    if not settings.security.require_auth and net.bind_address not in ("127.0.0.1", "::1"):
        log.warning(
            "API authentication is OFF while listening on %s: anyone who can reach "
            "port %d can run commands on your workers",
            net.bind_address,
            api_port,
        )
    # Announcing on the LAN takes ~2 s of mDNS probing: not on the start-up path.
    advertiser = discovery.Advertiser()
    advertising = asyncio.create_task(
        advertiser.start(
            port=listener.port,
            bind_address=net.bind_address,
            name=f"{socket.gethostname()}-{listener.port}",
            properties={
                "v": __version__,
                "proto": str(messages.PROTOCOL_VERSION),
                "quic": "1" if listener.quic is not None else "0",
            },
        ),
        name="octaskly-mdns-advertise",
    )
    return RunningDispatcher(dispatcher, listener, runner, api_port, advertising, advertiser, lock)


async def _until_signal(*extra: asyncio.Future[Any] | asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    for item in extra:
        # (shielded: leaving this function must not cancel what we watched)
        waits.append(
            asyncio.ensure_future(
                item.wait() if isinstance(item, asyncio.Event) else asyncio.shield(item)
            )
        )
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def raise_open_files_limit() -> None:
    """Every API client, worker and standby connection is a file descriptor: take the hard
    limit of open files, not the soft one a shell usually starts with (1024 — a thousand
    idle connections would make the dispatcher refuse everyone). The systemd unit sets
    LimitNOFILE=65536; this covers a dispatcher started any other way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # (an unlimited hard limit: the kernel's default fs.nr_open)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open files limit from %d to %d", soft, target)


async def run_dispatcher(settings: config_settings.Settings) -> int:
    raise_open_files_limit()
    running = await start_dispatcher(settings)
    try:
        await _until_signal(running.dispatcher.stopped)
    finally:
        log.info("dispatcher shutting down")
        await running.close()
    return 1 if running.dispatcher.failure else 0


# -- worker ---------------------------------------------------------------------------------
def worker_options(settings: config_settings.Settings) -> working.Options:
    w = settings.worker
    addrs = tuple(config_settings.parse_addr(a) for a in w.dispatcher_addr) or (
        ("127.0.0.1", settings.network.port),
    )
    cpus = psutil.cpu_count() or 1
    resources = models.Resources(
        cpu_cores=w.cpu_cores if w.cpu_cores is not None else float(cpus),
        memory_mb=w.memory
        if w.memory is not None
        else psutil.virtual_memory().total // (1024 * 1024),
        gpu=w.gpu if w.gpu is not None else Path("/dev/nvidia0").exists(),
        labels=dict(w.labels),
    )
    workdir_root = w.work_dir or Path(tempfile.gettempdir())
    problem = working.sandbox_problem(w.sandbox_level, workdir_root)
    if problem is not None:
        raise errors.ConfigError(f"sandbox_level = {w.sandbox_level.value}: {problem}")
    key_file = settings.security.secret_key_file
    secret = find_secret(settings, settings.data_dir())
    task_user = resolve_task_user(w.task_user)
    try:
        contain = executing.detect_containment(w.containment, task_user=task_user)
    except executing.ContainmentUnavailable as exc:
        raise errors.ConfigError(f"containment = {w.containment}: {exc}") from None
    level = "none/basic tasks" if task_user is None else f"none/basic tasks (as uid {task_user[0]})"
    if contain.kind is executing.ContainmentKind.PROCESS_GROUP:
        log.warning("%s are contained by %s", level, contain.describe())
    else:
        log.info("%s are contained by %s; strict and up by bubblewrap", level, contain.describe())
    return working.Options(
        name=w.name or socket.gethostname(),
        dispatcher_addrs=addrs,
        secret_key=secret,
        keys=key_ring(settings, secret),
        resources=resources,
        max_jobs=w.max_jobs or cpus,
        sandbox_level=w.sandbox_level,
        output_limit=w.output_limit_kb * 1024,
        workdir_root=workdir_root,
        connect_timeout=settings.performance.connection_timeout,
        transport=w.transport,
        sandbox_hide=(settings.data_dir(), *([key_file] if key_file is not None else [])),
        task_user=task_user,
        sandbox_read_only_paths=w.sandbox_read_only_paths,
        containment=contain,
    )


def resolve_task_user(name: str | None) -> tuple[int, int] | None:
    """The uid/gid a worker runs its none/basic tasks as (`task_user`); None: as itself.

    A root worker defaults to ``nobody`` (65534 where there is no such user); a worker that
    is not root cannot switch, so it refuses a `task_user` other than itself.
    """
    entry: pwd.struct_passwd | None = None
    if name is not None:
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, OverflowError):
            if not name.isdigit():
                raise errors.ConfigError(f"task_user = {name}: no such user") from None
    if os.geteuid() != 0:
        uid = entry.pw_uid if entry is not None else None if name is None else int(name)
        if uid is not None and uid != os.geteuid():
            raise errors.ConfigError(
                f"task_user = {name}: only a worker running as root can run tasks as another user"
            )
        return None
    if name is None:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam("nobody")
        if entry is None:
            return executing.sandboxing.SANDBOX_UID, executing.sandboxing.SANDBOX_GID
    if entry is None:  # a uid without a passwd entry (name is its digits)
        uid = int(name or "0")
        return uid, uid
    return entry.pw_uid, entry.pw_gid


async def find_dispatchers(
    settings: config_settings.Settings, options: working.Options
) -> working.Options:
    """Without --dispatcher-addr: the dispatchers mDNS finds, else 127.0.0.1:<port>."""
    if settings.worker.dispatcher_addr:
        return options
    found = await discovery.discover(DISCOVERY_SECONDS)
    if not found:
        log.info(
            "no dispatcher found on the LAN within %gs; trying %s",
            DISCOVERY_SECONDS,
            ", ".join(f"{h}:{p}" for h, p in options.dispatcher_addrs),
        )
        return options
    log.info("found dispatcher(s) on the LAN: %s", ", ".join(f"{h}:{p}" for h, p in found))
    return dataclasses.replace(options, dispatcher_addrs=tuple(found))


async def run_worker(settings: config_settings.Settings) -> int:
    options = await find_dispatchers(settings, worker_options(settings))
    worker = working.Worker(options=options)
    log.info(
        "worker %s starting (dispatcher %s)",
        worker.options.name,
        ", ".join(f"{h}:{p}" for h, p in worker.options.dispatcher_addrs),
    )
    job = asyncio.ensure_future(worker.run())
    try:
        await _until_signal(job)
        drain = settings.worker.drain_timeout
        if drain > 0 and not job.done():
            await worker.drain(drain)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    if job.done() and not job.cancelled() and job.exception() is not None:
        exc = job.exception()
        if isinstance(exc, working.FatalWorkerError):
            log.error("%s", exc)
            return 1
        raise exc  # type: ignore[misc]
    return 0


# -- dev ------------------------------------------------------------------------------------
def self_command() -> list[str]:
    """How to start another octaskly process the same way this one was started."""
    argv0 = sys.argv[0]
    if argv0.endswith(".pyz") and Path(argv0).is_file():
        return [sys.executable, argv0]
    return [sys.executable, "-m", "octaskly"]


def _die_with_parent() -> None:
    """(in the child, before exec) Linux: SIGTERM this process when its parent dies, so
    that `octaskly dev` killed with -9 does not leave its workers behind."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def run_dev(settings: config_settings.Settings, workers: int) -> int:
    running = await start_dispatcher(settings)
    data_dir = settings.data_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTASKLY_SECRET_KEY")}
    if settings.security.secret_key is not None:
        # given inline: hand it to the workers through the environment, never argv
        env["OCTASKLY_SECRET_KEY"] = settings.security.secret_key.get_secret_value()
    else:
        env["OCTASKLY_SECRET_KEY_FILE"] = str(settings.secret_file_or(data_dir / SECRET_FILE))
    procs = []
    for i in range(1, workers + 1):
        cmd = [
            *self_command(),
            "worker",
            "--name",
            f"dev-worker-{i}",
            "--dispatcher-addr",
            f"127.0.0.1:{running.p2p.port}",
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        )
    print(
        f"octaskly dev: dispatcher + {workers} workers; API http://127.0.0.1:"
        f"{running.api_port}; data in {data_dir}. Try: octaskly submit --wait -- echo hello\n"
        f"dashboard: http://127.0.0.1:{running.api_port}/ui (log in with the token in "
        f"{data_dir / 'admin.token'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        await _until_signal(running.dispatcher.stopped)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await running.close()
    return 0
