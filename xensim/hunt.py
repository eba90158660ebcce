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
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    parser.add_argument("--address-size", type=int, choices=(64, 32), default=64, help="the guest's: 64 (x86-64) or 32 (PAE on the compat ABI)")
    parser.add_argument("--json", metavar="FILE", type=writable_file, help="write the result as JSON")
    parser.add_argument("--schedule-file", metavar="FILE", type=writable_file, help="where the failing run's schedule goes (default: hunt-VARIANT-SCHEDULE.schedule.json here)")
    parser.add_argument("--shrink-seconds", type=at_least(0.0, float), default=30.0, metavar="S", help="search S seconds for a shorter failing schedule (0: do not; docs/schedule.md section 9)")
    parser.epilog = variant_help()
    parser.set_defaults(run=main)


@dataclass(frozen=True)
class Hunt:
    """What every seeded run of a hunt is (the guest, the policy, the length), so that the hunt,
    the demo's race table and the `hunt` benchmark run and reproduce the same runs."""

    variant: str
    strategy: str = "pct"
    depth: int = DEFAULT_DEPTH
    steps: int = STEPS
    vcpus: int = VCPUS
    evtchn: str = "fifo"
    address_size: int = 64

    def schedule(self, seed: int) -> str:
        return f"pct:{seed}:{self.depth}" if self.strategy == "pct" else f"random:{seed}"

    def reproduce(self, seed: int) -> str:
        """The demo command that runs this hunt's run of `seed` again."""
        words = ["xensim", "demo", "--vcpus", str(self.vcpus), "--pages", str(MIN_PAGES), "--variant", self.variant, "--migrate", f"{MIGRATE:g}"]
        words += [] if self.evtchn == "fifo" else ["--evtchn", self.evtchn]
        words += [] if self.address_size == 64 else ["--address-size", str(self.address_size)]
        return shlex.join(words + ["--schedule", self.schedule(seed), "--steps", str(self.steps)])

    def run(self, seed: int, schedule_file: str, schedule: str | None = None, steps: int | None = None, trace: str | None = None, wall_seconds: float = math.inf) -> "Run":
        """One controlled run of `seed` on a fresh hypervisor under `schedule` (default: the
        seed's) for `steps` (default: the hunt's), its schedule written to `schedule_file` and
        its calls traced to `trace` if given. A kernel BUG stops every vCPU, so a failing run's
        steps and seconds are those to its failure. The report is None for a run stopped after
        `wall_seconds` (a replay that could not follow its file may never finish: xensim.shrink)."""
        steps = steps or self.steps
        config = StressConfig(
            1, self.vcpus, steps * STEP_QUANTUM_NS / 1e9, seed, [self.variant], pages=MIN_PAGES, migrate=MIGRATE, evtchn=self.evtchn, controlled=True, address_sizes=[self.address_size]
        )
        server_args = ("--schedule", schedule or self.schedule(seed), "--schedule-file", schedule_file, "--schedule-steps", str(steps)) + (("--trace", trace) if trace else ())

        async def bounded() -> dict | None:
            with trio.move_on_after(wall_seconds):
                return await run_stress(server.address, None, config)
            return None

        started = time.monotonic()
        with hypervisor_server(*server_args, frames=machine_frames(1, MIN_PAGES)) as server:
            report = trio.run(bounded)
        return Run(report, len(_record(schedule_file).get("steps", ())), time.monotonic() - started)

    def search(self, first_seed: int, runs: int, budget_seconds: float, directory: str) -> Iterator[tuple[int, str, "Run"]]:
        """The hunt: (seed, its schedule file in `directory`, its run) for seeds from
        `first_seed`, until a run fails or is interrupted, `runs` are done, or no run may start
        within `budget_seconds`."""
        started = time.monotonic()
        for seed in range(first_seed, first_seed + runs):
            if time.monotonic() - started > budget_seconds:
                return
            schedule_file = os.path.join(directory, f"{seed}.json")
            run = self.run(seed, schedule_file)
            yield seed, schedule_file, run
            if run.failed or run.report["interrupted"]:
                return


@dataclass(frozen=True)
class Run:
    """One seeded run: the stress report, the steps the hypervisor scheduled, its wall seconds
    (hypervisor start to stop)."""

    report: dict | None
    steps: int
    seconds: float

    @property
    def failed(self) -> bool:
        return self.report is not None and failed(self.report)


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
    hunt = Hunt(args.variant, args.strategy, args.depth, args.steps, args.vcpus, address_size=args.address_size)
    started = time.monotonic()
    result: dict = {"found": False, "variant": args.variant, "strategy": args.strategy, "seed": None, "runs": 0, "seconds": 0.0, "failure": None, "reproduce": None}
    steps_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed, schedule_file, run in hunt.search(args.seed, args.runs, args.budget_seconds, tmp):
            result["runs"] += 1
            steps_total += run.steps
            elapsed = time.monotonic() - started
            verdict = "FAILED" if run.failed else "ok"
            print(f"run {result['runs']}/{args.runs} seed {seed}: {verdict} ({run.steps} steps, {run.steps / max(run.seconds, 1e-9):,.0f} steps/s; {elapsed:.0f} s so far)", flush=True)
            if run.report["interrupted"]:
                result["seconds"] = elapsed
                print("interrupted")
                return EXIT_INTERRUPTED
            if run.failed:
                kept = os.path.abspath(args.schedule_file or f"hunt-{args.variant}-{hunt.schedule(seed).replace(':', '-')}.schedule.json")
                shutil.copyfile(schedule_file, kept)
                result |= {"found": True, "seed": seed, "failure": failure(run.report), "reproduce": hunt.reproduce(seed), "schedule_file": kept}
                from xensim.shrink import explain_and_shrink

                result |= explain_and_shrink(args, hunt, seed, run.report, _record(schedule_file), tmp, kept)
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
