"""`xensim demo`: an embedded hypervisor, a 4-vCPU guest, a live display and a report.

The demo is the stress harness (`xensim.stress`) on one domain, shown while it runs: per-vCPU
rates from the vCPU processes' progress lines and hypercall rates from the hypervisor's
statistics. `--race` hunts the lazy-TLB unpin race in every drop_mm_ref variant as `xensim
hunt` does (`--runs` seeds each, from --seed) and prints how many seeds fail, how soon, and the
command that reproduces one. `--evtchn` picks the guest's event-channel ABI; `both` runs the
demo (or each race-table row) with FIFO and with 2-level and shows the two side by side.
`--address-size 32` makes the guest a 32-bit PAE kernel on the compat ABI (see
docs/linux.md section 13); with `--race`, `--address-size both` gives the table a row per
address size too.
"""

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time

import trio
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from guestlib import Toolstack
from guestlib.kernel.boot import EVTCHN_ABIS
from guestlib.kernel.layout import BALLOON_SLOTS
from guestlib.kernel.shootdown import VARIANTS
from xensim import scenario, schedule
from xensim.errors import EXIT_INTERRUPTED, UsageError, at_least, fraction, writable_file
from xensim.hunt import Hunt, Run, failure
from xensim.launch import default_trace, hypervisor_server, machine_frames
from xensim.stress import MIN_PAGES, StressConfig, StressRun, failed, named_problems, run_stress, variant_help

# stat -> heading, in Linux's terms, two lines each so that the table fits 80 columns.
COLUMNS = {
    "lifecycles": "process\nexits", "faults": "page\nfaults", "cow": "COW\nbreaks", "migrations": "tasks\nmigrated",
    "lazy": "lazy\nTLB", "ipis_sent": "IPIs\nsent", "ipis_handled": "IPIs\nhandled", "pins": "table\npins", "bugs": "kernel\nBUGs",
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=at_least(0.1, float), default=20.0, help="how long the workload runs")
    parser.add_argument("--vcpus", type=at_least(1), default=4, help="the guest's vCPUs, each a process")
    parser.add_argument("--pages", type=at_least(MIN_PAGES), default=16384, help="guest memory in 4 KiB pages")
    parser.add_argument("--variant", choices=VARIANTS, default="modern", metavar="VARIANT", help="the guest's drop_mm_ref (the variants are below)")
    parser.add_argument("--highpte", action="store_true", help="pte pages from highmem (a 64-bit guest's highmem is a quarter of its memory)")
    parser.add_argument("--address-size", choices=("64", "32", "both"), default="64", help="the guest: 64 (x86-64) or 32 (PAE on the compat ABI); both: each, with --race")
    parser.add_argument("--race", action="store_true", help="run every drop_mm_ref variant and print the race table")
    parser.add_argument("--scenario", choices=scenario.SCENARIOS, metavar="NAME", help="a scripted interleaving, told step by step (below); only --variant, --address-size and --trace apply to it")
    parser.add_argument("--balloon", type=at_least(1, high=BALLOON_SLOTS), nargs="?", const=16, default=0, metavar="PAGES", help="each vCPU gives PAGES (16) back to Xen and takes them again")
    parser.add_argument("--runs", type=at_least(1), default=3, help="seeds per variant with --race")
    parser.add_argument("--migrate", type=fraction, default=0.5, help="chance a child finishes on another vCPU")
    parser.add_argument("--evtchn", choices=(*EVTCHN_ABIS, "both"), default="fifo", help="the guest's event channels: FIFO, 2-level, or both side by side")
    parser.add_argument("--seed", type=int, help="the workload's random seed (default: the --schedule's seed, else 1)")
    parser.add_argument("--json", metavar="FILE", type=writable_file, help="write the report as JSON")
    parser.add_argument("--trace", metavar="FILE", type=writable_file, help="where the hypervisor writes its trace (default: a new file in ~/.cache/xensim/traces, oldest removed past 256 MiB)")
    parser.add_argument("--no-trace", action="store_true", help="record no trace")
    schedule.add_arguments(parser)
    parser.epilog = f"{variant_help()}\n\n{scenario.scenario_help()}"
    parser.set_defaults(run=main)


