"""`xensim hunt`: seeded controlled runs of the lazy-TLB unpin race until the first failure,
and the one command that reproduces it (docs/schedule.md section 8).

Each run is a small `xensim demo` on a fresh hypervisor under `--schedule STRATEGY:SEED`, the
seeds counting up from --seed; the first run that fails (a kernel BUG, an audit finding, a data
corruption, an unexpected errno) stops the hunt. Its seed names the interleaving, so the
printed `xensim demo ... --schedule ...` command runs it again and exits 1 as it fails again.
Exit status 1 when a failure was found, 0 when none was within the runs and the budget.
With --workers W, W runs go at once, and the failure reported is still the lowest failing
seed, the one a hunt of one worker reports (docs/schedule.md section 11).
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import trio

from guestlib.kernel.shootdown import VARIANTS
from hypervisor.core.policy import DEFAULT_DEPTH, STEP_QUANTUM_NS
from xensim.errors import EXIT_INTERRUPTED, at_least, writable_file
from xensim.launch import machine_frames, serving
from xensim.stress import MIN_PAGES, StressConfig, failed, run_stress, variant_help

VCPUS = 2  # the race needs two: one that exits the mm, one still on its pgd
STEPS = 3000  # a run: 0.3 s of Xen system time, some 180 process lifecycles on two vCPUs
MIGRATE = 1.0  # every child finishes on the other vCPU: each lifecycle opens the race's window
MAX_WORKERS = 64  # hunt --workers: each is a hypervisor and --vcpus processes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=VARIANTS, required=True, metavar="VARIANT", help="the guest's drop_mm_ref (the variants are below)")
    parser.add_argument("--strategy", choices=("random", "pct"), default="pct", help="the schedule's policy (docs/schedule.md section 3)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; run i has seed + i")
    parser.add_argument("--depth", type=at_least(1), default=DEFAULT_DEPTH, help="PCT's depth (with --strategy pct)")
    parser.add_argument("--runs", type=at_least(1), default=20, help="at most this many runs")
    parser.add_argument("--budget-seconds", type=at_least(1.0, float), default=300.0, metavar="S", help="start no run after S seconds")
    parser.add_argument("--steps", type=at_least(100), default=STEPS, help="steps per run")
    parser.add_argument("--vcpus", type=at_least(2), default=VCPUS, help="the guest's vCPUs, each a process")
    parser.add_argument("--workers", type=at_least(1, high=MAX_WORKERS), default=1, help="runs at once, each its own hypervisor and vCPU processes; the seed found is the one of 1 worker")
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
        return trio.run(self.run_async, seed, schedule_file, schedule, steps, trace, wall_seconds)

    async def run_async(
        self, seed: int, schedule_file: str, schedule: str | None = None, steps: int | None = None, trace: str | None = None, wall_seconds: float = math.inf, interrupt: trio.Event | None = None
    ) -> "Run":
        """`run` inside a trio run, with its own hypervisor and vCPU processes, so that many can
        run at once (`interrupt`: run_stress's, when the caller takes the signals)."""
        steps = steps or self.steps
        config = StressConfig(
            1, self.vcpus, steps * STEP_QUANTUM_NS / 1e9, seed, [self.variant], pages=MIN_PAGES, migrate=MIGRATE, evtchn=self.evtchn, controlled=True, address_sizes=[self.address_size]
        )
        server_args = ("--schedule", schedule or self.schedule(seed), "--schedule-file", schedule_file, "--schedule-steps", str(steps)) + (("--trace", trace) if trace else ())
        started = time.monotonic()
        report = None
        async with serving(*server_args, frames=machine_frames(1, MIN_PAGES)) as address:
            with trio.move_on_after(wall_seconds):
                report = await run_stress(address, None, config, interrupt=interrupt)
        return Run(report, len(_record(schedule_file).get("steps", ())), time.monotonic() - started)

    def search(self, first_seed: int, runs: int, budget_seconds: float, directory: str, workers: int = 1, on_run: Callable | None = None) -> "Search":
        """The hunt: runs of the seeds from `first_seed` (each with its schedule file in
        `directory`), `workers` at once, handed out in order, until `runs` are done, no run may
        start within `budget_seconds`, the hunt is interrupted, or a run fails: then no later
        seed starts and those running are stopped, but the earlier ones still running finish,
        so that the failure found is the lowest failing seed, the one a hunt of one worker finds
        (docs/schedule.md section 11). `on_run(seed, schedule_file, run)` as each run ends."""
        return trio.run(self._search, first_seed, runs, budget_seconds, directory, workers, on_run or (lambda *_: None))

    async def _search(self, first_seed: int, runs: int, budget_seconds: float, directory: str, workers: int, on_run: Callable) -> "Search":
        started = time.monotonic()
        seeds = iter(range(first_seed, first_seed + runs))  # shared: each worker takes the next
        found = Search([], False)
        running: dict[int, trio.CancelScope] = {}
        interrupt = trio.Event()

        async def worker() -> None:
            for seed in seeds:
                if seed > found.lowest_failing or interrupt.is_set() or time.monotonic() - started > budget_seconds:
                    return
                schedule_file = os.path.join(directory, f"{seed}.json")
                scope = running[seed] = trio.CancelScope()
                with scope:
                    try:
                        run = await self.run_async(seed, schedule_file, interrupt=interrupt)
                    finally:
                        del running[seed]
                if scope.cancelled_caught:  # stopped: a lower seed failed
                    continue
                found.runs.append((seed, schedule_file, run))
                on_run(seed, schedule_file, run)
                if run.failed and seed == found.lowest_failing:
                    for later, other in running.items():
                        if later > seed:
                            other.cancel()

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as ctrl_c:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_interrupt_on, ctrl_c, interrupt, found, nursery.cancel_scope)
                async with trio.open_nursery() as hunters:
                    for _ in range(workers):
                        hunters.start_soon(worker)
                nursery.cancel_scope.cancel()
        return found


