"""`make bench` keeps working: a small run of the real harness (real cluster, real
simulated workers), so a change that breaks a scenario fails here, not on release day.
The numbers themselves are not judged: speed is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def written(tmp_path: Path, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The results of a run that exited 0 with no scenario in error (the one JSON file)."""
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("*.json")
    results: dict[str, Any] = json.loads(path.read_text())
    assert results["errors"] == {}
    return results


def test_a_small_run_measures_every_cluster_scenario(tmp_path: Path) -> None:
    done = bench(
        tmp_path,
        *("--tasks", "300", "--spawns", "200", "--scenarios", "limit,batch,single,ha,scale"),
        *("--scale-depths", "1000,3000", "--scale-window", "1000"),
    )
    results = written(tmp_path, done)
    assert results["limit"]["per_second"] > 0
    for scenario in ("batch", "single"):
        assert results[scenario]["tasks_per_second"] > 0
        assert results[scenario]["queue_to_start"]["p99_ms"] >= 0
    assert results["batch"]["probe"]["queue_to_start"]["p50_ms"] >= 0
    for mode in ("async", "sync"):  # the batch load on a primary replicating to a standby
        replicated = results["ha"][mode]
        assert replicated["tasks_per_second"] > 0
        assert replicated["lag"]["samples"] > 0
        assert replicated["lag"]["lag_seconds"]["max"] >= 0
        assert replicated["positions"]["lsn_equal"] is True, replicated["positions"]
    assert [row["depth"] for row in results["scale"]["depths"]] == [1000, 3000]
    verdicts = {t["name"]: t["verdict"] for t in results["targets"]}
    assert verdicts["batch throughput"] in ("PASS", "FAIL")
    assert verdicts["async replication lag (max)"] in ("PASS", "FAIL")
    assert verdicts["ha sync throughput / batch"] == "info"  # informational, never judged
    assert verdicts["dispatcher idle RSS"] == "n/a"  # startup did not run
    assert "== 2b. Replication" in done.stdout
    assert "== Targets (issue 3)" in done.stdout


def test_bad_arguments_are_refused_with_status_2(tmp_path: Path) -> None:
    for args in (
        ["--tasks", "0"],
        ["--scenarios", "nope"],
        ["--scale-depths", "1,x"],
        ["--federation-tasks", "0"],
        ["--isolation-tasks", "0"],
        ["--isolation-repeats", "-1"],
    ):
        done = bench(tmp_path, *args)
        assert done.returncode == 2, args
        assert "error:" in done.stderr
    assert list(tmp_path.iterdir()) == []


def _has_commit(commit: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True
    )
    return found.returncode == 0


def test_isolation_measures_the_base_commit_and_this_tree_in_one_run(tmp_path: Path) -> None:
    done = bench(
        tmp_path,
        *("--scenarios", "isolation", "--isolation-tasks", "160", "--isolation-repeats", "2"),
    )
    results = written(tmp_path, done)
    isolation = results["isolation"]
    variants = isolation["variants"]
    assert isolation["tasks_per_run"] == 80 and isolation["strict_tasks_per_run"] == 20
    assert "== 1b. Isolation (issue 18)" in done.stdout
    if _has_commit(isolation["base_commit"]):
        assert isolation["base"] == "measured"
        for key in ("before-basic", "before-strict"):
            # the old tree's own code ran (a worktree), not this one's
            assert variants[key]["octaskly"] != str(REPO / "octaskly"), variants[key]
            assert len(variants[key]["per_second_all"]) == 2
        assert variants["basic-process-group"]["rate_vs_before"] > 0
        assert variants["basic-auto"]["cpu_vs_before"] > 0
        # the temporary worktree is gone, and git no longer lists it
        tree = Path(variants["before-basic"]["octaskly"]).parent
        assert not tree.exists()
        listed = subprocess.run(
            ["git", "worktree", "list", "--porcelain"], cwd=REPO, capture_output=True, text=True
        )
        assert str(tree) not in listed.stdout
    else:  # a tarball or shallow checkout: "after" is still measured
        assert isolation["base"] == "not available (no git history)"
        assert "before: not available (no git history)" in done.stdout
    for key in ("basic-process-group", "basic-auto", "strict"):
        assert variants[key]["octaskly"] == str(REPO / "octaskly"), variants[key]
        assert variants[key]["per_second"] > 0
        assert variants[key]["parent_cpu_ms_per_task"] > 0
        assert variants[key]["children_cpu_ms_per_task"] > 0
    assert variants["basic-process-group"]["containment"] == "process-group"
    for key in ("basic-pid-namespace", "basic-auto-nobody"):  # measured, or why not
        assert variants[key].get("per_second", 0) > 0 or variants[key]["unavailable"], variants[key]
    verdicts = {t["name"]: t["verdict"] for t in results["targets"]}
    assert verdicts["isolation CPU basic / before"] in ("info", "n/a")


def test_federation_compares_sqlite_with_1_2_3_dispatchers_on_postgresql(tmp_path: Path) -> None:
    done = bench(tmp_path, "--tasks", "600", "--scenarios", "federation")
    results = written(tmp_path, done)
    federation = results["federation"]
    configs = federation["configs"]
    assert list(configs) == ["sqlite-1", "pg-1", "pg-2", "pg-3"]
    for name, c in configs.items():
        assert c["tasks"] == 600 and c["tasks_per_second"] > 0, name
        assert c["ran_more_than_once"] == 0, name
        assert sum(w["ran"] for w in c["workers"].values()) == 600, name
        assert (c["cpu_seconds"]["postgres"] is None) == (name == "sqlite-1"), name
        assert len(c["per_dispatcher"]) == c["dispatchers"], name
    # batches of 500 and 100: the client spread them over the dispatchers it was given
    assert [d["acknowledged"] for d in configs["pg-2"]["per_dispatcher"].values()] == [500, 100]
    assert configs["pg-1"]["cpu_seconds"]["postgres"] > 0
    assert not Path(federation["postgres"]["dir"]).exists()  # the server was removed
    verdicts = {t["name"]: t["verdict"] for t in results["targets"]}
    assert verdicts["PG 2 dispatchers / SQLite"] == "info"
    assert "== 2c. Federation" in done.stdout
    rates = {name: round(c["tasks_per_second"]) for name, c in configs.items()}
    print(f"600 tasks per configuration, tasks/s {rates}; none ran twice; server removed")
