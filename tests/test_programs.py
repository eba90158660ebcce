"""The user-facing programs as a user runs them: real processes, real servers, exit statuses."""

import json
import signal
import subprocess
import time

import pytest

from hypervisor.core.trace import replay
from hypervisor.server.tracing import open_trace
from tests.support.processes import alive, children
from xensim.launch import run, started, xensim_command

REPORT_KEYS = ("process_lifecycles", "audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames")


def xensim(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return run(xensim_command(*args), timeout=timeout)


@pytest.mark.timeout(180)
def test_demo_runs_reports_clean_and_its_trace_replays(tmp_path):
    report_file, trace = tmp_path / "demo.json", tmp_path / "demo.trace.gz"
    done = xensim("demo", "--seconds", "5", "--json", str(report_file), "--trace", str(trace), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert all(isinstance(report[k], int) for k in REPORT_KEYS)
    assert report["process_lifecycles"] > 0
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0]
    assert "audit findings" in done.stdout and str(trace) in done.stdout
    assert (report["seed"], report["variant"], report["trace"]) == (1, "modern", str(trace))
    assert report["reproduce"] == "xensim demo --seconds 5 --vcpus 4 --pages 16384 --variant modern --seed 1 --evtchn fifo" and report["reproduce"] in done.stdout
    assert report["evtchn"] == "fifo" and {r["evtchn"] for r in report["vcpu_reports"]} == {"fifo"}
    with open_trace(str(trace)) as stream:
        header, size = json.loads(stream.readline()), len(stream.read())
    with open_trace(str(trace)) as stream:
        replayed, _ = replay(stream)
    assert replayed.ok and replayed.digest_matched and replayed.calls > 1000
    # Format 3: pages written are stored as bytes and reads as a checksum, not 2,200 bytes of JSON and hex a call.
    assert header["xensim_trace"] == 3 and size / replayed.calls < 1100, size / replayed.calls


@pytest.mark.timeout(240)
def test_stress_with_killed_vcpus_finishes_clean(tmp_path):
    """With ballooning too: pages given back and taken again while vCPUs are killed; every
    frame is accounted for at the end (free + owned = machine)."""
    report_file = tmp_path / "stress.json"
    done = xensim("stress", "--domains", "2", "--vcpus", "4", "--seconds", "10", "--kill-vcpus", "0.15", "--balloon", "4", "--json", str(report_file), timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0] and report["kernel_bugs"] == []
    assert report["unaccounted_frames"] == 0 and report["totals"]["ballooned_out"] > 0
    assert report["killed_vcpus"] > 0 and 0 < report["restarted_vcpus"] <= report["killed_vcpus"]  # a kill may land after a report
    assert report["unfinished_vcpus"] == 0 and report["process_lifecycles"] > 0


@pytest.mark.timeout(180)
def test_demo_with_the_balloon_runs_clean_and_its_trace_replays(tmp_path):
    """xensim demo --balloon: memory_op under load, every reused page checked, every frame
    accounted for, and the trace (with its preempted memory_ops) replays to the same state."""
    report_file, trace = tmp_path / "demo.json", tmp_path / "balloon.trace.gz"
    done = xensim("demo", "--balloon", "--seconds", "5", "--json", str(report_file), "--trace", str(trace), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0] and report["unaccounted_frames"] == 0
    assert report["totals"]["ballooned_out"] > 0 and report["totals"]["ballooned_in"] > 0
    assert "ballooned out" in done.stdout and "--balloon 16" in report["reproduce"]
    with open_trace(str(trace)) as lines:
        replayed, _ = replay(lines)
    assert replayed.ok and replayed.digest_matched


@pytest.mark.timeout(300)
def test_race_table_shape_with_each_event_channel_abi(tmp_path):
    """The race table hunts: of 2 pct seeds per variant, none and mask fail (mask only through
    the stale-cr3 window), current-cr3 and modern never, with FIFO and with 2-level event
    channels side by side; each failing row names the steps to its failure and the command
    that reproduces one failing seed."""
    report_file = tmp_path / "race.json"
    done = xensim("demo", "--race", "--runs", "2", "--evtchn", "both", "--no-trace", "--json", str(report_file), timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    race = json.loads(report_file.read_text())["race"]
    for abi in ("fifo", "2l"):
        row = {variant: race[f"{variant}/{abi}"] for variant in ("none", "mask", "current-cr3", "modern")}
        assert all(r["seeds"] == 2 and r["evtchn"] == abi and r["strategy"] == "pct" for r in row.values())
        for variant in ("none", "mask"):
            assert row[variant]["failed"] > 0 and 0 < row[variant]["median_steps_to_failure"] < 3000 and row[variant]["median_seconds_to_failure"] > 0
            seed = row[variant]["failing_seed"]
            assert row[variant]["reproduce"].endswith(f"--variant {variant} --migrate 1{' --evtchn 2l' if abi == '2l' else ''} --schedule pct:{seed}:3 --steps 3000")
            assert row[variant]["reproduce"] in done.stdout
        assert row["mask"]["stale_cr3_failures"] == row["mask"]["failed"]
        assert row["current-cr3"]["failed"] == 0 and row["modern"]["failed"] == 0 and row["modern"]["reproduce"] is None
    assert "the lazy-TLB unpin race hunted" in done.stdout


@pytest.mark.timeout(300)
def test_demo_with_both_event_channel_abis_side_by_side(tmp_path):
    report_file = tmp_path / "demo.json"
    done = xensim("demo", "--seconds", "4", "--vcpus", "2", "--evtchn", "both", "--no-trace", "--json", str(report_file), timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    reports = json.loads(report_file.read_text())["by_evtchn"]
    assert set(reports) == {"fifo", "2l"}
    for abi, report in reports.items():
        assert report["evtchn"] == abi and {r["evtchn"] for r in report["vcpu_reports"]} == {abi}
        assert report["process_lifecycles"] > 0 and [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0]
    assert "by event-channel ABI" in done.stdout


@pytest.mark.timeout(240)
@pytest.mark.parametrize("program", ["demo", "stress"])
def test_ctrl_c_stops_a_run_with_its_partial_report_exit_130_and_no_process_left(tmp_path, program):
    """SIGINT (what Ctrl-C sends the terminal's foreground process) mid-run: the vCPU processes
    and the hypervisor are stopped, the domains still audited and destroyed, the partial
    report written, and the trace replays clean."""
    report_file, trace = tmp_path / "report.json", tmp_path / "trace.gz"
    command = xensim_command(program, "--vcpus", "2", "--seconds", "120", "--json", str(report_file), "--trace", str(trace))
    if program == "stress":
        command += ["--domains", "1"]
    with started(command) as running:
        deadline = time.monotonic() + 120
        while len(spawned := children(running.pid)) < 3 and time.monotonic() < deadline:  # the hypervisor and 2 vCPUs
            time.sleep(0.2)
        assert len(spawned) == 3, running.log()
        time.sleep(3)  # some work to report
        running.process.send_signal(signal.SIGINT)
        out = running.finish(120)
    err = running.log()
    assert running.process.returncode == 130, out + err
    assert "Traceback" not in err and not [pid for pid in spawned if alive(pid)]
    report = json.loads(report_file.read_text())
    assert report["interrupted"] and report["process_lifecycles"] > 0 and report["audit_findings"] == 0 and report["leaked_frames"] == 0
    if program == "demo":
        assert "INTERRUPTED" in out and str(trace) in out and report["trace"] == str(trace)
    replayed = xensim("replay", str(trace), timeout=120)
    assert replayed.returncode == 0 and " 0 mismatches" in replayed.stdout, replayed.stdout + replayed.stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant, saw", [("mask", "-EBUSY from mmu_update"), ("modern", "exit_mmap unpinned and freed the page tables")])
def test_a_scenario_tells_what_happens_and_why(variant, saw):
    done = xensim("demo", "--scenario", "stale-cr3", "--variant", variant, "--no-trace", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    told = " ".join(done.stdout.split())
    assert "What happens: vCPU 1 runs T" in told and saw in told and "Why: " in told
    assert "audit after destroying the domain: 0 findings" in told and "verdict: as expected for this variant" in told
