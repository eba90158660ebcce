"""The cost of control (docs/schedule.md): Session messages per wall second of the same
workload (one domain of VCPUS vCPU processes) run free, under `random` and under `pct`.

Each run is timed from the start of its vCPU processes to their end, boot included, on a fresh
server, and counts the messages the processes report, so the three see the same overheads.
`sched.controlled_over_free_steps_per_s` is random's rate over free's (a step is one message);
pct's ratio is beside it.
"""

import tempfile
import time

from xensim.launch import create_domain, hypervisor_server, run_vcpus

VCPUS = 4
FREE_SECONDS = 6.0  # wall seconds
CONTROLLED_SECONDS = 0.6  # Xen system time: 6,000 steps


def _rate(schedule: str, tmp: str) -> tuple[float, dict]:
    controlled = schedule != "free"
    server_args = ("--schedule", schedule, "--schedule-file", f"{tmp}.json", "--schedule-steps", str(int(CONTROLLED_SECONDS * 10_000))) if controlled else ()
    seconds = CONTROLLED_SECONDS if controlled else FREE_SECONDS
    with hypervisor_server(*server_args) as server:
        domain = create_domain(server, nr_pages=4096, nr_vcpus=VCPUS)
        started = time.perf_counter()
        work = run_vcpus(server.address, domain.token, VCPUS, "--seconds", str(seconds), "--seed", "7", *(["--controlled"] if controlled else []))
        elapsed = time.perf_counter() - started
    work.require_work(f"sched.* ({schedule})")
    messages = sum(r["messages"] for r in work.reports)
    return messages / elapsed, {"messages": messages, "wall_seconds": elapsed, "lifecycles": work.lifecycles}


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        free, free_info = _rate("free", f"{tmp}/free")
        random_rate, random_info = _rate("random:7", f"{tmp}/random")
        pct, pct_info = _rate("pct:7", f"{tmp}/pct")
    return {
        "sched.controlled_over_free_steps_per_s": {
            "value": random_rate / free,
            "unit": "ratio",
            "schedule": "random:7",
            "target": ">= 0.5",
            "vcpu_processes": VCPUS,
            "free_messages_per_s": free,
            "random_steps_per_s": random_rate,
            "pct_steps_per_s": pct,
            "pct_over_free": pct / free,
            "free": free_info,
            "random": random_info,
            "pct": pct_info,
        },
        "sched.pct_over_free_steps_per_s": {"value": pct / free, "unit": "ratio", "schedule": "pct:7"},
    }
