"""Controlled runs with real processes (docs/schedule.md): the hypervisor schedules the vCPU
processes, so the same seed gives the same run, and its schedule file runs it again."""

import hashlib
import json
import re
import shlex

import pytest

from hypervisor.core.trace import replay
from hypervisor.server.tracing import open_trace, read_trace
from tests.support.server import start_server
from xensim.launch import run, run_vcpus, server_command, xensim_command
from xensim.shrink import shape

SMALL = ("stress", "--domains", "1", "--vcpus", "2", "--pages", "1024", "--steps", "1500")


def _stress(tmp_path, name: str, *args: str, small: tuple[str, ...] = SMALL) -> tuple[dict, str, int]:
    """A small stress run; its report, the sha256 of its trace, and the trace's step records."""
    trace, report_file = tmp_path / f"{name}.trace", tmp_path / f"{name}.json"
    done = run(xensim_command(*small, *args, "--trace", str(trace), "--json", str(report_file)), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    steps = _step_records(trace)
    trace.unlink()  # tens of MB each
    return json.loads(report_file.read_text()), digest, steps


def _step_records(trace) -> int:
    """How many {"sched": [step, domid, vcpu_id]} records the trace holds."""
    return sum(isinstance(r, dict) and r.keys() == {"sched"} and isinstance(r["sched"], list) for _, r in read_trace(str(trace)))


@pytest.mark.timeout(900)
def test_the_same_pct_seed_gives_the_same_run_three_times_and_its_schedule_replays_it(tmp_path):
    runs = [_stress(tmp_path, f"pct{i}", "--schedule", "pct:11", "--schedule-file", str(tmp_path / f"pct{i}.schedule.json")) for i in range(3)]
    (first, trace, steps), *others = runs
    assert first["schedule"] == "pct:11:3" and first["seed"] == 11 and first["lost_determinism"] == []
    assert first["process_lifecycles"] > 0 and first["steps"] == steps >= 1500
    assert first["final_state_digest"] and all((r["final_state_digest"], t) == (first["final_state_digest"], trace) for r, t, _ in others)
    replayed, replay_trace, _ = _stress(tmp_path, "replay", "--schedule", f"replay:{tmp_path / 'pct0.schedule.json'}", "--schedule-file", str(tmp_path / "again.json"))
    assert (replayed["seed"], replayed["final_state_digest"], replay_trace) == (11, first["final_state_digest"], trace)
    assert replayed["lost_determinism"] == []
    other, other_trace, _ = _stress(tmp_path, "random", "--schedule", "random:11")
    assert other_trace != trace and other["lost_determinism"] == []


@pytest.mark.timeout(600)
def test_two_domains_ballooning_give_the_same_run_three_times(tmp_path):
    """Four vCPU processes of two domains, giving pages back to Xen (memory_op) between
    lifecycles, on FIFO event channels: the same seed is the same trace and digest each time."""
    two = ("stress", "--domains", "2", "--vcpus", "2", "--pages", "1024", "--steps", "1500", "--balloon", "8")
    runs = [_stress(tmp_path, f"two{i}", "--schedule", "pct:5", "--schedule-file", str(tmp_path / f"two{i}.schedule.json"), small=two) for i in range(3)]
    (first, trace, steps), *others = runs
    assert first["lost_determinism"] == [] and first["process_lifecycles"] > 0 and first["totals"]["ballooned_out"] > 0 and first["steps"] == steps
    assert first["final_state_digest"] and all((r["final_state_digest"], t, r["lost_determinism"]) == (first["final_state_digest"], trace, []) for r, t, _ in others)


@pytest.mark.timeout(600)
def test_kills_are_the_schedules_so_a_seed_with_kills_gives_the_same_run_and_its_file_replays_it(tmp_path):
    """--kill-vcpus in a controlled run (docs/schedule.md section 10): a step kills the chosen
    vCPU's process instead of running its message, and the gate waits for the restarted one, so
    the same seed kills at the same steps and gives the same trace and digest; the schedule file
    holds the kills and its replay repeats them."""
    kills = ("--schedule", "pct:3", "--kill-vcpus", "7")
    runs = [_stress(tmp_path, f"kill{i}", *kills, "--schedule-file", str(tmp_path / f"kill{i}.schedule.json")) for i in range(2)]
    (first, trace, steps), (second, second_trace, _) = runs
    assert first["killed_vcpus"] == first["restarted_vcpus"] == len(first["kill_steps"]) >= 1 and first["lost_determinism"] == []
    assert first["process_lifecycles"] > 0 and first["steps"] == steps
    assert (second["kill_steps"], second["final_state_digest"], second_trace) == (first["kill_steps"], first["final_state_digest"], trace)
    assert json.loads((tmp_path / "kill0.schedule.json").read_text())["kills"] == first["kill_steps"]
    replayed, replay_trace, _ = _stress(tmp_path, "replay", "--schedule", f"replay:{tmp_path / 'kill0.schedule.json'}", "--schedule-file", str(tmp_path / "again.json"))
    assert (replayed["kill_steps"], replayed["killed_vcpus"], replayed["final_state_digest"], replay_trace) == (first["kill_steps"], first["killed_vcpus"], first["final_state_digest"], trace)
    assert replayed["lost_determinism"] == []


@pytest.mark.timeout(300)
def test_a_controlled_trace_replays_with_its_step_records(tmp_path):
    trace, report_file = tmp_path / "t.trace.gz", tmp_path / "r.json"
    done = run(xensim_command(*SMALL[:-1], "300", "--schedule", "random:3", "--trace", str(trace), "--json", str(report_file)), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    with open_trace(str(trace)) as lines:
        replayed, _ = replay(lines)
    assert replayed.ok and replayed.digest_matched
    assert json.loads(report_file.read_text())["final_state_digest"]


@pytest.mark.timeout(300)
def test_free_stays_free(tmp_path):
    """The default: no gate, no step records, wall-clock time, and the report says so."""
    trace, report_file = tmp_path / "free.trace", tmp_path / "free.json"
    done = run(xensim_command(*SMALL[:-2], "--seconds", "2", "--trace", str(trace), "--json", str(report_file)), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert (report["schedule"], report["seed"]) == ("free", 1) and "steps" not in report and report["final_state_digest"]
    assert _step_records(trace) == 0


@pytest.mark.timeout(120)
def test_a_silent_vcpu_is_set_aside_and_the_run_marked_not_hung(tmp_path):
    """dom2's vCPU 0 never gets a process: the gate waits for it --schedule-silence, sets it
    aside, records where determinism was lost, and dom1's run goes on to its end."""
    record = tmp_path / "s.json"
    with start_server("--schedule", "pct:5", "--schedule-file", str(record), "--schedule-silence", "1") as server:
        dom1 = server.create_domain(nr_pages=1024, nr_vcpus=1)
        server.create_domain(nr_pages=1024, nr_vcpus=1)
        done = run_vcpus(server.address, dom1.token, 1, "--controlled", "--lifecycles", "3", "--seconds", "60", timeout=90)
        assert done.lifecycles == 3 and not done.bugs
    lost = json.loads(record.read_text())["lost_determinism"]
    assert any([2, 0] in entry["vcpus"] and "sent nothing for 1 s" in entry["why"] for entry in lost), lost
    assert "determinism lost" in server.stderr()


def test_a_bad_schedule_is_one_line_and_status_2(tmp_path):
    killed = tmp_path / "killed.json"
    killed.write_text(json.dumps({"xensim_schedule": 1, "schedule": "pct:1:3", "seed": 1, "steps": [[1, 0]], "kill_vcpus": 7, "kills": [1]}))
    for args, says in (
        (("--schedule", "pct:x"), "expected free, random:SEED, pct:SEED[:DEPTH] or replay:FILE"),
        (("--schedule", f"replay:{tmp_path / 'none.json'}"), "cannot read the schedule file"),
        (("--steps", "10"), "--steps counts the steps of a controlled run"),
        (("--schedule", f"replay:{killed}", "--kill-vcpus", "3"), "was recorded with a kill rate of 7: give that, or leave --kill-vcpus out"),
    ):
        done = run(xensim_command("stress", *args), timeout=60)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_serve_refuses_kills_outside_a_controlled_run_and_another_rate_than_the_replays(tmp_path):
    killed = tmp_path / "killed.json"
    killed.write_text(json.dumps({"xensim_schedule": 1, "schedule": "pct:1:3", "seed": 1, "steps": [[1, 0]], "kill_vcpus": 7, "kills": [1]}))
    for args, says in (
        (("--schedule-kills", "1"), "--schedule-kills is a rate, 0 or more, of a controlled run"),
        (("--schedule", "pct:1", "--schedule-kills", "-1"), "--schedule-kills is a rate, 0 or more"),
        (("--schedule", f"replay:{killed}", "--schedule-kills", "3"), "was recorded with a kill rate of 7: give that, or leave --schedule-kills out"),
    ):
        done = run(server_command("--insecure-no-admin-token", *args), timeout=60)
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.timeout(600)
def test_hunt_finds_the_stale_cr3_race_of_mask_and_its_command_fails_the_same_way(tmp_path):
    result_file = tmp_path / "hunt.json"
    kept = tmp_path / "found.schedule.json"
    done = run(xensim_command("hunt", "--variant", "mask", "--seed", "1", "--runs", "5", "--shrink-seconds", "0", "--json", str(result_file), "--schedule-file", str(kept)), timeout=500)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(result_file.read_text())
    assert result["found"] and result["runs"] <= 5 and "stale-cr3 window" in result["failure"]["message"] and result["failure"]["vcpus"]
    assert result["schedule_file"] == str(kept) and json.loads(kept.read_text())["steps"]
    assert result["reproduce"].startswith("xensim demo ") and f"--schedule pct:{result['seed']}:3" in result["reproduce"] and result["reproduce"] in done.stdout
    again, report_file = shlex.split(result["reproduce"])[1:], tmp_path / "again.json"
    redone = run(xensim_command(*again, "--no-trace", "--schedule-file", str(tmp_path / "again.schedule.json"), "--json", str(report_file)), timeout=240)
    assert redone.returncode == 1, redone.stdout + redone.stderr
    report = json.loads(report_file.read_text())
    assert report["kernel_bugs"] == [result["failure"]["message"]] and report["lost_determinism"] == []


@pytest.mark.timeout(600)
def test_hunt_finds_nothing_in_modern(tmp_path):
    result_file = tmp_path / "hunt.json"
    done = run(xensim_command("hunt", "--variant", "modern", "--runs", "2", "--json", str(result_file), "--schedule-file", str(tmp_path / "none.json")), timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(result_file.read_text())
    assert not result["found"] and result["runs"] == 2 and result["reproduce"] is None and "nothing found in 2 runs" in done.stdout
    assert not (tmp_path / "none.json").exists()


@pytest.mark.timeout(600)
def test_hunt_explains_its_failure_and_shrinks_its_schedule_to_one_that_fails_the_same_way(tmp_path):
    result_file, kept = tmp_path / "hunt.json", tmp_path / "found.schedule.json"
    done = run(xensim_command("hunt", "--variant", "mask", "--seed", "1", "--runs", "5", "--shrink-seconds", "20", "--json", str(result_file), "--schedule-file", str(kept)), timeout=500)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(result_file.read_text())
    frame = re.search(r"but mfn (0x[0-9a-f]+) has type", result["failure"]["message"]).group(1)  # the frame the BUG's mmu_update could not retype
    assert result["same_failure"] and result["trace"] == str(tmp_path / "found.trace") and result["explained"]
    explained = result["explained"][0]
    assert frame in {f["frame"]["mfn"] for f in explained["frames"]} and f"mfn {frame} (dom1" in done.stdout and explained["timeline"] in done.stdout
    assert len(explained["vcpus"]) == 2 and 0 < result["failing_step"] <= result["shrink"]["steps"]
    shrunk, original = result["shrink"]["shrunk"], result["shrink"]
    assert shrunk["steps"] <= original["steps"] and shrunk["preemptions"] <= original["preemptions"] and (shrunk["steps"], shrunk["preemptions"]) != (original["steps"], original["preemptions"])
    assert shrunk["reproduce"] in done.stdout and f"replay:{shrunk['schedule_file']}" in shrunk["reproduce"]
    again, report_file = shlex.split(shrunk["reproduce"])[1:], tmp_path / "again.json"
    redone = run(xensim_command(*again, "--no-trace", "--schedule-file", str(tmp_path / "again.schedule.json"), "--json", str(report_file)), timeout=240)
    assert redone.returncode == 1, redone.stdout + redone.stderr
    report = json.loads(report_file.read_text())
    assert report["kernel_bugs"] and shape(report["kernel_bugs"][0]) == shape(result["failure"]["message"])
    assert all(lost["step"] >= shrunk["steps"] for lost in report["lost_determinism"])  # it ran the shrunk steps as written
