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
    for args in (["--tasks", "0"], ["--scenarios", "nope"], ["--scale-depths", "1,x"]):
        done = bench(tmp_path, *args)
        assert done.returncode == 2, args
        assert "error:" in done.stderr
    assert list(tmp_path.iterdir()) == []
