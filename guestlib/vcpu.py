"""A vCPU process: `python -m guestlib.vcpu --server HOST:PORT --token T --vcpu N`.

One process per vCPU, one trio nursery per process (the upcall loop and the workload). vCPU 0
boots the kernel; the others wait until Xen starts them. With `--claim` instead of `--vcpu`
the process runs as the first vCPU nobody else runs (of the domains of its `--token`s, which
may repeat), so processes on many hosts can share out vCPUs with nothing but the tokens. At
the end the process prints its report as one JSON line on stdout; the exit status is 0, or 3
when the kernel hit a BUG or found corrupted data.
"""

import argparse
import json
import os
import random
import signal
import sys

import trio

from xensim.errors import KILLED_BY_SCHEDULE, Parser, address, at_least, fraction, run_program

from .hypercalls import claim, connect
from .kernel import scenarios
from .kernel.boot import EVTCHN_ABIS, answer_pending_calls, attach, booted, start_of_day
from .kernel.layout import BALLOON_SLOTS
from .kernel.shootdown import VARIANTS
from .kernel.workload import WorkloadConfig, run
from .paging import mode_of_start
from .transport import SessionClosed


async def run_vcpu(
    server: str, token: str, vcpu: int, variant: str, highpte: bool, config: WorkloadConfig, scenario: str | None = None, progress: float = 0, evtchn: str = "fifo", controlled: bool = False
) -> dict:
    async with connect(server, token, vcpu) as client:
        return await _run(client, vcpu, variant, highpte, config, scenario, progress, evtchn, controlled)


async def claim_and_run(server: str, tokens: list[str], *args) -> dict:
    """`run_vcpu` as the first free vCPU of these domains; the report's `claimed` says which
    (the index of its token and the vCPU id), or is None when there was none to claim."""
    async with claim(server, tokens) as claimed:
        if claimed is None:
            return {"claimed": None, "bug": None}
        index, vcpu, client = claimed
        return {"claimed": {"token": index, "vcpu": vcpu}} | await _run(client, vcpu, *args)


async def _run(client, vcpu: int, variant: str, highpte: bool, config: WorkloadConfig, scenario: str | None, progress: float, evtchn: str, controlled: bool = False) -> dict:
    client.controlled = controlled
    mode = mode_of_start(await client.wait_started())
    if vcpu == 0 and not await booted(client, mode):
        await start_of_day(client, mode, variant, highpte, evtchn)
    kernel = await attach(client, mode, vcpu)
    async with trio.open_nursery() as nursery:
        await nursery.start(kernel.smp.upcall_loop)
        await kernel.smp.events.local_irq_enable()
        if kernel.restarted and not kernel.offline:
            async with kernel.cpu.irq:
                await kernel.smp.events.recover()
                await answer_pending_calls(kernel)
        if progress:
            nursery.start_soon(_report_progress, kernel, progress)
        report = await (scenarios.run(kernel, scenario) if scenario else run(kernel, config))
        nursery.cancel_scope.cancel()
    report["restarted"] = kernel.restarted
    report["evtchn"] = kernel.smp.events.abi
    return report


async def _report_progress(kernel, interval: float) -> None:
    """A progress line on stdout every `interval` seconds, for live displays."""
    cpu = kernel.cpu
    while True:
        await trio.sleep(interval)
        print(json.dumps({"progress": {"vcpu": cpu.id, "messages": cpu.messages, "phase": cpu.phase, **cpu.stats}}), flush=True)


