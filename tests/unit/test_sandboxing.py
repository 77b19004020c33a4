"""The pure parts of sandboxing: levels, environments, bwrap command lines, rlimits."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import pytest

from octaskly.domain import models
from octaskly.executing import running, sandboxing
from octaskly.protocol import messages
from octaskly.services import worker as working

Level = models.SandboxLevel
LEVELS = list(Level)
WORKDIR = Path("/srv/work/octaskly-run-abc")
IDS = {"task_id": "t1", "attempt": 2, "workdir": WORKDIR}
WORKER_ENV = {
    "PATH": "/home/me/.venv/bin:/usr/bin:/bin",
    "HOME": "/home/me",
    "USER": "me",
    "LOGNAME": "me",
    "LANG": "en_US.UTF-8",
    "LANGUAGE": "en",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "C",
    "TZ": "UTC",
    "TERM": "xterm",
    "OCTASKLY_SECRET_KEY": "s3cret",
    "octaskly_token": "lower",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "GITHUB_TOKEN": "gh",
    "LC_SECRET_lower": "not a locale variable",
    "SSH_AUTH_SOCK": "/tmp/agent",
}
OWN = {"OCTASKLY_TASK_ID": "t1", "OCTASKLY_ATTEMPT": "2", "OCTASKLY_WORKDIR": str(WORKDIR)}


# -- levels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("worker", LEVELS)
@pytest.mark.parametrize("task", [None, *LEVELS])
def test_a_task_gets_the_stricter_level_never_a_looser_one(
    task: Level | None, worker: Level
) -> None:
    level = sandboxing.effective_level(task, worker)
    assert level.rank == max(worker.rank, -1 if task is None else task.rank)


def test_which_levels_use_bubblewrap() -> None:
    assert [sandboxing.is_sandboxed(level) for level in LEVELS] == [False, False, True, True]


# -- environments ---------------------------------------------------------------------------


def test_none_keeps_the_workers_environment_but_its_own_variables() -> None:
    env = sandboxing.task_env(Level.NONE, WORKER_ENV, {"X": "1"}, **IDS)
    expected = {k: v for k, v in WORKER_ENV.items() if not k.lower().startswith("octaskly_")}
    assert env == {**expected, "X": "1", **OWN}


def test_basic_keeps_an_allow_list_and_a_system_path() -> None:
    env = sandboxing.task_env(Level.BASIC, WORKER_ENV, {"X": "1"}, **IDS)
    assert env == {
        "PATH": sandboxing.SAFE_PATH,
        "HOME": "/home/me",
        "USER": "me",
        "LOGNAME": "me",
        "LANG": "en_US.UTF-8",
        "LANGUAGE": "en",
        "LC_ALL": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "TERM": "xterm",
        "X": "1",
        **OWN,
    }


def test_strict_is_minimal_with_the_sandbox_home() -> None:
    env = sandboxing.task_env(Level.STRICT, WORKER_ENV, {}, home=Path("/home/me"), **IDS)
    assert env == {
        "PATH": sandboxing.SAFE_PATH,
        "HOME": "/home/me",
        "LANG": "en_US.UTF-8",
        "LANGUAGE": "en",
        "LC_ALL": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "TERM": "xterm",
        **OWN,
    }
    assert "HOME" not in sandboxing.task_env(Level.STRICT, WORKER_ENV, {}, **IDS)


def test_very_strict_is_empty_but_the_tasks_own() -> None:
    env = sandboxing.task_env(Level.VERY_STRICT, WORKER_ENV, {"X": "1"}, home=Path("/h"), **IDS)
    assert env == {"X": "1", **OWN}


@pytest.mark.parametrize("level", LEVELS)
def test_the_task_env_applies_on_top_and_the_run_ids_win(level: Level) -> None:
    task = {"PATH": "/opt/bin", "HOME": "/x", "OCTASKLY_TASK_ID": "forged"}
    env = sandboxing.task_env(level, WORKER_ENV, task, **IDS)
    assert env["PATH"] == "/opt/bin" and env["HOME"] == "/x"
    assert env["OCTASKLY_TASK_ID"] == "t1"


# -- bwrap command lines --------------------------------------------------------------------


def argv(level: Level, **overrides: Any) -> list[str]:
    mounts: dict[str, Any] = {"workdir": WORKDIR}
    options: dict[str, Any] = {}
    for key, value in overrides.items():
        (options if key == "disable_userns" else mounts)[key] = value
    return sandboxing.bwrap_argv(
        level,
        bwrap="/usr/bin/bwrap",
        mounts=sandboxing.Mounts(**mounts),
        command=["/usr/bin/prlimit", "--nproc=10:10", "--", "/bin/sh", "-c", "echo hi"],
        **options,
    )


def pairs(args: list[str], option: str) -> list[str]:
    """The values given to `option`, in order."""
    return [args[i + 1] for i, arg in enumerate(args) if arg == option]


SYSTEM = (Path("/usr"), Path("/etc"))
LINKS = (("usr/bin", Path("/bin")), ("usr/lib", Path("/lib")))


def test_strict_argv_is_an_allow_list_on_an_empty_read_only_root() -> None:
    args = argv(Level.STRICT, tmp_size=100 * 1024 * 1024, exposed=SYSTEM, symlinks=LINKS)
    assert args == [
        "/usr/bin/bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--ro-bind",
        "/usr",
        "/usr",
        "--ro-bind",
        "/etc",
        "/etc",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--size",
        str(100 * 1024 * 1024),
        "--tmpfs",
        "/tmp",
        "--bind",
        str(WORKDIR),
        str(WORKDIR),
        "--remount-ro",
        "/",
        "--chdir",
        str(WORKDIR),
        "--",
        "/usr/bin/prlimit",
        "--nproc=10:10",
        "--",
        "/bin/sh",
        "-c",
        "echo hi",
    ]
    # never the whole host file system
    assert "/" not in pairs(args, "--ro-bind") and "/" not in pairs(args, "--bind")


def test_exposed_paths_inside_others_are_bound_once() -> None:
    args = argv(Level.STRICT, exposed=(Path("/usr"), Path("/usr/share"), Path("/opt/tools")))
    assert pairs(args, "--ro-bind") == ["/usr", "/opt/tools"]


def test_very_strict_adds_no_network_and_read_only_tmp_and_dev() -> None:
    strict, very = argv(Level.STRICT), argv(Level.VERY_STRICT, tmp_size=1 << 20)
    assert "--unshare-net" not in strict and "--unshare-net" in very
    assert "--size" not in very  # its /tmp takes nothing
    assert pairs(very, "--remount-ro") == ["/", "/tmp", "/dev"]
    assert pairs(strict, "--remount-ro") == ["/"]
    # the command comes last, after the one "--" that ends bwrap's options
    assert very[very.index("--") + 1 :] == strict[strict.index("--") + 1 :]


def test_hidden_directories_are_masked_then_made_read_only_around_the_workdir() -> None:
    hidden = (
        Path("/etc/octaskly"),
        Path("/etc/octaskly/tls"),  # inside /etc/octaskly: already hidden
        Path("/srv/work"),  # the workdir root, where the operator exposed /srv
        Path("/tmp/x"),  # under the private /tmp anyway
    )
    args = argv(
        Level.STRICT,
        exposed=(Path("/etc"), Path("/srv")),
        hidden_dirs=hidden,
        hidden_files=(Path("/etc/key"),),
    )
    assert pairs(args, "--tmpfs") == ["/tmp", "/etc/octaskly", "/srv/work"]
    assert pairs(args, "--remount-ro") == ["/etc/octaskly", "/srv/work", "/"]
    assert args[args.index("/etc/key") - 2 : args.index("/etc/key")] == ["--ro-bind", "/dev/null"]
    # the workdir is bound after the masks (on top of /srv/work) and before they turn read-only
    bind = args.index("--bind")
    assert args.index("/srv/work") < bind < args.index("--remount-ro")


def test_the_home_is_an_empty_directory_unless_it_is_hidden_or_exposed() -> None:
    args = argv(Level.STRICT, home=Path("/home/me"))
    assert pairs(args, "--dir") == ["/home/me"]
    assert args.index("--dir") < args.index("--remount-ro")
    hidden_home = argv(Level.STRICT, hidden_dirs=(Path("/root"),), home=Path("/root"))
    assert pairs(hidden_home, "--dir") == []
    assert pairs(argv(Level.VERY_STRICT, home=Path("/home/me")), "--dir") == []


def test_the_system_mounts_of_this_machine_exist_and_keep_its_symlinks() -> None:
    dirs, links = sandboxing.system_mounts()
    assert Path("/usr") in dirs and Path("/etc") in dirs
    for target, path in links:
        assert path.is_symlink() and str(path) and target == os.readlink(path)
    assert not any(p in dirs for _, p in links)


# -- the task's environment goes through the task's shell ----------------------------------


def test_env_script_exports_each_variable_quoted_then_says_ready() -> None:
    script = sandboxing.env_script({"A": "it's $HOME `x` \\", "B": "two\nlines"})
    assert script == (
        b"export A='it'\\''s $HOME `x` \\'\nexport B='two\nlines'\nOCTASKLY_READY=1\n"
    )


def test_env_script_keeps_the_run_ids() -> None:
    assert sandboxing.env_script({"OCTASKLY_TASK_ID": "forged"}) == b"OCTASKLY_READY=1\n"


@pytest.mark.parametrize(
    "env",
    [{"X;rm -rf /": "1"}, {"1X": "1"}, {"": "1"}, {"X": "nul\0byte"}, {"X Y": "1"}, {"A-B": "1"}],
)
def test_env_script_refuses_what_is_not_a_variable(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="environment variable"):
        sandboxing.env_script(env)


@pytest.mark.parametrize("level", LEVELS)
def test_the_launchers_get_nothing_of_the_tasks_env(level: Level) -> None:
    launcher = sandboxing.launcher_env(level, WORKER_ENV, **IDS)
    full = sandboxing.task_env(level, WORKER_ENV, {"LD_PRELOAD": "/x.so", "BASH_ENV": "/y"}, **IDS)
    assert "LD_PRELOAD" not in launcher and "BASH_ENV" not in launcher
    assert full == {**launcher, "LD_PRELOAD": "/x.so", "BASH_ENV": "/y"}


def test_older_bwrap_without_disable_userns() -> None:
    assert "--disable-userns" not in argv(Level.STRICT, disable_userns=False)


@pytest.mark.parametrize("level", [Level.NONE, Level.BASIC])
def test_levels_below_strict_have_no_bwrap_argv(level: Level) -> None:
    with pytest.raises(ValueError, match="does not use bubblewrap"):
        argv(level)


# -- rlimits of an assignment ---------------------------------------------------------------

MIB = 1024 * 1024


def assignment(**limits: Any) -> messages.TaskAssignment:
    return messages.TaskAssignment(
        task_id="t", attempt=1, command="true", env={}, timeout=10, **limits
    )


def test_defaults_apply_when_a_task_sets_no_limits() -> None:
    limits = working.rlimits(assignment(), Level.STRICT)
    assert limits == {
        resource.RLIMIT_AS: (2048 * MIB, 2048 * MIB),
        resource.RLIMIT_CPU: (3600, 3601),
        resource.RLIMIT_FSIZE: (10000 * MIB, 10000 * MIB),
        resource.RLIMIT_NOFILE: (1024, 1024),
        resource.RLIMIT_NPROC: (256, 256),
    }


def test_a_preset_fills_what_the_task_did_not_set() -> None:
    limits = working.rlimits(assignment(limits_preset="strict", cpu_seconds=5), Level.STRICT)
    assert limits[resource.RLIMIT_CPU] == (5, 6)
    assert limits[resource.RLIMIT_AS] == (512 * MIB, 512 * MIB)
    assert limits[resource.RLIMIT_FSIZE] == (1000 * MIB, 1000 * MIB)
    assert limits[resource.RLIMIT_NOFILE] == (100, 100)
    assert limits[resource.RLIMIT_NPROC] == (10, 10)


@pytest.mark.parametrize("level", [Level.NONE, Level.BASIC])
def test_no_process_limit_outside_a_sandbox(level: Level) -> None:
    assert resource.RLIMIT_NPROC not in working.rlimits(assignment(process_limit=10), level)


def test_limits_never_exceed_the_workers_own_hard_limits() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = working.rlimits(assignment(open_files_limit=1024 * 1024), Level.NONE)
    assert limits[resource.RLIMIT_NOFILE] == (min(1024 * 1024, hard), min(1024 * 1024, hard))


# -- naming the limit a failed run ran into ---------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        ("sh: 1: Cannot fork\n", "process limit (10) reached"),
        ("bash: fork: retry: Resource temporarily unavailable\n", "process limit (10) reached"),
        ("BlockingIOError: [Errno 11] Resource temporarily unavailable\n", "process limit"),
        ("Traceback (most recent call last):\nMemoryError\n", "memory limit (256 MB) exceeded"),
        ("terminate called after throwing an instance of 'std::bad_alloc'\n", "memory limit"),
        ("OSError: [Errno 24] Too many open files: 'x'\n", "open files limit (100) reached"),
        ("OSError: [Errno 27] File too large\n", "file size limit exceeded"),
        ("some other failure\n", None),
    ],
)
def test_a_failed_runs_last_words_name_the_limit(stderr: str, expected: str | None) -> None:
    limits = working.rlimits(
        assignment(memory_limit_mb=256, process_limit=10, open_files_limit=100), Level.STRICT
    )
    found = running._breached_limit(limits, stderr)
    assert found == expected or (expected is not None and found is not None and expected in found)


def test_a_limit_that_was_not_set_is_never_named() -> None:
    assert running._breached_limit({}, "MemoryError\nCannot fork\n") is None
