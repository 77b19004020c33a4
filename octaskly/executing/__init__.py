"""Running one task's shell command on a worker.

An :class:`Execution` runs ``/bin/sh -c COMMAND`` in its own session and process group,
with stdin from /dev/null and a fresh working directory, streams its output while it runs
and returns an :class:`ExecResult`. Whatever happens, no process of the group outlives the
run: on timeout or cancel the group gets SIGTERM, then SIGKILL after a grace period; after
a normal exit, background processes left in the group are killed. Only a process that
left the group (``setsid``) can survive, and then reading its output stops after a short
drain so that ``run()`` never hangs on it; in a sandbox not even that one, as it dies
with the sandbox's PID namespace.

Sandbox levels (:mod:`~octaskly.executing.sandboxing`): ``none`` and ``basic`` differ in
the environment a task gets; ``strict`` and ``very-strict`` run it in bubblewrap (``bwrap``).

Resource limits are set by util-linux ``prlimit`` (or, without it and outside a sandbox, a
tiny Python shim) that execs the shell, not by ``preexec_fn``: nothing runs between fork
and exec in a process that has threads. :func:`install_fast_child_watcher` makes Python 3.11 reap
children through pidfds, as 3.12 does by default.

Modules: ``running`` (the execution), ``sandboxing`` (levels: environment, bwrap argv),
``tails`` (the bounded output buffer, pure), ``watching`` (the child watcher),
``workdirs`` (working directories a worker reuses).
"""

from octaskly.executing.running import (
    DRAIN_SECONDS,
    KILL_GRACE_SECONDS,
    PRIVATE_ENV_PREFIX,
    ExecRequest,
    ExecResult,
    Execution,
    OutputCallback,
    Status,
    not_run,
)
from octaskly.executing.sandboxing import effective_level, is_sandboxed, unavailable
from octaskly.executing.tails import TailBuffer
from octaskly.executing.watching import install_fast_child_watcher
from octaskly.executing.workdirs import Workdirs

__all__ = [
    "DRAIN_SECONDS",
    "KILL_GRACE_SECONDS",
    "PRIVATE_ENV_PREFIX",
    "ExecRequest",
    "ExecResult",
    "Execution",
    "OutputCallback",
    "Status",
    "TailBuffer",
    "Workdirs",
    "effective_level",
    "install_fast_child_watcher",
    "is_sandboxed",
    "not_run",
    "unavailable",
]