def _table(run: StressRun, rates: dict, elapsed: float) -> Table:
    errors = rates.get("errors") or {}
    failed_calls = ", ".join(f"{n} {op} -{errno}" for (op, errno), n in sorted(errors.items())) or "none failed"
    table = Table(
        title=f"xensim demo  {elapsed:4.1f}/{run.config.seconds:.0f} s",
        caption=f"hypervisor: {rates.get('calls', 0):,.0f} hypercalls/s; {failed_calls}",
        box=box.SIMPLE_HEAD,  # its column divider is one space: no padding needed
        padding=0,
        show_edge=False,
    )
    table.add_column("vCPU", justify="right")
    table.add_column("hcall\nmsg/s", justify="right")
    for heading in COLUMNS.values():
        table.add_column(heading, justify="right")
    for state in run.vcpus:
        stats = (state.report or {}).get("stats") or state.progress
        rate = stats.get("messages", state.progress.get("messages", 0)) / max(elapsed, 1e-9)
        table.add_row(str(state.vcpu), f"{rate:,.0f}", *(str(stats.get(c, 0)) for c in COLUMNS))
    return table


async def _live(address: str, run: StressRun, console: Console) -> None:
    """Redraw the table twice a second with the hypervisor's call rate beside it."""
    async with Toolstack(address, None) as xl:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            last, last_t = 0, time.monotonic()
            rates: dict = {}
            while True:
                stats = await xl.stats()
                now = time.monotonic()
                total = sum(stats.values())
                rates = {"calls": (total - last) / max(now - last_t, 1e-9), "errors": {key: n for key, n in stats.items() if key[1] != "ok"}}
                last, last_t = total, now
                live.update(_table(run, rates, now - run.started))
                await trio.sleep(0.5)


async def _run_once(address: str, config: StressConfig, console: Console | None) -> dict:
    run = StressRun(config)
    async with trio.open_nursery() as nursery:
        if console is not None:
            nursery.start_soon(_live, address, run, console)
        report = await run_stress(address, None, config, run)
        nursery.cancel_scope.cancel()
    return report


def _print_report(console: Console, report: dict) -> None:
    totals = report["totals"]
    seconds = report["seconds"]
    cut = ", interrupted" if report["interrupted"] else ""
    console.print(f"\n[bold]Report[/bold] ({seconds:.1f} s, {report['rpcs']:,} hypercall messages from the guest){cut}")
    console.print(f"  process lifecycles  {report['process_lifecycles']:>8}  ({report['process_lifecycles'] / seconds:,.1f}/s)")
    for key in ("forks", "faults", "cow", "munmaps", "migrations", "lazy", "ipis_sent", "ipis_handled", "pins", "unpins", "ballooned_out", "ballooned_in"):
        console.print(f"  {key.replace('_', ' '):<19} {totals.get(key, 0):>8}  ({totals.get(key, 0) / seconds:,.1f}/s)")
    console.print(f"  RPCs per lifecycle  {report['rpcs'] / max(report['process_lifecycles'], 1):>8.1f}")
    errors = report["hypercall_errors"]
    console.print(f"  hypercall errors    {sum(errors.values()):>8}  {errors or ''}")
    console.print(f"  stale TLB hits      {report.get('stale_tlb_hits', 0):>8}")
    console.print(f"  data corruptions    {report['data_corruptions']:>8}")
    console.print(f"  kernel BUGs         {len(report['kernel_bugs']):>8}")
    for bug in report["kernel_bugs"]:
        console.print(f"    {bug}", style="red")
    console.print(f"  audit findings      {report['audit_findings']:>8}")
    for line in named_problems(report):
        console.print(f"    {line}", style="red", markup=False, highlight=False)
    console.print(f"  leaked frames       {report['leaked_frames']:>8}")
    console.print(f"  unaccounted frames  {report['unaccounted_frames']:>8}")
    if report.get("killed_vcpus"):
        console.print(f"  vCPUs killed/restarted {report['killed_vcpus']}/{report['restarted_vcpus']}")
    console.print(f"  seed, variant       {report['seed']}, {report['variant']}")
    console.print("  guest               " + ", ".join("32-bit PAE (compat ABI)" if size == 32 else "64-bit" for size in dict.fromkeys(report["address_sizes"].values())))
    console.print(f"  schedule            {report['schedule']}" + (f" ({report['steps']} steps, {report['schedule_file']})" if "steps" in report else ""), soft_wrap=True)
    for lost in report.get("lost_determinism", []):
        console.print(f"    determinism lost at step {lost['step']}: {lost['why']}", style="yellow", markup=False)
    console.print(f"  trace               {report['trace'] or 'not recorded'}", soft_wrap=True)
    console.print(f"  run it again        {report['reproduce']}", soft_wrap=True)
    verdict = "[yellow]INTERRUPTED[/yellow]" if report["interrupted"] else "[red]FAILED[/red]" if failed(report) else "[green]OK[/green]"
    console.print(f"  verdict             {verdict}")


