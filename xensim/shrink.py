"""What `xensim hunt` does with the failure it found: explain it, and shrink its schedule
(docs/schedule.md section 9).

A hunt's runs are untraced, for speed. A controlled run is deterministic, so the failing seed
runs once more with a trace; if it does not fail the same way with the same steps, the run has
lost determinism and the report says so. `explain_run` then says from that trace what held
the frames of the failing call and which vCPUs were involved.

Shrinking, like hypothesis's, is a greedy search bounded in time: from the failing schedule
(cut after the step of the failing call), each candidate removes steps or preemptions (a
preemption is a step of another vCPU than the step before), and the first candidate whose
replay, on a fresh hypervisor with fresh vCPU processes, fails the same way becomes the
schedule to shrink further. A replay that cannot follow its file (the recorded vCPU has no
message waiting: hypervisor/core/policy.py, ReplayPolicy) runs the first vCPU ready and is
marked as having lost determinism (docs/schedule.md section 5); a candidate counts only if that
happened nowhere before its last step, so the shrunk file, replayed, runs its steps exactly and
fails at or before its last one.
"""

import argparse
import itertools
import json
import math
import os
import re
import shlex
import time
from collections.abc import Iterator

from hypervisor.server.tracing import read_trace
from xensim.explain import explain_run
from xensim.hunt import Hunt, failure
from xensim.stress import failed

WALL_FACTOR, WALL_FLOOR_S = 2, 2.0  # a candidate's replay may take this many times the first one's wall time, and at least this long
Steps = list[list[int]]  # [[domid, vcpu_id], ...], as the schedule file has them


def controlled_run(hunt: Hunt, seed: int, schedule: str, schedule_file: str, steps: int, trace: str | None = None, wall_seconds: float = math.inf) -> tuple[dict | None, dict]:
    """One hunt run (Hunt.run) of `steps` steps under `schedule`: the stress report (None when
    it took longer than `wall_seconds`), and the schedule file the server wrote."""
    run = hunt.run(seed, schedule_file, schedule, steps, trace, wall_seconds)
    with open(schedule_file) as f:
        return run.report, json.load(f)


def shape(message: str) -> str:
    """A failure's message with its numbers (addresses, mfns, entries, vCPUs) blanked: two runs
    fail the same way when their shapes are equal."""
    return re.sub(r"0x[0-9a-f]+|\d+", "#", message)


def same_way(report: dict | None) -> str:
    """The shape of the run's failure ("" for a run that did not fail or did not finish)."""
    return shape(failure(report)["message"]) if report and failed(report) else ""


def preemptions(steps: Steps) -> int:
    return sum(a != b for a, b in itertools.pairwise(steps))


def step_of_call(trace: str, seq: int) -> int:
    """The step (docs/schedule.md section 5) that made call `seq` of the trace: the last step
    record before it (calls are counted from 1, as explain and the timeline count them)."""
    step = calls = 0
    for _, record in read_trace(trace):
        if isinstance(record, dict) and isinstance(record.get("sched"), list):
            step = record["sched"][0]
        elif isinstance(record, dict) and "op" in record:
            calls += 1
            if calls == seq:
                return step
    return step


def explain_failure(hunt: Hunt, seed: int, found: dict, trace: str, tmp: str) -> dict:
    """Run the failing seed again with a trace: whether it failed the same way in the same
    steps, how long the traced run took, what explain_run says, and the step of the failing
    call (None when the failure is no failed call)."""
    started = time.monotonic()
    report, record = controlled_run(hunt, seed, hunt.schedule(seed), os.path.join(tmp, "traced.json"), hunt.steps, trace)
    seconds = time.monotonic() - started
    explained = explain_run(trace, report) if failed(report) else []
    seqs = [e["data"]["seq"] for e in explained if "seq" in e["data"]]
    return {
        "trace": trace,
        "same_failure": same_way(report) == found["same_way"] and record["steps"] == found["steps"],
        "traced_run_seconds": round(seconds, 2),
        "failing_step": step_of_call(trace, seqs[0]) if seqs else None,
        "explained": [e["data"] for e in explained],
        "text": [e["text"] for e in explained],
    }


def candidates(steps: Steps) -> Iterator[Steps]:
    """Schedules with fewer steps or fewer preemptions and no more of either, fewest
    preemptions then fewest steps first: each run of one vCPU's steps (a block) removed, given
    to the vCPU of the block before (that vCPU runs on instead of being preempted), or cut
    short by a half, a quarter, ... of its steps."""
    blocks = [list(group) for _, group in itertools.groupby(steps)]
    found = []
    for j, block in enumerate(blocks):
        before, after = blocks[:j], blocks[j + 1 :]
        found.append(before + after)
        if j:
            found.append(before + [[blocks[j - 1][0]] * len(block)] + after)
        cut = len(block) // 2
        while cut:
            found.append(before + [block[: len(block) - cut]] + after)
            cut //= 2
    shorter = [[s for b in c for s in b] for c in found]
    best = (preemptions(steps), len(steps))
    yield from sorted((c for c in shorter if c and (preemptions(c), len(c)) < best and len(c) <= len(steps)), key=lambda c: (preemptions(c), len(c)))


