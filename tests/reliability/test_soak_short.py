"""`make soak` keeps working: a one-minute run of the real soak command (a real dispatcher
and 2 workers under the same mixed load, sampled every 5 s) as a subprocess.

What is checked is the command, not a long-run verdict: it exits 0, prints a row per
sample and a verdict for every series, loses no acknowledged task, gets no unexpected
answer, and writes the same in its JSON. One minute cannot show a slow leak (that is what
the 30-minute `make soak` is for). Finished tasks are deleted 6 s after they finished
(`--task-retention-minutes 0.1`), so the database's total size is judged (it must level
off) and tasks are deleted by retention, none lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOAK = [sys.executable, "-m", "bench.soak"]
SERIES = ("rss_mib", "fds", "db_mib", "wal_mib", "db_kib_per_task", "worker_rss_mib")


def test_a_one_minute_soak_reports_every_series_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            *SOAK,
            *("--minutes", "1", "--interval", "5"),
            *("--task-retention-minutes", "0.1", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    report = json.loads(out.read_text())
    samples = report["samples"]
    assert len(samples) >= 12, len(samples)  # one at the start, then one every 5 s
    for series in SERIES:
        assert all(isinstance(s[series], int | float) for s in samples), series
    verdicts = {v["series"]: v for v in report["verdicts"]}
    assert set(verdicts) == set(SERIES)
    judged = {k for k, v in verdicts.items() if v["judged"]}
    assert judged == set(SERIES) - {"db_kib_per_task"}
    assert all(verdicts[k]["levels_off"] for k in judged), verdicts
    for label in ("dispatcher RSS", "dispatcher open fds", "database (file + WAL)", "WAL file"):
        assert label in done.stdout
    assert "verdict: PASS" in done.stdout
    tasks = report["tasks"]
    assert tasks["acknowledged"] > 500 and tasks["lost"] == 0, tasks
    assert tasks["pruned"] > 0 and tasks["found"] + tasks["pruned"] >= tasks["acknowledged"]
    assert report["problems"] == [], report["problems"]
    load = report["load"]
    for what in ("cancels", "log follows", "event readers", "tokens created and revoked"):
        assert load.get(what, 0) > 0, (what, load)
    assert samples[-1]["finished"] > 500
    last = samples[-1]
    print(
        f"\nsoak 1 min: {len(samples)} samples; RSS {samples[1]['rss_mib']:.1f} -> "
        f"{last['rss_mib']:.1f} MiB, fds {samples[1]['fds']} -> {last['fds']}, db "
        f"{last['db_mib']:.2f} MiB (WAL {last['wal_mib']:.2f}), "
        f"{last['db_kib_per_task']:.2f} KiB/task, db levels off: "
        f"{verdicts['db_mib']['note']}; acknowledged {tasks['acknowledged']} / found "
        f"{tasks['found']} / deleted by retention {tasks['pruned']} / lost {tasks['lost']}; "
        f"load {load}"
    )


def test_the_verdict_tells_a_leak_from_a_plateau() -> None:
    """The judging rule on made-up series: growth that slows down levels off, a steady
    leak (even a slow one, 20 MiB/h over a 30-minute run) does not."""
    from bench import soak

    rule = next(r for r in soak.RULES if r.key == "rss_mib")

    def samples(rss: list[float]) -> list[soak.Sample]:
        zero = dict.fromkeys(("fds", "stored", "finished", "queued", "running"), 0)
        floats = dict.fromkeys(
            ("db_mib", "wal_mib", "db_kib_per_task", "worker_rss_mib", "per_second"), 0.0
        )
        return [
            soak.Sample(t=30.0 * i, rss_mib=v, submit_p99_ms=None, **zero, **floats)
            for i, v in enumerate(rss)
        ]

    minutes = [i / 2 for i in range(61)]  # a sample every 30 s for 30 minutes
    plateau = [80 - 10 * 0.8 ** (m * 2) for m in minutes]  # caches filling, then flat
    leak = [70 + m / 3 for m in minutes]  # 20 MiB an hour, for ever
    noisy = [75 + (0.6 if i % 3 else -0.6) for i in range(61)]
    assert soak.judge(samples(plateau), rule, warmup=180).ok
    assert soak.judge(samples(noisy), rule, warmup=180).ok
    verdict = soak.judge(samples(leak), rule, warmup=180)
    assert not verdict.ok, verdict.note
    assert verdict.slope_per_hour is not None and abs(verdict.slope_per_hour - 20) < 0.1
    print(f"\nplateau levels off; a 20 MiB/h leak does not: {verdict.note}")