def _side_by_side(reports: dict[str, dict]) -> Table:
    """The same run under each event-channel ABI: rates per second and the verdicts."""
    shown = Table(title="by event-channel ABI", box=box.SIMPLE)
    shown.add_column("")
    for abi in reports:
        shown.add_column(abi, justify="right")
    rows = {
        "process exits/s": lambda r: f"{r['process_lifecycles'] / r['seconds']:,.1f}",
        "IPIs handled/s": lambda r: f"{r['totals'].get('ipis_handled', 0) / r['seconds']:,.1f}",
        "RPCs per exit": lambda r: f"{r['rpcs'] / max(r['process_lifecycles'], 1):.1f}",
        "kernel BUGs": lambda r: str(len(r["kernel_bugs"])),
        "audit findings": lambda r: str(r["audit_findings"]),
        "verdict": lambda r: "FAILED" if failed(r) else "OK",
    }
    for name, cell in rows.items():
        shown.add_row(name, *(cell(r) for r in reports.values()))
    return shown


def _reproduce(args: argparse.Namespace, trace: str | None, plan: schedule.Schedule) -> str:
    """The command line that runs this demo again with the same settings (and a new trace);
    a controlled run's reproduces the same interleaving."""
    words = ["xensim", "demo", "--seconds", f"{plan.seconds:g}", "--vcpus", str(args.vcpus), "--pages", str(args.pages), "--variant", args.variant, *plan.words()]
    words += [] if args.address_size == "64" else ["--address-size", args.address_size]
    words += ["--evtchn", args.evtchn] + ([] if args.migrate == 0.5 else ["--migrate", f"{args.migrate:g}"])
    words += ["--highpte"] * args.highpte + (["--balloon", str(args.balloon)] if args.balloon else []) + ([] if trace else ["--no-trace"])
    return shlex.join(words)


def race_table(runs: int, seed: int, console: Console, abis: tuple[str, ...] = ("fifo",), sizes: tuple[int, ...] = (64,)) -> dict:
    """Each variant hunted as `xensim hunt` does (docs/schedule.md section 8) under each
    event-channel ABI and guest address size: of `runs` seeds from `seed`, how many fail,
    through which window, the median steps and wall seconds to the failure, and the command
    that reproduces the first failing seed. The table's rows are keyed "variant", then
    "/abi" when there are several ABIs and "/NN-bit" when there are several sizes."""
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, size, abi in ((v, z, a) for v in VARIANTS for z in sizes for a in abis):
            row = variant + (f"/{abi}" if len(abis) > 1 else "") + (f"/{size}-bit" if len(sizes) > 1 else "")
            hunt = Hunt(variant, evtchn=abi, address_size=size)
            failing: dict[int, Run] = {}
            for s in range(seed, seed + runs):
                run = hunt.run(s, os.path.join(tmp, f"{variant}-{size}-{abi}-{s}.json"))
                if run.report["interrupted"]:  # Ctrl-C: the table of a part of the runs would mislead
                    raise KeyboardInterrupt
                if run.failed:
                    failing[s] = run
                console.print(f"  {row:<17} seed {s}: {'FAILED ' + failure(run.report)['message'] if run.failed else 'ok'} ({run.steps} steps)", overflow="ellipsis", no_wrap=True)
            first = min(failing, default=None)
            table[row] = {
                "variant": variant, "address_size": size, "evtchn": abi, "strategy": hunt.strategy, "seeds": runs, "first_seed": seed, "failed": len(failing),
                "stale_cr3_failures": sum(any("stale-cr3 window" in b for b in r.report["kernel_bugs"]) for r in failing.values()),
                "median_steps_to_failure": statistics.median(r.steps for r in failing.values()) if failing else None,
                "median_seconds_to_failure": statistics.median(r.seconds for r in failing.values()) if failing else None,
                "failing_seed": first, "reproduce": hunt.reproduce(first) if failing else None,
            }  # fmt: skip
    shown = Table(title=f"the lazy-TLB unpin race hunted, by variant, guest address size and event-channel ABI ({hunt.strategy}, {hunt.steps} steps a seed)")
    for column in ("variant", "guest", "evtchn", "seeds failed", "stale-cr3", "median steps", "median s"):
        shown.add_column(column)
    for r in table.values():
        median_s = f"{r['median_seconds_to_failure']:.2f}" if r["failed"] else "-"
        median_steps = f"{r['median_steps_to_failure']:g}" if r["failed"] else "-"
        shown.add_row(r["variant"], f"{r['address_size']}-bit", r["evtchn"], f"{r['failed']}/{r['seeds']}", str(r["stale_cr3_failures"]), median_steps, median_s)
    console.print(shown)
    for row, r in table.items():
        if r["reproduce"]:
            console.print(f"  {row} seed {r['failing_seed']} again: {r['reproduce']}", soft_wrap=True)
    return table