def shrink(hunt: Hunt, budget: float, seed: int, record: dict, found: dict, tmp: str, kept: str) -> dict:
    """The shortest schedule found within `budget` seconds that fails as `found` did (its
    `same_way`, its failing step if known), written to `kept`; each candidate a replay on a
    fresh hypervisor with fresh vCPU processes."""
    started = time.monotonic()
    original = record["steps"]
    run_steps = min(hunt.steps, 2 * (found["failing_step"] or len(original)) + 100)  # past the failure, and no longer
    tried, wall_seconds = 0, math.inf

    def fails_the_same(steps: Steps) -> bool:
        nonlocal tried
        tried += 1
        candidate = os.path.join(tmp, f"candidate-{tried}.json")
        with open(candidate, "w") as f:
            json.dump(record | {"steps": steps, "lost_determinism": []}, f)
        left = budget - (time.monotonic() - started)
        report, replayed = controlled_run(hunt, seed, f"replay:{candidate}", os.path.join(tmp, f"replayed-{tried}.json"), run_steps, wall_seconds=min(wall_seconds, left))
        return same_way(report) == found["same_way"] and all(lost["step"] >= len(steps) for lost in replayed["lost_determinism"])

    best = original[: found["failing_step"]] if found["failing_step"] else original
    first = time.monotonic()
    if not fails_the_same(best):
        best = None
    wall_seconds = max(WALL_FLOOR_S, WALL_FACTOR * (time.monotonic() - first))  # a candidate that diverged may not finish (its guest's vCPUs wait on each other): give up on it
    while best is not None and time.monotonic() - started < budget:
        best_next = next((c for c in candidates(best) if time.monotonic() - started < budget and fails_the_same(c)), None)
        if best_next is None:
            break
        best = best_next
    result = {"steps": len(original), "preemptions": preemptions(original), "shrunk": None, "tried": tried, "seconds": round(time.monotonic() - started, 1)}
    if best is not None and (preemptions(best), len(best)) < (preemptions(original), len(original)):
        with open(kept, "w") as f:
            json.dump(record | {"steps": best, "lost_determinism": []}, f)
        command = shlex.split(hunt.reproduce(seed))
        command[command.index("--schedule") + 1 : command.index("--schedule") + 2] = [f"replay:{kept}"]
        command[command.index("--steps") + 1] = str(run_steps)
        result["shrunk"] = {"steps": len(best), "preemptions": preemptions(best), "schedule_file": kept, "reproduce": shlex.join(command)}
    return result


def print_shrunk(shrunk: dict) -> None:
    print(f"  schedule: {shrunk['steps']} steps, {shrunk['preemptions']} preemptions")
    if shrunk["shrunk"] is None:
        print(f"  shrinking found no shorter schedule that fails the same way ({shrunk['tried']} replays, {shrunk['seconds']} s)")
        return
    s = shrunk["shrunk"]
    print(f"  shrunk in {shrunk['seconds']} s ({shrunk['tried']} replays): {s['steps']} steps, {s['preemptions']} preemptions: {s['schedule_file']}")
    print(f"  reproduce the shrunk run: {s['reproduce']}")


def explain_and_shrink(args: argparse.Namespace, hunt: Hunt, seed: int, report: dict, record: dict, tmp: str, kept: str) -> dict:
    """What hunt adds to a failure it found: the traced run's path and explanation (printed),
    and the shrunk schedule (None with --shrink-seconds 0, or when the traced run did not fail
    the same way)."""
    base = re.sub(r"(\.schedule)?\.json$", "", kept)
    found = {"same_way": same_way(report), "steps": record["steps"]}
    traced = explain_failure(hunt, seed, found, base + ".trace", tmp)
    for text in traced.pop("text"):
        print(text, flush=True)
    if not traced["same_failure"]:
        print(f"the traced run of seed {seed} did not fail the same way in the same steps: this run has lost determinism", flush=True)
    found["failing_step"] = traced["failing_step"]
    shrunk = shrink(hunt, args.shrink_seconds, seed, record, found, tmp, base + ".shrunk.schedule.json") if args.shrink_seconds and traced["same_failure"] else None
    return traced | {"shrink": shrunk}
