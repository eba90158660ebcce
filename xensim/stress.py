"""`xensim stress`: many domains and vCPU processes against one hypervisor, with faults.

Each vCPU is a real `guestlib.vcpu` process running the kernel's workload; this orchestrator
only starts them, reads their progress and reports, kills random ones with SIGKILL and
restarts them (a restarted vCPU re-attaches with the domain token and carries on from guest
memory), and at the end audits every domain, destroys them and audits the whole machine.
`--address-sizes 32,64` mixes 32-bit PAE and 64-bit domains on one machine (cycled over the
domains, as `--variant` is). The run fails (exit status 1) on any audit finding, data corruption, leaked frame, kernel BUG,
mm still live in a domain whose vCPUs all finished cleanly (`leaked_mms`),
unexpected hypercall error or vCPU that did not finish.
"""

import argparse
import json
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import trio

from guestlib import Toolstack
from guestlib.kernel.boot import EVTCHN_ABIS
from guestlib.kernel.layout import BALLOON_SLOTS
from guestlib.kernel.shootdown import VARIANTS
from guestlib.paging import MODES, lowmem_pages
from hypervisor.core.policy import STEP_QUANTUM_NS
from hypervisor.server.config import ADMIN_TOKEN_ENV
from xensim import schedule
from xensim.errors import EXIT_INTERRUPTED, UsageError, address, address_sizes, at_least, fraction, writable_file
from xensim.launch import AsyncChild, hypervisor_server, machine_frames, opened, vcpu_command

GRACE_SECONDS = 60.0  # how long past --seconds the vCPUs get to wind down
MIN_STEPS_PER_S = 50  # a controlled run on the slowest machine it is meant for
PROGRESS_SECONDS = 5.0
# Guest memory below this is refused up front: with 4 vCPUs, 256 pages run the kernel out of
# lowmem (a kernel BUG in alloc_pages), 512 were enough when measured; twice that for margin.
MIN_PAGES = 1024
VARIANT_HELP = {  # the forms of guestlib/kernel/shootdown.py, oldest first
    "none": "only the exiting CPU leaves the pgd (pre-SMP): any lazy CPU breaks the unpin",
    "mask": "IPI the mm's cpumask (2007): misses a CPU whose cr3 switch away is still queued",
    "current-cr3": "also IPI every CPU whose xen_current_cr3 is the pgd (2.6.23's fix)",
    "modern": "xen_current_cr3 alone chooses the CPUs to IPI (4.14 and later)",
}


