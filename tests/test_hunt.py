"""`xensim hunt --workers` and its progress (docs/schedule.md sections 11 and 12): many runs at
once, and still the failing seed a hunt of one worker finds."""

import io
import json
import re

import pytest
import trio

from xensim.hunt import Hunt, Progress, Run
from xensim.launch import run, xensim_command


def _report(failed: bool) -> dict:
    return {"audit_findings": 0, "data_corruptions": 0, "leaked_frames": 0, "unexpected_errors": 0, "unfinished_vcpus": 0, "kernel_bugs": ["BUG"] if failed else [], "interrupted": False}


@pytest.mark.parametrize("workers", [1, 2, 3, 6])
def test_the_seed_found_is_the_lowest_failing_one_whichever_run_ends_first(monkeypatch, tmp_path, workers):
    """Seeds 13 and 15 fail; the later a seed, the sooner its run ends, so with more than one
    worker 15 (or 14) ends before 13. The hunt still reports 13, as one worker would: the runs of
    seeds below a failing one finish, no seed above it starts, and those running stop."""
    started = []

    async def fake_run(self, seed, schedule_file, interrupt=None):
        started.append(seed)
        await trio.sleep(0.05 * (20 - seed))
        return Run(_report(seed in (13, 15)), 100 + seed, 0.05 * (20 - seed))

    monkeypatch.setattr(Hunt, "run_async", fake_run)
    found = Hunt("mask").search(10, 8, 60.0, str(tmp_path), workers)
    assert found.failing[0] == 13 and not found.interrupted
    assert {seed for seed, _, _ in found.runs} >= {10, 11, 12, 13} and started[: workers] == list(range(10, 10 + workers))
    if workers > 3:
        assert found.runs[0][0] > 13  # a later seed ended first, and did not decide the result


def test_a_tty_gets_one_status_line_rewritten_in_place():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = Progress(5, out)
    progress.run_done(1, "", Run(_report(False), 3000, 2.0))
    progress.run_done(2, "", Run(_report(True), 131, 1.0))
    progress.end()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.endswith("\n") and "run 2/5 seed 2: FAILED (131 steps" in text
    status = text.rsplit("\r\x1b[K", 1)[1]
    assert status.startswith("2/5 runs, ") and "steps/s, longest run 3,000 steps, fewest steps to a failure 131;" in status


@pytest.mark.timeout(300)
def test_hunt_with_workers_prints_a_line_per_run_when_not_on_a_terminal(tmp_path):
    result_file = tmp_path / "hunt.json"
    done = run(xensim_command("hunt", "--variant", "modern", "--runs", "3", "--workers", "2", "--steps", "300", "--json", str(result_file)), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("run ")]
    assert "\r" not in done.stdout and len(lines) == 3 and all(re.fullmatch(r"run [123]/3 seed [123]: ok \(\d+ steps, [\d,]+ steps/s; \d+ s so far\)", line) for line in lines), done.stdout
    assert sorted(int(line.split()[3].rstrip(":")) for line in lines) == [1, 2, 3]
    result = json.loads(result_file.read_text())
    assert (result["found"], result["runs"], result["workers"]) == (False, 3, 2) and result["steps"] >= 900


@pytest.mark.parametrize("workers, says", [("0", "too small: at least 1"), ("x", "not an integer"), ("65", "too large: at most 64")])
def test_a_bad_workers_is_one_line_and_status_2(workers, says):
    done = run(xensim_command("hunt", "--variant", "mask", "--workers", workers), timeout=60)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
