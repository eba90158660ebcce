"""How soon the lazy-TLB unpin race of the `mask` variant is found: today's way (repeated
free-running runs, the operating system interleaving the vCPU processes) beside a pct hunt
(docs/schedule.md section 8), in one run on one machine.

`hunt.mask_seconds_to_first_failure` is pct's: the median over PCT_SEEDS starting seeds of the
wall seconds from a hunt's start to the end of its first failing run, server and process
start-up included. Free's, beside it, is the wall seconds from the first free run's start to
the end of the first one that hits, runs of FREE_RUN_SECONDS on the guest `demo --race` ran
before it hunted (4 vCPUs, 8,192 pages, every child finished on another vCPU); a search that
does not hit within FREE_BUDGET_SECONDS reports the budget as a lower bound
(`free_found` false).
"""

import statistics
import tempfile
import time

import trio

from xensim.hunt import Hunt
from xensim.launch import hypervisor_server, machine_frames
from xensim.stress import StressConfig, run_stress

VARIANT = "mask"
PCT_SEEDS = range(1, 1001, 100)  # 10 starting seeds, far enough apart that no two hunts share a run
PCT_RUNS, PCT_BUDGET_SECONDS = 20, 60.0  # per hunt, as `xensim hunt --budget-seconds 60`
FREE_VCPUS, FREE_PAGES, FREE_MIGRATE = 4, 8192, 1.0
FREE_RUN_SECONDS = 5.0
FREE_BUDGET_SECONDS = 120.0  # start no free run after this


def _hits(report: dict) -> bool:
    return any("in exit_mmap" in bug for bug in report["kernel_bugs"])


def _free() -> dict:
    """Free runs of seeds 1, 2, ... on one hypervisor until one hits exit_mmap's BUG."""
    started = time.monotonic()
    runs, found = 0, False
    with hypervisor_server(frames=machine_frames(1, FREE_PAGES)) as server:
        while not found and time.monotonic() - started < FREE_BUDGET_SECONDS:
            runs += 1
            config = StressConfig(domains=1, vcpus=FREE_VCPUS, seconds=FREE_RUN_SECONDS, seed=runs, variants=[VARIANT], pages=FREE_PAGES, migrate=FREE_MIGRATE)
            found = _hits(trio.run(run_stress, server.address, None, config))
    return {"seconds": time.monotonic() - started, "found": found, "runs": runs}


def _pct() -> list[dict]:
    """One pct hunt per starting seed, each until its first failing run."""
    hunt = Hunt(VARIANT)
    hunts = []
    for first in PCT_SEEDS:
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            ran = hunt.search(first, PCT_RUNS, PCT_BUDGET_SECONDS, tmp)
        seed = ran.failing[0] if ran.failing else None
        steps = sum(r.steps for _, _, r in ran.runs)
        hunts.append({"first_seed": first, "found": seed is not None, "seed": seed, "runs": len(ran.runs), "steps": steps, "seconds": time.monotonic() - started})
    return hunts


def run() -> dict:
    free = _free()
    hunts = _pct()
    pct = statistics.median(h["seconds"] for h in hunts)
    return {
        "hunt.mask_seconds_to_first_failure": {
            "value": pct,
            "unit": "s",
            "strategy": "pct (depth 3), median over 10 starting seeds",
            "pct_found": sum(h["found"] for h in hunts),
            "pct_max_seconds": max(h["seconds"] for h in hunts),
            "pct_hunts": hunts,
            "free_seconds": free["seconds"],
            "free_found": free["found"],
            "free_is_lower_bound": not free["found"],
            "free_runs": free["runs"],
            "free_run": f"{FREE_VCPUS} vCPUs, {FREE_PAGES} pages, --migrate {FREE_MIGRATE:g}, {FREE_RUN_SECONDS:g} s a run, budget {FREE_BUDGET_SECONDS:g} s",
            "free_over_pct": free["seconds"] / pct,
        },
    }
