"""Running one task's shell command on a worker.

An :class:`Execution` runs ``/bin/sh -c COMMAND`` in its own session and process group,
with stdin from /dev/null and a fresh working directory, streams its output while it runs
and returns an :class:`ExecResult`. Whatever happens, no process of the group outlives the
run: on timeout or cancel the run gets SIGTERM, then SIGKILL after a grace period; after
a normal exit, background processes left behind are killed. Processes that left the
process group (``setsid``, ``daemon()``) are still in the run's cgroup or PID namespace
(:mod:`~octaskly.executing.containment`), and in a sandbox in bubblewrap's PID namespace:
they die with it too.

Sandbox levels (:mod:`~octaskly.executing.sandboxing`): ``none`` and ``basic`` differ in
the environment a task gets; ``strict`` and ``very-strict`` run it in bubblewrap (``bwrap``).

Resource limits are set by util-linux ``prlimit`` (or, without it and outside a sandbox, a
tiny Python shim) that execs the shell, not by ``preexec_fn``: nothing runs between fork
and exec in a process that has threads. :func:`install_fast_child_watcher` makes Python 3.11 reap
children through pidfds, as 3.12 does by default.

Modules: ``running`` (the execution), ``sandboxing`` (levels: environment, bwrap argv),
``containment`` (a run's cgroup or PID namespace: everything it started dies with it),
``tails`` (the bounded output buffer, pure), ``watching`` (the child watcher),
``workdirs`` (working directories a worker reuses).
"""

from octaskly.executing.containment import Containment
from octaskly.executing.containment import Kind as ContainmentKind
from octaskly.executing.containment import Unavailable as ContainmentUnavailable
from octaskly.executing.containment import detect as detect_containment
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
    "Containment",
    "ContainmentKind",
    "ContainmentUnavailable",
    "ExecRequest",
    "ExecResult",
    "Execution",
    "OutputCallback",
    "Status",
    "TailBuffer",
    "Workdirs",
    "detect_containment",
    "effective_level",
    "install_fast_child_watcher",
    "is_sandboxed",
    "not_run",
    "unavailable",
]
