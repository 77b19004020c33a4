"""`make bench` keeps working: a small run of the real harness (real cluster, real
simulated workers), so a change that breaks a scenario fails here, not on release day.
The numbers themselves are not judged: speed is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_a_small_run_measures_every_cluster_scenario(tmp_path: Path) -> None:
    done = bench(
        tmp_path,
        *("--tasks", "300", "--spawns", "200", "--scenarios", "limit,batch,single,ha,scale"),
        *("--scale-depths", "1000,3000", "--scale-window", "1000"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (written,) = tmp_path.glob("*.json")
    results = json.loads(written.read_text())
    assert results["errors"] == {}
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
    ):
        done = bench(tmp_path, *args)
        assert done.returncode == 2, args
        assert "error:" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_federation_compares_sqlite_with_1_2_3_dispatchers_on_postgresql(tmp_path: Path) -> None:
    done = bench(tmp_path, "--tasks", "600", "--scenarios", "federation")
    assert done.returncode == 0, done.stdout + done.stderr
    (written,) = tmp_path.glob("*.json")
    results = json.loads(written.read_text())
    assert results["errors"] == {}
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
