"""`xensim stress`: many domains and vCPU processes against one hypervisor, with faults.

Each vCPU is a real `guestlib.vcpu` process running the kernel's workload; this orchestrator
only starts them, reads their progress and reports, kills random ones with SIGKILL and
restarts them (a restarted vCPU re-attaches with the domain token and carries on from guest
memory), and at the end audits every domain, destroys them and audits the whole machine.
The run fails (exit status 1) on any audit finding, data corruption, leaked frame, kernel BUG,
unexpected hypercall error or vCPU that did not finish.
"""

import json
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import trio

from guestlib import Toolstack
from xensim.launch import vcpu_command

GRACE_SECONDS = 60.0  # how long past --seconds the vCPUs get to wind down


@dataclass
class StressConfig:
    domains: int = 1
    vcpus: int = 4
    seconds: float = 20.0
    seed: int = 1
    variants: list[str] = field(default_factory=lambda: ["modern"])  # one per domain, cycled
    kill_rate: float = 0.0  # SIGKILLs per vCPU per second
    pages: int = 16384
    highmem_pages: int = 0
    migrate: float = 0.5


@dataclass
class VcpuState:
    domid: int
    vcpu: int
    report: dict | None = None
    progress: dict = field(default_factory=dict)
    starts: int = 0
    kills: int = 0
    stderr_tail: str = ""  # of its last process, for a vCPU that did not finish
    process: trio.Process | None = None


@dataclass
class StressRun:
    config: StressConfig
    vcpus: list[VcpuState] = field(default_factory=list)
    domains: dict[int, str] = field(default_factory=dict)  # domid -> variant
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


async def run_stress(address: str, admin_token: str | None, config: StressConfig, run: StressRun | None = None) -> dict:
    """Run the stress workload against the hypervisor at `address`; returns the report."""
    run = run or StressRun(config)
    rng = random.Random(config.seed)
    async with Toolstack(address, admin_token) as xl:
        tokens = {}
        for i in range(config.domains):
            variant = config.variants[i % len(config.variants)]
            created = await xl.create_domain(nr_pages=config.pages, nr_vcpus=config.vcpus, highmem_pages=config.highmem_pages, name=f"stress{i}")
            tokens[created.domid] = created.token
            run.domains[created.domid] = variant
            run.vcpus += [VcpuState(created.domid, v) for v in range(config.vcpus)]
        deadline = run.started + config.seconds
        try:  # Ctrl-C: stop the vCPUs, still audit, destroy and report
            with trio.move_on_after(config.seconds + GRACE_SECONDS):
                async with trio.open_nursery() as nursery:
                    for state in run.vcpus:
                        nursery.start_soon(_keep_running, address, tokens[state.domid], run.domains[state.domid], state, config, deadline)
                    if config.kill_rate:
                        nursery.start_soon(_killer, run, rng, deadline)
        except KeyboardInterrupt:
            run.interrupted = True
        return await _finish(xl, run)


async def _keep_running(address: str, token: str, variant: str, state: VcpuState, config: StressConfig, deadline: float) -> None:
    """Run this vCPU's process, and a new one each time it is killed, until one reports."""
    while state.report is None:
        seconds = max(deadline - time.monotonic(), 0.0)
        args = ["--variant", variant, "--seconds", f"{seconds:.3f}", "--seed", str(config.seed * 100 + state.domid), "--migrate", str(config.migrate), "--progress", "0.5"]
        if config.highmem_pages:
            args.append("--highpte")
        state.starts += 1
        with tempfile.TemporaryFile() as stderr:
            process = await trio.lowlevel.open_process(
                vcpu_command(address, token, state.vcpu, *args), stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
            )  # its own session: a Ctrl-C in the terminal reaches the orchestrator only
            state.process = process
            try:
                await _read_lines(process, state)
            finally:
                state.process = None
                with trio.CancelScope(shield=True):
                    if process.returncode is None and state.report is None:
                        process.kill()
                    await process.wait()
            stderr.seek(0)
            state.stderr_tail = stderr.read().decode(errors="replace")[-1500:]
            if state.report is None and process.returncode != -signal.SIGKILL:
                state.report = {"bug": f"dom{state.domid} vCPU {state.vcpu}: process exited with status {process.returncode} and no report: {state.stderr_tail}", "lifecycles": 0}


async def _read_lines(process: trio.Process, state: VcpuState) -> None:
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
                state.kills += 1


async def _finish(xl: Toolstack, run: StressRun) -> dict:
    """Audit every domain, read the hypervisor's statistics, destroy the domains, audit the
    machine; build the report."""
    per_domain = {domid: await xl.audit(domid) for domid in run.domains}
    stale = 0
    for domid in run.domains:
        stale += sum(v.stale_tlb_hits for v in await xl.vcpu_info(domid))
    stats = await xl.stats()
    for domid in run.domains:
        await xl.destroy_domain(domid)
    machine = await xl.audit()
    leaked = [f for f in machine if "does not exist" in f]
    reports = [v.report or {} for v in run.vcpus]
    errors = {f"{op}:{errno}": n for (op, errno), n in stats.items() if errno != "ok"}
    totals = run.totals()
    elapsed = time.monotonic() - run.started
    return {
        "process_lifecycles": sum(r.get("lifecycles", 0) for r in reports),
        "audit_findings": sum(len(f) for f in per_domain.values()) + len(machine),
        "data_corruptions": sum(len(r.get("data_corruptions", [])) for r in reports),
        "unexpected_errors": sum(errors.values()),
        "leaked_frames": len(leaked),
        "kernel_bugs": [r["bug"] for r in reports if r.get("bug")],
        "first_bug_after_s": min((r["bug_after_s"] for r in reports if r.get("bug_after_s") is not None), default=None),
        "stale_tlb_hits": stale,
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
        "interrupted": run.interrupted,
    }


def failed(report: dict) -> bool:
    """The stress run's verdict: anything wrong at all."""
    return bool(
        report["audit_findings"] or report["data_corruptions"] or report["leaked_frames"] or report["unexpected_errors"]
        or report["kernel_bugs"] or report["unfinished_vcpus"]
    )  # fmt: skip
