"""The user-facing programs as a user runs them: real processes, real servers, exit statuses."""

import json
import subprocess
import sys

import pytest

from hypervisor.core.trace import replay
from hypervisor.server.tracing import open_trace

REPORT_KEYS = ("process_lifecycles", "audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames")


def xensim(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xensim.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_demo_runs_reports_clean_and_its_trace_replays(tmp_path):
    report_file, trace = tmp_path / "demo.json", tmp_path / "trace.jsonl.gz"
    done = xensim("demo", "--seconds", "5", "--json", str(report_file), "--trace", str(trace), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert all(isinstance(report[k], int) for k in REPORT_KEYS)
    assert report["process_lifecycles"] > 0
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0]
    assert "audit findings" in done.stdout and str(trace) in done.stdout
    with open_trace(str(trace)) as lines:
        replayed, _ = replay(lines)
    assert replayed.ok and replayed.digest_matched and replayed.calls > 1000


@pytest.mark.timeout(240)
def test_stress_with_killed_vcpus_finishes_clean(tmp_path):
    report_file = tmp_path / "stress.json"
    done = xensim("stress", "--domains", "2", "--vcpus", "4", "--seconds", "10", "--kill-vcpus", "0.15", "--json", str(report_file), timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0] and report["kernel_bugs"] == []
    assert report["killed_vcpus"] > 0 and 0 < report["restarted_vcpus"] <= report["killed_vcpus"]  # a kill may land after a report
    assert report["unfinished_vcpus"] == 0 and report["process_lifecycles"] > 0


@pytest.mark.timeout(300)
def test_race_table_shape(tmp_path):
    """none always hits; current-cr3 and modern never do; mask only through the stale-cr3
    window (how often it hits in a short run is luck, so only that is checked)."""
    report_file = tmp_path / "race.json"
    done = xensim("demo", "--race", "--runs", "1", "--seconds", "4", "--no-trace", "--json", str(report_file), timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    race = json.loads(report_file.read_text())["race"]
    assert race["none"]["hit"] == 1 and race["none"]["first_hit_s"] is not None
    assert race["mask"]["stale_cr3_hits"] == race["mask"]["hit"]
    assert race["current-cr3"]["hit"] == 0 and race["modern"]["hit"] == 0
    assert "the lazy-TLB unpin race" in done.stdout