def main(args: argparse.Namespace) -> int:
    """Exit status 0 clean, 1 anything wrong (the report says what), 130 interrupted by Ctrl-C
    (the report of what ran, the domain still audited and destroyed)."""
    if args.scenario:
        return scenario.main(args)
    console = Console()
    trace = None if args.no_trace else (args.trace or default_trace())
    plan = schedule.resolve(args, trace)
    abis = EVTCHN_ABIS if args.evtchn == "both" else (args.evtchn,)
    sizes = (64, 32) if args.address_size == "both" else (int(args.address_size),)
    if args.race:
        if plan.controlled:
            raise UsageError("--race hunts with pct seeds from --seed, a fresh hypervisor each; leave --schedule out (one seed's run: xensim hunt or the command the table prints)")
        _write_json(args, console, {"race": race_table(args.runs, plan.seed, console, abis, sizes)})
        return 0
    if len(sizes) > 1:
        raise UsageError("--address-size both is for --race; a demo runs one guest: pick 64 or 32")
    serve_args = (("--trace", trace) if trace else ()) + plan.server_args()
    with hypervisor_server(*serve_args, frames=machine_frames(1, args.pages)) as server:
        console.print(f"hypervisor on {server.address}; {'tracing to ' + trace if trace else 'no trace'}")
        reports: dict[str, dict] = {}  # the demo's, by event-channel ABI
        for abi in abis:
            config = StressConfig(
                domains=1, vcpus=args.vcpus, seconds=plan.seconds, seed=plan.seed, variants=[args.variant], pages=args.pages,
                highpte=args.highpte, address_sizes=list(sizes), migrate=args.migrate, balloon=args.balloon, evtchn=abi, controlled=plan.controlled,
            )  # fmt: skip
            console.print(f"[bold]event channels: {abi}[/bold]")
            reports[abi] = trio.run(_run_once, server.address, config, console)
            reports[abi] |= {"variant": args.variant, "trace": trace, "reproduce": _reproduce(args, trace, plan)}
            if reports[abi]["interrupted"]:
                break
        interrupted = any(r["interrupted"] for r in reports.values())
        status = EXIT_INTERRUPTED if interrupted else int(any(failed(r) for r in reports.values()))
    for r in reports.values():  # the server has stopped: its trace and schedule file are complete
        r |= plan.report(trace)
        _print_report(console, r)
    if len(reports) > 1:
        console.print(_side_by_side(reports))
    report = reports[args.evtchn] if args.evtchn in reports else {"by_evtchn": reports}
    if trace:
        from xensim.explain import explain_run

        for r in reports.values():
            if failed(r):
                explained = explain_run(trace, r)
                r["explained"] = [e["data"] for e in explained]
                for e in explained:
                    console.print(e["text"], markup=False, highlight=False, soft_wrap=True)
    _write_json(args, console, report)
    return status


def _write_json(args: argparse.Namespace, console: Console, report: dict) -> None:
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        console.print(f"wrote {args.json}")
