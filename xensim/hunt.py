"""`xensim hunt`: seeded controlled runs of the lazy-TLB unpin race until the first failure,
and the one command that reproduces it (docs/schedule.md section 8).

Each run is a small `xensim demo` on a fresh hypervisor under `--schedule STRATEGY:SEED`, the
seeds counting up from --seed; the first run that fails (a kernel BUG, an audit finding, a data
corruption, an unexpected errno) stops the hunt. Its seed names the interleaving, so the
printed `xensim demo ... --schedule ...` command runs it again and exits 1 as it fails again.
Exit status 1 when a failure was found, 0 when none was within the runs and the budget.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import tempfile
import time

import trio

from guestlib.kernel.shootdown import VARIANTS
from hypervisor.core.policy import DEFAULT_DEPTH, STEP_QUANTUM_NS
from xensim.errors import EXIT_INTERRUPTED, at_least, writable_file
from xensim.launch import hypervisor_server, machine_frames
from xensim.stress import MIN_PAGES, StressConfig, failed, run_stress, variant_help

VCPUS = 2  # the race needs two: one that exits the mm, one still on its pgd
STEPS = 3000  # a run: 0.3 s of Xen system time, some 180 process lifecycles on two vCPUs
MIGRATE = 1.0  # every child finishes on the other vCPU: each lifecycle opens the race's window


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=VARIANTS, required=True, metavar="VARIANT", help="the guest's drop_mm_ref (the variants are below)")
    parser.add_argument("--strategy", choices=("random", "pct"), default="pct", help="the schedule's policy (docs/schedule.md section 3)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; run i has seed + i")
    parser.add_argument("--depth", type=at_least(1), default=DEFAULT_DEPTH, help="PCT's depth (with --strategy pct)")
    parser.add_argument("--runs", type=at_least(1), default=20, help="at most this many runs")
    parser.add_argument("--budget-seconds", type=at_least(1.0, float), default=300.0, metavar="S", help="start no run after S seconds")
    parser.add_argument("--steps", type=at_least(100), default=STEPS, help="steps per run")
    parser.add_argument("--vcpus", type=at_least(2), default=VCPUS, help="the guest's vCPUs, each a process")
    parser.add_argument("--json", metavar="FILE", type=writable_file, help="write the result as JSON")
    parser.add_argument("--schedule-file", metavar="FILE", type=writable_file, help="where the failing run's schedule goes (default: hunt-VARIANT-SCHEDULE.schedule.json here)")
    parser.add_argument("--shrink-seconds", type=at_least(0.0, float), default=30.0, metavar="S", help="search S seconds for a shorter failing schedule (0: do not; docs/schedule.md section 9)")
    parser.epilog = variant_help()
    parser.set_defaults(run=main)


def _schedule(args: argparse.Namespace, seed: int) -> str:
    return f"pct:{seed}:{args.depth}" if args.strategy == "pct" else f"random:{seed}"


def reproduce(args: argparse.Namespace, seed: int) -> str:
    """The demo command that runs this hunt's run of `seed` again."""
    words = ["xensim", "demo", "--vcpus", str(args.vcpus), "--pages", str(MIN_PAGES), "--variant", args.variant, "--migrate", f"{MIGRATE:g}"]
    return shlex.join(words + ["--schedule", _schedule(args, seed), "--steps", str(args.steps)])


def _run(args: argparse.Namespace, seed: int, schedule_file: str) -> dict:
    config = StressConfig(1, args.vcpus, args.steps * STEP_QUANTUM_NS / 1e9, seed, [args.variant], pages=MIN_PAGES, migrate=MIGRATE, controlled=True)
    server_args = ("--schedule", _schedule(args, seed), "--schedule-file", schedule_file, "--schedule-steps", str(args.steps))
    with hypervisor_server(*server_args, frames=machine_frames(1, MIN_PAGES)) as server:
        return trio.run(run_stress, server.address, None, config)


def failure(report: dict) -> dict:
    """What failed, in one message, and the vCPUs it names."""
    message = next(iter(report["kernel_bugs"]), None) or next(iter(report["corruptions"]), None)
    if message is None:
        problems = [f for found in report["findings"].values() for f in found] or [f"{n} x {key}" for key, n in report["hypercall_errors"].items()]
        message = problems[0] if problems else "vCPUs that did not finish"
    vcpus = sorted({int(v) for v in re.findall(r"vCPUs? \[?(\d+)", message)} | {int(v) for group in re.findall(r"vCPUs \[([\d, ]+)\]", message) for v in group.split(",")})
    return {"message": message, "vcpus": vcpus, "hypercall_errors": report["hypercall_errors"]}


def _record(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # the server did not write it: a run that did not start
        return {}


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    result: dict = {"found": False, "variant": args.variant, "strategy": args.strategy, "seed": None, "runs": 0, "seconds": 0.0, "failure": None, "reproduce": None}
    steps_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seed, args.seed + args.runs):
            if time.monotonic() - started > args.budget_seconds:
                break
            schedule_file = os.path.join(tmp, f"{seed}.json")
            run_started = time.monotonic()
            report = _run(args, seed, schedule_file)
            result["runs"] += 1
            steps = len(_record(schedule_file).get("steps", ()))
            steps_total += steps
            elapsed = time.monotonic() - started
            verdict = "FAILED" if failed(report) else "ok"
            print(f"run {result['runs']}/{args.runs} seed {seed}: {verdict} ({steps} steps, {steps / max(time.monotonic() - run_started, 1e-9):,.0f} steps/s; {elapsed:.0f} s so far)", flush=True)
            if report["interrupted"]:
                result["seconds"] = elapsed
                print("interrupted")
                return EXIT_INTERRUPTED
            if failed(report):
                kept = os.path.abspath(args.schedule_file or f"hunt-{args.variant}-{_schedule(args, seed).replace(':', '-')}.schedule.json")
                shutil.copyfile(schedule_file, kept)
                result |= {"found": True, "seed": seed, "failure": failure(report), "reproduce": reproduce(args, seed), "schedule_file": kept}
                from xensim.shrink import explain_and_shrink

                result |= explain_and_shrink(args, seed, _schedule(args, seed), report, _record(schedule_file), tmp, kept)
                break
    result["seconds"] = time.monotonic() - started
    result["steps"] = steps_total
    if result["found"]:
        print(f"found after {result['runs']} runs ({result['seconds']:.1f} s): seed {result['seed']}, vCPUs {result['failure']['vcpus']}")
        print(f"  {result['failure']['message']}")
        print(f"  schedule file: {result['schedule_file']}")
        print(f"  reproduce: {result['reproduce']}")
        if result["shrink"]:
            from xensim.shrink import print_shrunk

            print_shrunk(result["shrink"])
    else:
        print(f"nothing found in {result['runs']} runs ({result['seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return int(result["found"])