async def _interrupt_on(ctrl_c, interrupt: trio.Event, found: "Search", everything: trio.CancelScope) -> None:
    """The first Ctrl-C (or SIGTERM) interrupts the runs (each still audits its domain and
    reports: run_stress) and starts no more; a second stops everything at once."""
    await anext(ctrl_c)
    found.interrupted = True
    interrupt.set()
    await anext(ctrl_c)
    everything.cancel()


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


@dataclass
class Search:
    """A hunt's runs, in the order they ended, and whether it was interrupted."""

    runs: list[tuple[int, str, Run]]
    interrupted: bool

    @property
    def lowest_failing(self) -> float:
        """The lowest seed whose run failed (inf: none did)."""
        return min((seed for seed, _, run in self.runs if run.failed), default=math.inf)

    @property
    def failing(self) -> tuple[int, str, Run] | None:
        """The hunt's failure: the run of the lowest failing seed."""
        return next((found for found in self.runs if found[0] == self.lowest_failing), None)


def failure(report: dict) -> dict:
    """What failed, in one message, and the vCPUs it names."""
    message = next(iter(report["kernel_bugs"]), None) or next(iter(report["corruptions"]), None)
    if message is None:
        problems = [f for found in report["findings"].values() for f in found] or [f"{n} x {key}" for key, n in report["hypercall_errors"].items()]
        leaked = [f"dom{d}: {n} mms still live after every vCPU finished" for d, n in report.get("leaked_mms", {}).items() if n]
        message = problems[0] if problems else leaked[0] if leaked else "vCPUs that did not finish"
    vcpus = sorted({int(v) for v in re.findall(r"vCPUs? \[?(\d+)", message)} | {int(v) for group in re.findall(r"vCPUs \[([\d, ]+)\]", message) for v in group.split(",")})
    return {"message": message, "vcpus": vcpus, "hypercall_errors": report["hypercall_errors"]}


def _record(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # the server did not write it: a run that did not start
        return {}


class Progress:
    """Live progress of a hunt. On a terminal, one status line rewritten in place: runs done,
    steps per second over the hunt, and the best so far (the longest run that did not fail,
    the fewest steps to a failure); a failing run also gets a line of its own. Elsewhere (a
    pipe, a log), one line per run as it ends."""

    def __init__(self, runs: int, out: TextIO):
        self.runs, self.out, self.tty = runs, out, out.isatty()
        self.started = time.monotonic()
        self.done = self.steps = self.longest = 0
        self.fewest_to_failure: int | None = None

    def run_done(self, seed: int, _: str, run: Run) -> None:
        self.done += 1
        self.steps += run.steps
        elapsed = time.monotonic() - self.started
        if run.failed:
            self.fewest_to_failure = min(self.fewest_to_failure or run.steps, run.steps)
        else:
            self.longest = max(self.longest, run.steps)
        line = f"run {self.done}/{self.runs} seed {seed}: {'FAILED' if run.failed else 'ok'} ({run.steps} steps, {run.steps / max(run.seconds, 1e-9):,.0f} steps/s; {elapsed:.0f} s so far)"
        if not self.tty:
            print(line, file=self.out, flush=True)
            return
        if run.failed:
            print(f"\r\x1b[K{line}", file=self.out)
        fewest = "-" if self.fewest_to_failure is None else f"{self.fewest_to_failure:,}"
        status = f"{self.done}/{self.runs} runs, {self.steps / max(elapsed, 1e-9):,.0f} steps/s, longest run {self.longest:,} steps, fewest steps to a failure {fewest}; {elapsed:.0f} s"
        print(f"\r\x1b[K{status}", end="", file=self.out, flush=True)

    def end(self) -> None:
        """End the status line, so that what follows starts a line of its own."""
        if self.tty and self.done:
            print(file=self.out, flush=True)


def main(args: argparse.Namespace) -> int:
    hunt = Hunt(args.variant, args.strategy, args.depth, args.steps, args.vcpus, address_size=args.address_size)
    started = time.monotonic()
    result: dict = {"found": False, "variant": args.variant, "strategy": args.strategy, "seed": None, "runs": 0, "seconds": 0.0, "failure": None, "reproduce": None, "workers": args.workers}
    progress = Progress(args.runs, sys.stdout)
    with tempfile.TemporaryDirectory() as tmp:
        searched = hunt.search(args.seed, args.runs, args.budget_seconds, tmp, args.workers, progress.run_done)
        progress.end()
        result["runs"] = len(searched.runs)
        result["steps"] = sum(run.steps for _, _, run in searched.runs)
        if searched.interrupted:
            print("interrupted")
            return EXIT_INTERRUPTED
        if searched.failing:
            seed, schedule_file, run = searched.failing
            kept = os.path.abspath(args.schedule_file or f"hunt-{args.variant}-{hunt.schedule(seed).replace(':', '-')}.schedule.json")
            shutil.copyfile(schedule_file, kept)
            result |= {"found": True, "seed": seed, "failure": failure(run.report), "reproduce": hunt.reproduce(seed), "schedule_file": kept}
            from xensim.shrink import explain_and_shrink

            result |= explain_and_shrink(args, hunt, seed, run.report, _record(schedule_file), tmp, kept)
    result["seconds"] = time.monotonic() - started
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