def build_parser() -> Parser:
    parser = Parser(prog="python -m guestlib.vcpu", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, type=address, metavar="HOST:PORT", help="the hypervisor")
    parser.add_argument("--token", required=True, action="append", help="the domain's token (from CreateDomain); with --claim, one per domain to claim from")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--vcpu", type=at_least(0), help="run as this vCPU of the --token's domain")
    which.add_argument("--claim", action="store_true", help="run as the first vCPU (of the domains in --token order) that has no process yet")
    parser.add_argument("--variant", choices=VARIANTS, default="modern", help="drop_mm_ref form (vCPU 0 decides at boot)")
    parser.add_argument("--highpte", action="store_true", help="pte pages from highmem (vCPU 0 decides at boot)")
    parser.add_argument("--evtchn", choices=EVTCHN_ABIS, default="fifo", help="event channels: FIFO if Xen offers it, or 2-level (Linux's xen.fifo_events=0; vCPU 0 decides at boot)")
    parser.add_argument("--seconds", type=at_least(0.0, float), default=5.0, help="how long the workload runs")
    parser.add_argument("--until", type=at_least(0.0, float), metavar="SECONDS", help="with --controlled: end the workload at this Xen system time, not --seconds after its start (a restarted vCPU's)")
    parser.add_argument("--lifecycles", type=at_least(0), default=0, help="stop after this many (0: run for --seconds)")
    parser.add_argument("--seed", type=int, default=1, help="the workload's random seed")
    parser.add_argument("--migrate", type=fraction, default=0.5, help="chance a child finishes on another vCPU")
    parser.add_argument("--balloon", type=at_least(0, high=BALLOON_SLOTS), default=0, metavar="PAGES", help="pages each vCPU gives back to Xen and takes again between lifecycles (0: none)")
    parser.add_argument("--scenario", choices=scenarios.SCENARIOS, help="a scripted interleaving on two vCPUs instead of the workload")
    parser.add_argument("--controlled", action="store_true", help="the hypervisor runs a controlled --schedule: deadlines in Xen system time, no wall-clock waits (docs/schedule.md)")
    parser.add_argument("--progress", type=at_least(0.0, float), default=0, metavar="SECONDS", help="print a progress line this often (0: never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 3 on a kernel BUG or corrupted data, else xensim.errors' (1, 2, 70, 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.token) > 1 and not args.claim:
        parser.error("--token more than once needs --claim: a --vcpu belongs to one domain")
    return run_program(parser.prog, lambda: _main(args))


class _WakeOrder(random.Random):
    """trio's scheduler source with `random()` at 0.0: trio runs the tasks woken together
    in a random order (it pops each batch from its end, reversed first half of the time,
    trio/_core/_run.py, so that no program comes to rely on the order). In a controlled run
    the order must be the one they were woken in, every time (always reversed, then popped): an Upcall push reaches the interrupt task before the answer it
    came ahead of wakes the task that waited for it, so the handler takes the interrupt lock
    first, as Linux takes a pending interrupt at local_irq_enable; a random order made which
    of them sent the vCPU's next message vary from run to run (docs/schedule.md section 6)."""

    def random(self) -> float:
        return 0.0


def _keep_wake_order() -> None:
    trio._core._run._r = _WakeOrder()


def _killed_by_schedule(e: BaseException) -> bool:
    """Whether the Session ended because a controlled run's step killed this vCPU's process."""
    if isinstance(e, BaseExceptionGroup):
        return any(_killed_by_schedule(inner) for inner in e.exceptions)
    return isinstance(e, SessionClosed) and KILLED_BY_SCHEDULE in str(e)


def _main(args: argparse.Namespace) -> int:
    if args.controlled:
        _keep_wake_order()
    config = WorkloadConfig(seconds=args.seconds, seed=args.seed, migrate=args.migrate, max_lifecycles=args.lifecycles, balloon=args.balloon, until=args.until)
    workload = (args.variant, args.highpte, config, args.scenario, args.progress, args.evtchn, args.controlled)
    try:
        if args.claim:
            report = trio.run(claim_and_run, args.server, args.token, *workload)
        else:
            report = trio.run(run_vcpu, args.server, args.token[0], args.vcpu, *workload)
    except BaseException as e:
        if _killed_by_schedule(e):  # die as a SIGKILL from outside would: no report, no cleanup (docs/schedule.md section 10)
            os.kill(os.getpid(), signal.SIGKILL)
        raise
    print(json.dumps(report), flush=True)
    return 3 if report["bug"] or report.get("data_corruptions") else 0


if __name__ == "__main__":
    sys.exit(main())
