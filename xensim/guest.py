"""`xensim guest`: one replica of the guest service, running vCPU processes for free vCPUs.

A replica knows only the hypervisor's endpoint and the domains' token files (written by
`xensim toolstack create`). It starts `--vcpus-per-replica` vCPU processes with `--claim`
(guestlib/vcpu.py): each runs as the first vCPU that has no process yet, so replicas on any
number of hosts share out the domains' vCPUs without knowing of each other. It prints a
progress line every few seconds, then every vCPU's report, a summary, a verdict line and the
summary as JSON, and fails on a kernel BUG, corrupted data, or a vCPU process that ended
without a clean report.
"""

import argparse
import json
import os
import signal
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field

import trio

from guestlib.kernel.shootdown import VARIANTS
from xensim.errors import EXIT_TERMINATED, UsageError, UserError, address, at_least, fraction
from xensim.launch import claim_command, opened
from xensim.toolstack import read_token_files

# A domain's vCPUs wait for each other at the end (every CPU drains the others' hand-overs),
# so a replica whose domains are not fully claimed would wait forever; past this it gives up.
GRACE_SECONDS = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", required=True, metavar="DIR", help="the token files of `xensim toolstack create --out DIR`")
    parser.add_argument("--server", metavar="HOST:PORT", type=address, help="the hypervisor (default: the address in the token files)")
    parser.add_argument("--vcpus-per-replica", type=at_least(1), default=1, metavar="K", help="vCPU processes this replica runs")
    parser.add_argument("--seconds", type=at_least(0.1, float), default=20.0, help="how long the workload runs")
    parser.add_argument("--variant", choices=VARIANTS, default="modern", help="the guest's drop_mm_ref (vCPU 0 decides at boot)")
    parser.add_argument("--highpte", action="store_true", help="pte pages from highmem (vCPU 0 decides at boot)")
    parser.add_argument("--seed", type=int, help="the workload's random seed (default: one of this host's name and process id, so each replica's differs; the summary says which)")
    parser.add_argument("--migrate", type=fraction, default=0.5, help="chance a child finishes on another vCPU")
    parser.add_argument("--progress", type=at_least(0.1, float), default=5.0, metavar="S", help="seconds between progress lines")
    parser.set_defaults(run=main)


@dataclass
class Replica:
    """What the replica's vCPU processes said so far: each one's last progress line and report."""

    seconds: float
    every: float  # seconds between progress lines
    progress: list[dict] = field(default_factory=list)
    reports: list[dict | None] = field(default_factory=list)
    returncodes: list[int | None] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    terminated: bool = False

    def line(self) -> str:
        running = sum(1 for r in self.reports if r is None)
        exits = sum(p.get("lifecycles", 0) for p in self.progress)
        return f"{time.monotonic() - self.started:6.1f}/{self.seconds:g} s: {exits} process exits, {running}/{len(self.reports)} vCPU processes running"


async def _run_one(command: list[str], replica: Replica, i: int) -> None:
    """One vCPU process: its progress lines, then its report (the last line)."""
    async with opened(command) as process:
        buffer = b""
        async for chunk in process.stdout:
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in map(json.loads, lines):
                if "progress" in line:
                    replica.progress[i] = line["progress"]
                else:
                    replica.reports[i] = line
        replica.returncodes[i] = await process.wait()
    if replica.reports[i] is None:
        replica.reports[i] = {"bug": f"no report (exit status {replica.returncodes[i]}): {process.log()[-2000:]}"}


async def _run(command: list[str], count: int, replica: Replica) -> None:
    """The vCPU processes, with a progress line every `replica.every` seconds; SIGTERM (`docker compose
    down`, `docker stop`) stops them (the processes are killed as the nursery is cancelled)."""
    replica.progress, replica.reports, replica.returncodes = [{}] * count, [None] * count, [None] * count
    with trio.open_signal_receiver(signal.SIGTERM) as terminate:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in terminate:
                    replica.terminated = True
                    nursery.cancel_scope.cancel()

            async def show() -> None:
                while True:
                    await trio.sleep(replica.every)
                    print(replica.line(), flush=True)

            nursery.start_soon(watch)
            nursery.start_soon(show)
            with trio.fail_after(replica.seconds + GRACE_SECONDS):
                async with trio.open_nursery() as vcpus:
                    for i in range(count):
                        vcpus.start_soon(_run_one, command, replica, i)
            nursery.cancel_scope.cancel()


def main(args: argparse.Namespace) -> int:
    """Progress while it runs, then each vCPU's report, a summary, a verdict line and the
    summary as JSON (the last line). Exit status 0 clean, 1 anything wrong, 143 SIGTERM."""
    seed = args.seed if args.seed is not None else zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_000
    domains = read_token_files(args.tokens)
    servers = {d["server"] for d in domains}
    if not domains:
        raise UsageError(f"no token files in {args.tokens} (`xensim toolstack create --out DIR` writes them)")
    if not args.server and len(servers) > 1:
        raise UsageError(f"the token files name several hypervisors ({', '.join(sorted(servers))}); pick one with --server")
    workload = ["--seconds", str(args.seconds), "--variant", args.variant, "--seed", str(seed), "--migrate", str(args.migrate), "--progress", "1"]
    if args.highpte:
        workload.append("--highpte")
    command = claim_command(args.server or servers.pop(), [d["token"] for d in domains], *workload)
    replica = Replica(args.seconds, args.progress)
    try:
        trio.run(_run, command, args.vcpus_per_replica, replica)
    except trio.TooSlowError:
        raise UserError(f"vCPU processes still running {GRACE_SECONDS:.0f} s after the workload's end (are all of the domains' vCPUs claimed?)") from None
    if replica.terminated:
        print(f"terminated: {replica.line()}", file=sys.stderr)
        return EXIT_TERMINATED
    ran, failures = [], []
    for report, status in zip(replica.reports, replica.returncodes):
        print(json.dumps(report))
        claimed = report.get("claimed")
        if claimed:
            ran.append({"domid": domains[claimed["token"]]["domid"], "vcpu": claimed["vcpu"]})
        if status or report.get("bug") or report.get("data_corruptions"):
            failures.append(report.get("bug") or f"exit status {status}, {len(report.get('data_corruptions', []))} data corruptions")
    lifecycles = sum(r.get("lifecycles", 0) for r in replica.reports)
    summary = {"seed": seed, "ran": ran, "unclaimed": len(replica.reports) - len(ran), "lifecycles": lifecycles, "failures": failures}
    print(f"{lifecycles} process lifecycles in {time.monotonic() - replica.started:.1f} s; seed {seed}")
    names = ", ".join(f"dom{r['domid']} vCPU {r['vcpu']}" for r in ran)
    print(f"  ran        {names or 'nothing (every vCPU had a process)'}")
    print(f"  unclaimed  {summary['unclaimed']}")
    for failure in failures:
        print(f"  failed: {failure}")
    print("verdict: " + (f"FAILED: {len(failures)} vCPU processes" if failures else "OK"))
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0