def variant_help() -> str:
    """The drop_mm_ref variants, one line each, for an --help epilog."""
    return "drop_mm_ref variants (--variant):\n" + "\n".join(f"  {name:<12} {VARIANT_HELP[name]}" for name in VARIANTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="HOST:PORT", type=address, help="an existing hypervisor (default: start one)")
    parser.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV), help=f"the server's admin token (env {ADMIN_TOKEN_ENV})")
    parser.add_argument("--domains", type=at_least(1), default=2, help="guests, run at once")
    parser.add_argument("--vcpus", type=at_least(1), default=4, help="vCPUs per domain, each a process")
    parser.add_argument("--pages", type=at_least(MIN_PAGES), default=8192, help="memory per domain in 4 KiB pages")
    parser.add_argument("--seconds", type=at_least(0.1, float), default=20.0, help="how long the workload runs")
    parser.add_argument("--seed", type=int, help="the workload's and the killer's random seed (default: the --schedule's seed, else 1)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, metavar="VARIANT", help="drop_mm_ref per domain, cycled (default modern; the variants are below)")
    parser.add_argument("--kill-vcpus", type=at_least(0.0, float), default=0.0, metavar="RATE", help="SIGKILLs per vCPU per second (of Xen time, by the schedule, if controlled); killed vCPUs restart")
    parser.add_argument("--migrate", type=fraction, default=0.5, help="chance a child finishes on another vCPU")
    parser.add_argument("--balloon", type=at_least(0, high=BALLOON_SLOTS), default=0, metavar="PAGES", help="pages each vCPU gives back to Xen and takes again between process lifecycles (0: none)")
    parser.add_argument("--address-sizes", type=address_sizes, default=[64], metavar="SIZES", help="each domain's address size, cycled: 64 (x86-64), 32 (PAE, compat ABI), or a list: 32,64")
    parser.add_argument("--highpte", action="store_true", help="pte pages from highmem (a 64-bit domain gets a quarter of its memory as highmem)")
    parser.add_argument("--evtchn", choices=EVTCHN_ABIS, default="fifo", help="the guests' event channels: FIFO (as Linux picks when Xen offers it) or 2-level")
    parser.add_argument("--json", metavar="FILE", type=writable_file, help="write the report as JSON")
    parser.add_argument("--trace", metavar="FILE", type=writable_file, help="record every hypercall (only when the hypervisor is started here)")
    schedule.add_arguments(parser)
    parser.epilog = variant_help()
    parser.set_defaults(run=main)


@dataclass
class StressConfig:
    domains: int = 1
    vcpus: int = 4
    seconds: float = 20.0
    seed: int = 1
    variants: list[str] = field(default_factory=lambda: ["modern"])  # one per domain, cycled
    kill_rate: float = 0.0  # SIGKILLs per vCPU per second
    pages: int = 16384
    highpte: bool = False  # pte pages from highmem (guestlib.vcpu --highpte)
    migrate: float = 0.5
    controlled: bool = False  # the hypervisor schedules the vCPUs; `seconds` is Xen system time (docs/schedule.md)
    balloon: int = 0  # pages each vCPU balloons (guestlib/kernel/balloon.py)
    evtchn: str = "fifo"  # the guest kernel's event-channel ABI (guestlib.vcpu --evtchn)
    address_sizes: list[int] = field(default_factory=lambda: [64])  # one per domain, cycled

    def highmem_pages(self, address_size: int) -> int:
        """A domain's highmem: PAE's share above the scaled 896 MiB direct map (always some,
        docs/linux.md section 13); a 64-bit domain's a quarter of its memory with --highpte
        (its pte pages need some), else none."""
        if address_size == 32:
            return self.pages - lowmem_pages(32, self.pages)
        return self.pages // 4 if self.highpte else 0


@dataclass
class VcpuState:
    domid: int
    vcpu: int
    report: dict | None = None
    progress: dict = field(default_factory=dict)
    starts: int = 0
    kills: int = 0
    stderr_tail: str = ""  # of its last process, for a vCPU that did not finish
    process: AsyncChild | None = None


@dataclass
class StressRun:
    config: StressConfig
    vcpus: list[VcpuState] = field(default_factory=list)
    domains: dict[int, str] = field(default_factory=dict)  # domid -> variant
    address_sizes: dict[int, int] = field(default_factory=dict)  # domid -> address size
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False

    def totals(self) -> dict:
        """Progress summed over every vCPU (final reports where there are)."""
        sums: dict[str, int] = {}
        for v in self.vcpus:
            stats = (v.report or {}).get("stats") or v.progress
            for key, value in stats.items():
                if isinstance(value, int) and key != "vcpu":
                    sums[key] = sums.get(key, 0) + value
        return sums


async def run_stress(address: str, admin_token: str | None, config: StressConfig, run: StressRun | None = None, interrupt: trio.Event | None = None) -> dict:
    """Run the stress workload against the hypervisor at `address`; returns the report.
    Ctrl-C (SIGINT, SIGTERM) interrupts it, or `interrupt` being set where the caller runs many
    at once and takes the signals itself (a signal goes to one receiver: hunt --workers)."""
    run = run or StressRun(config)
    rng = random.Random(config.seed)
    async with Toolstack(address, admin_token) as xl:
        tokens = {}
        for i in range(config.domains):
            variant = config.variants[i % len(config.variants)]
            size = config.address_sizes[i % len(config.address_sizes)]
            created = await xl.create_domain(nr_pages=config.pages, nr_vcpus=config.vcpus, highmem_pages=config.highmem_pages(size), name=f"stress{i}", address_size=size)
            tokens[created.domid] = created.token
            run.domains[created.domid] = variant
            run.address_sizes[created.domid] = size
            run.vcpus += [VcpuState(created.domid, v) for v in range(config.vcpus)]
        deadline = run.started + config.seconds
        workload = trio.CancelScope(deadline=trio.current_time() + wall_bound(config))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if interrupt is None else nullcontext() as ctrl_c:  # until the workload ends
            async with trio.open_nursery() as watcher:
                watcher.start_soon(_interrupt_on, partial(anext, ctrl_c) if interrupt is None else interrupt.wait, run, workload)
                with workload:
                    async with trio.open_nursery() as nursery:
                        for state in run.vcpus:
                            nursery.start_soon(_keep_running, address, tokens[state.domid], run.domains[state.domid], state, config, deadline)
                        if config.kill_rate and not config.controlled:  # a controlled run's kills are the schedule's (docs/schedule.md section 10)
                            nursery.start_soon(_killer, run, rng, deadline)
                watcher.cancel_scope.cancel()
        return await _finish(xl, run)


async def _interrupt_on(interrupted, run: StressRun, workload: trio.CancelScope) -> None:
    """Ctrl-C (or SIGTERM: `interrupted()` returns) ends the workload (its vCPU processes are
    killed), not the run: the domains are still audited and destroyed, and the report says it
    was interrupted. A second Ctrl-C, once the audit has begun, interrupts that too."""
    await interrupted()
    run.interrupted = True
    workload.cancel()


async def _keep_running(address: str, token: str, variant: str, state: VcpuState, config: StressConfig, deadline: float) -> None:
    """Run this vCPU's process, and a new one each time it is killed, until one reports."""
    while state.report is None:
        seconds = config.seconds if config.controlled else max(deadline - time.monotonic(), 0.0)
        args = ["--variant", variant, "--seconds", f"{seconds:.3f}", "--seed", str(config.seed * 100 + state.domid), "--migrate", str(config.migrate), "--progress", "0.5", "--evtchn", config.evtchn]
        if config.controlled:
            args.append("--controlled")
            if state.starts:  # a restarted vCPU ends with the run, at its Xen system time
                args += ["--until", f"{config.seconds:.6f}"]
        if config.highpte:
            args.append("--highpte")
        if config.balloon:
            args += ["--balloon", str(config.balloon)]
        state.starts += 1
        async with opened(vcpu_command(address, token, state.vcpu, *args)) as process:
            state.process = process
            try:
                await _read_lines(process, state)
                await process.wait()
            finally:
                state.process = None
        state.stderr_tail = process.log()[-1500:]
        if process.returncode == -signal.SIGKILL:
            state.kills += 1
        elif state.report is None:
            state.report = {"bug": f"dom{state.domid} vCPU {state.vcpu}: process exited with status {process.returncode} and no report: {state.stderr_tail}", "lifecycles": 0}


async def _read_lines(process: AsyncChild, state: VcpuState) -> None:
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "progress" in message:
                state.progress = message["progress"]
            else:
                state.report = message


async def _killer(run: StressRun, rng: random.Random, deadline: float) -> None:
    """SIGKILL random running vCPU processes at `kill_rate` per vCPU per second, until
    shortly before the deadline (a process killed then is restarted with little time left)."""
    tick = 0.25
    while time.monotonic() < deadline - 1.0:
        await trio.sleep(tick)
        for state in run.vcpus:
            if state.process is not None and state.report is None and rng.random() < run.config.kill_rate * tick:
                state.process.send_signal(signal.SIGKILL)


async def _finish(xl: Toolstack, run: StressRun) -> dict:
    """Audit every domain, read the hypervisor's statistics, destroy the domains, audit the
    machine; build the report."""
    per_domain = {domid: await xl.audit(domid) for domid in run.domains}
    stale = 0
    for domid in run.domains:
        stale += sum(v.stale_tlb_hits for v in await xl.vcpu_info(domid))
    stats = await xl.stats()
    leaked_mms = {str(domid): await _leaked_mms(xl, run, domid) for domid in run.domains if _finished_cleanly(run, domid)}
    # Every frame accounted for: a domain's destruction frees what it owned (tot_pages and its
    # shared-info page), and those frames, no more, no fewer, are free afterwards, with the
    # compat L4 of each vCPU of a 32-bit domain, which Xen owns (docs/pv32.md section 2).
    owned = {domid: (await xl.domain_info(domid)).tot_pages + 1 for domid in run.domains}
    compat_l4s = sum(run.config.vcpus for size in run.address_sizes.values() if size == 32)
    free_before = (await xl.host_info()).free_frames
    freed = {domid: await xl.destroy_domain(domid) for domid in run.domains}
    unaccounted = sum(abs(freed[d] - owned[d]) for d in run.domains) + abs((await xl.host_info()).free_frames - free_before - sum(freed.values()) - compat_l4s)
    machine = await xl.audit()
    leaked = [f for f in machine if "does not exist" in f]
    # A vCPU without a report (Ctrl-C, or it never finished) counts what its last progress line said.
    reports = [v.report or {"lifecycles": v.progress.get("lifecycles", 0), "messages": v.progress.get("messages", 0)} for v in run.vcpus]
    errors = {f"{op}:{errno}": n for (op, errno), n in stats.items() if errno != "ok"}
    totals = run.totals()
    elapsed = time.monotonic() - run.started
    return {
        "process_lifecycles": sum(r.get("lifecycles", 0) for r in reports),
        "audit_findings": sum(len(f) for f in per_domain.values()) + len(machine),
        "data_corruptions": sum(len(r.get("data_corruptions", [])) for r in reports),
        "corruptions": [f"dom{v.domid} {c}" for v, r in zip(run.vcpus, reports) for c in r.get("data_corruptions", [])],
        "unexpected_errors": sum(errors.values()),
        "leaked_frames": len(leaked),
        "unaccounted_frames": unaccounted,
        "kernel_bugs": [r["bug"] for r in reports if r.get("bug")],
        "first_bug_after_s": min((r["bug_after_s"] for r in reports if r.get("bug_after_s") is not None), default=None),
        "stale_tlb_hits": stale,
        "leaked_mms": leaked_mms,  # by domid, of the domains whose vCPUs all finished cleanly
        "leaked_mms_total": sum(leaked_mms.values()),
        "unfinished_vcpus": sum(1 for v in run.vcpus if v.report is None),
        "unfinished": [{"domid": v.domid, "vcpu": v.vcpu, "starts": v.starts, "progress": v.progress, "stderr": v.stderr_tail} for v in run.vcpus if v.report is None],
        "vcpu_reports": [{"domid": v.domid, "vcpu": v.vcpu, "starts": v.starts, "kills": v.kills, **(v.report or {})} for v in run.vcpus],
        "killed_vcpus": sum(v.kills for v in run.vcpus),
        "restarted_vcpus": sum(max(v.starts - 1, 0) for v in run.vcpus),
        "hypercall_errors": errors,
        "rpcs": sum(r.get("messages", 0) for r in reports),
        "seconds": elapsed,
        "totals": totals,
        "findings": {str(d): f for d, f in per_domain.items() if f} | ({"machine": machine} if machine else {}),
        "domains": {str(d): v for d, v in run.domains.items()},
        "address_sizes": {str(d): size for d, size in run.address_sizes.items()},
        "interrupted": run.interrupted,
        "evtchn": run.config.evtchn,
    }


# The pagetables a domain's kernel keeps pinned once every process has exited: the boot
# pagetable's top, pinned by the domain builder (64-bit: swapper's L4; PAE: its L3), measured
# on clean runs of each size (docs/linux.md section 17).
KERNEL_PINNED = {64: 1, 32: 1}


def _finished_cleanly(run: StressRun, domid: int) -> bool:
    """Whether every vCPU of the domain reported without a BUG: then its kernel exited every mm."""
    return all(v.report is not None and not v.report.get("bug") for v in run.vcpus if v.domid == domid)


async def _leaked_mms(xl: Toolstack, run: StressRun, domid: int) -> int:
    """The mms a cleanly finished domain still holds: its pinned pagetables past the kernel's
    own, one per pgd of an mm (64-bit PV pins a kernel and a user pgd, PAE one L3)."""
    size = run.address_sizes[domid]
    extra = (await xl.domain_summary(domid)).pinned_pagetables - KERNEL_PINNED[size]
    per_mm = 1 + MODES[size].user_pgd
    return -(-extra // per_mm)


def wall_bound(config: StressConfig) -> float:
    """How long the workload may take in wall seconds before its vCPUs are stopped: its
    seconds and a grace, or for a controlled run (whose seconds are Xen's, STEP_QUANTUM_NS a
    step) as long as MIN_STEPS_PER_S would take."""
    if not config.controlled:
        return config.seconds + GRACE_SECONDS
    return config.seconds * 1e9 / STEP_QUANTUM_NS / MIN_STEPS_PER_S + GRACE_SECONDS


def named_problems(report: dict, limit: int = 5) -> list[str]:
    """The audit findings and corrupted pages of a report, each on a line, at most `limit` of
    each kind (a leak can make thousands) with a count of the rest."""
    lines = []
    for kind, items in (("audit finding", [f for found in report["findings"].values() for f in found]), ("data corruption", report["corruptions"])):
        lines += [f"{kind}: {item}" for item in items[:limit]]
        if len(items) > limit:
            lines.append(f"... and {len(items) - limit} more {kind}s (--json has them all)")
    return lines


# What fails a run, in the order the verdict line names them.
VERDICT_KEYS = ("audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames", "unaccounted_frames", "leaked_mms_total", "kernel_bugs", "unfinished_vcpus")


def failed(report: dict) -> bool:
    """The stress run's verdict: anything wrong at all."""
    return any(report.get(key) for key in VERDICT_KEYS)


def main(args: argparse.Namespace) -> int:
    """Progress while it runs, then a summary, a verdict line and the summary as JSON. Exit
    status 0 clean, 1 anything wrong, 130 interrupted by Ctrl-C (still audited)."""
    plan = schedule.resolve(args, args.trace, args.kill_vcpus)
    if plan.controlled and args.server:
        raise UsageError("--schedule is the hypervisor's: start it with `xensim serve --schedule ...`, or leave out --server")
    config = StressConfig(
        args.domains, args.vcpus, plan.seconds, plan.seed, args.variant or ["modern"], args.kill_vcpus, args.pages,
        highpte=args.highpte, migrate=args.migrate, balloon=args.balloon, evtchn=args.evtchn, controlled=plan.controlled, address_sizes=args.address_sizes,
    )  # fmt: skip
    if args.server:
        report = trio.run(_run_with_progress, args.server, args.admin_token, config)
    else:
        with hypervisor_server(*(("--trace", args.trace) if args.trace else ()), *plan.server_args(), frames=machine_frames(args.domains, args.pages)) as server:
            report = trio.run(_run_with_progress, server.address, None, config)
    report |= plan.report(None if args.server else args.trace)
    sizes = "/".join(f"{size}-bit" for size in dict.fromkeys(config.address_sizes))
    print(f"{report['process_lifecycles']} process lifecycles in {report['seconds']:.1f} s on {config.domains} {sizes} domains of {config.vcpus} vCPUs")
    for key in ("audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames", "unaccounted_frames", "leaked_mms_total", "unfinished_vcpus", "killed_vcpus", "restarted_vcpus"):
        print(f"  {key.replace('_', ' '):<18} {report[key]}")
    for bug in report["kernel_bugs"]:
        print(f"  kernel BUG: {bug}")
    for line in named_problems(report):
        print(f"  {line}")
    for lost in report.get("lost_determinism", []):
        print(f"  determinism lost at step {lost['step']}: {lost['why']}")
    if args.trace and not args.server and failed(report):  # the trace is complete: the server stopped
        from xensim.explain import explain_run

        explained = explain_run(args.trace, report)
        report["explained"] = [e["data"] for e in explained]
        for e in explained:
            print(e["text"])
    wrong = [key.replace("_", " ") for key in VERDICT_KEYS if report[key]]
    print("verdict: " + ("INTERRUPTED (the report so far)" if report["interrupted"] else f"FAILED: {', '.join(wrong)}" if wrong else "OK"))
    shown = ("process_lifecycles", "audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames", "unaccounted_frames", "leaked_mms")
    shown += ("unfinished_vcpus", "killed_vcpus", "restarted_vcpus", "interrupted", "schedule", "seed", "final_state_digest")
    print(json.dumps({k: report[k] for k in shown}))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return EXIT_INTERRUPTED if report["interrupted"] else int(failed(report))


async def _run_with_progress(address: str, admin_token: str | None, config: StressConfig) -> dict:
    run = StressRun(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_print_progress, run)
        report = await run_stress(address, admin_token, config, run)
        nursery.cancel_scope.cancel()
    return report


async def _print_progress(run: StressRun) -> None:
    """A line every PROGRESS_SECONDS: time, process exits so far, vCPUs running and killed."""
    while True:
        await trio.sleep(PROGRESS_SECONDS)
        running = sum(1 for v in run.vcpus if v.report is None)
        kills = sum(v.kills for v in run.vcpus)
        exits = run.totals().get("lifecycles", 0)
        of = f" s (of a run of {run.config.seconds:g} s of Xen system time)" if run.config.controlled else f"/{run.config.seconds:g} s"
        print(f"{time.monotonic() - run.started:6.1f}{of}: {exits} process exits, {running}/{len(run.vcpus)} vCPUs running, {kills} killed", flush=True)
