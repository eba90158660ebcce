"""`xensim guest`: one replica of the guest service, running vCPU processes for free vCPUs.

A replica knows only the hypervisor's endpoint and the domains' token files (written by
`xensim toolstack create`). It starts `--vcpus-per-replica` vCPU processes with `--claim`
(guestlib/vcpu.py): each runs as the first vCPU that has no process yet, so replicas on any
number of hosts share out the domains' vCPUs without knowing of each other. It prints every
vCPU's report, then a summary, and fails on a kernel BUG, corrupted data, or a vCPU process
that ended without a clean report.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import zlib

from guestlib.kernel.shootdown import VARIANTS
from xensim.errors import EXIT_TERMINATED, UsageError, UserError, address, at_least, fraction
from xensim.launch import claim_command, run_processes
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
    parser.set_defaults(run=main)


def _terminated(signum, frame) -> None:
    """SIGTERM (`docker compose down`, `docker stop`): stop the vCPU processes and exit."""
    raise SystemExit(EXIT_TERMINATED)


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminated)  # run_processes kills its vCPU processes on the way out
    seed = args.seed if args.seed is not None else zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_000
    domains = read_token_files(args.tokens)
    servers = {d["server"] for d in domains}
    if not domains:
        raise UsageError(f"no token files in {args.tokens} (`xensim toolstack create --out DIR` writes them)")
    if not args.server and len(servers) > 1:
        raise UsageError(f"the token files name several hypervisors ({', '.join(sorted(servers))}); pick one with --server")
    workload = ["--seconds", str(args.seconds), "--variant", args.variant, "--seed", str(seed), "--migrate", str(args.migrate)]
    if args.highpte:
        workload.append("--highpte")
    command = claim_command(args.server or servers.pop(), [d["token"] for d in domains], *workload)
    try:
        run = run_processes([command] * args.vcpus_per_replica, timeout=args.seconds + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        raise UserError(f"vCPU processes still running {GRACE_SECONDS:.0f} s after the workload's end (are all of the domains' vCPUs claimed?)") from None
    ran, failures = [], []
    for report, status in zip(run.reports, run.returncodes):
        print(json.dumps(report))
        claimed = report.get("claimed")
        if claimed:
            ran.append({"domid": domains[claimed["token"]]["domid"], "vcpu": claimed["vcpu"]})
        if status or report.get("bug") or report.get("data_corruptions"):
            failures.append(report.get("bug") or f"exit status {status}, {len(report.get('data_corruptions', []))} data corruptions")
    summary = {"seed": seed, "ran": ran, "unclaimed": len(run.reports) - len(ran), "lifecycles": run.lifecycles, "failures": failures}
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0
