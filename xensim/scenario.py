"""`xensim demo --scenario NAME`: one scripted interleaving of guestlib/kernel/scenarios.py,
told step by step: what the vCPUs do, what Xen and the kernel then did, and why.

The interleavings are deterministic (the vCPU processes order their steps through barrier
words in guest memory), so each one shows the same outcome every time: the lazy-TLB unpin race
of exit_mmap (Linux arch/x86/xen/mmu_pv.c, xen_exit_mmap and xen_drop_mm_ref) with or without
the right drop_mm_ref, and the read-only kmap of a highmem pte page. Exit status 0 when the
outcome is the one the variant is known for, 1 otherwise.
"""

import argparse
import json
import textwrap
from dataclasses import dataclass

from guestlib.paging import lowmem_pages
from xensim.errors import UsageError
from xensim.launch import VCPU_TIMEOUT, create_domain, default_trace, destroy_and_audit, hypervisor_server, run_processes, started, vcpu_command

PAGES = 4096


@dataclass(frozen=True)
class Scenario:
    vcpus: int
    summary: str  # one line, for --help
    story: str  # what the vCPUs do
    bugs_with: tuple[str, ...]  # the drop_mm_ref variants whose exit_mmap BUGs
    why_bug: str
    why_ok: str


SCENARIOS = {
    "lazy-exit": Scenario(
        2,
        "a lazy CPU still on a dying mm's pgd: `none` BUGs, every later variant shoots it down",
        "vCPU 1 runs task T, hands T to vCPU 0, and goes idle without leaving T's page tables "
        "(lazy TLB: Linux does not reload cr3 for a kernel thread). vCPU 0 finishes T and runs "
        "exit_mmap, which unpins T's pgd and maps it writable again to free it; Xen refuses that "
        "while any vCPU's cr3 still holds the pgd.",
        ("none",),
        "`none` only moves the exiting CPU off the pgd: Xen still has T's pgd as vCPU 1's cr3, so "
        "the writable remap after MMUEXT_UNPIN_TABLE fails with -EBUSY and the kernel BUGs.",
        "drop_mm_ref sent vCPU 1 an IPI (it is in T's cpumask and its cr3 is T's pgd); vCPU 1 "
        "left the mm before exit_mmap unpinned it, so the remap succeeded.",
    ),
    "stale-cr3": Scenario(
        2,
        "a CPU that left the cpumask with its cr3 switch still queued: `mask` BUGs",
        "vCPU 1 runs T, hands it over, and starts switching away from T's mm: it leaves T's "
        "cpumask and queues its cr3 switch in its lazy multicall batch, which has not reached "
        "Xen yet. vCPU 0 finishes T and runs exit_mmap.",
        ("none", "mask"),
        "vCPU 1 is no longer in T's cpumask, so it got no IPI, yet Xen still has T's pgd as its "
        "cr3 (the switch is still in its batch): -EBUSY on the remap, a kernel BUG. Linux 2.6.23 "
        "fixed it by also asking every CPU whose xen_current_cr3 is the pgd.",
        "xen_current_cr3 still names T's pgd on vCPU 1, so it got the IPI; the handler flushed "
        "its queued batch, the switch reached Xen, and the remap succeeded.",
    ),
    "killed-mid-switch": Scenario(
        2,
        "vCPU 1's process dies inside the stale-cr3 window and a new one finishes the switch",
        "As stale-cr3, but vCPU 1's process SIGKILLs itself with the cr3 switch written to guest "
        "memory and not yet sent to Xen. A new process for vCPU 1 attaches, finds the switch Xen "
        "has not seen, and finishes it; then vCPU 0 exits T.",
        (),
        "the new vCPU 1 process did not finish the interrupted switch.",
        "the restarted vCPU 1 finished its interrupted switch as it attached, so by the time "
        "exit_mmap ran, no cr3 held T's pgd, whatever the variant.",
    ),
    "offline-call": Scenario(
        2,
        "a CPU going offline with a drop_mm_ref addressed to it: the call runs before it leaves",
        "vCPU 1 runs T, hands it over and stays lazy on T's mm; then it reaches the end of its "
        "work and goes offline with interrupts off. vCPU 0 exits T meanwhile, and its drop_mm_ref "
        "asks vCPU 1 to leave T's pgd, then waits for vCPU 1's acknowledgement or for it to be "
        "offline. Once T is freed, vCPU 0 asks the now offline vCPU 1 to drop T once more.",
        ("none",),
        "`none` sent vCPU 1 no IPI, and Xen still had T's pgd as its cr3 when exit_mmap unpinned "
        "it: -EBUSY on the remap, a kernel BUG.",
        "vCPU 1 ran the drop_mm_ref before it counted as offline (Linux's dying CPU flushes its "
        "call queue first), so exit_mmap found no cr3 on T's pgd; the second call, which found "
        "vCPU 1 offline, never ran, so nothing read T's freed mm.",
    ),
    "kmap-readonly": Scenario(
        1,
        "highpte: a pinned pte page is reachable only through a read-only kmap slot",
        "One vCPU, its pte pages in highmem (highpte). The kernel reaches a pinned pte page "
        "through a kmap slot; Xen refuses a writable mapping of a frame in use as a page table, "
        "so Linux maps it read-only (xen_kmap_atomic_pte) and Xen emulates the writes to it.",
        (),
        "",
        "the writable kmap was refused while the page was pinned, a valid pte store through the "
        "read-only slot was emulated, an invalid one faulted, and after unpin a writable kmap worked.",
    ),
}


def scenario_help() -> str:
    """The scenarios, one line each, for an --help epilog."""
    return "scenarios (--scenario):\n" + "\n".join(f"  {name:<18} {s.summary}" for name, s in SCENARIOS.items())


def _say(text: str) -> None:
    print(textwrap.fill(text, 88, subsequent_indent="  "))


def _run_vcpus(address: str, token: str, scenario: str, args: list[str]) -> list[dict]:
    """The reports of vCPU 0 and 1; for killed-mid-switch, vCPU 1 runs twice (killed, then new)."""
    commands = [vcpu_command(address, token, v, *args) for v in range(SCENARIOS[scenario].vcpus)]
    if scenario != "killed-mid-switch":
        return run_processes(commands).reports
    with started(commands[0]) as exiter:
        killed = run_processes(commands[1:])
        print(f"vCPU 1's first process ended with status {killed.returncodes[0]} (SIGKILLed in the window); starting a new one")
        victim = run_processes(commands[1:]).reports[0]
        out = exiter.finish(VCPU_TIMEOUT)
    lines = out.strip().splitlines()
    return [json.loads(lines[-1]) if lines else {"bug": "vCPU 0 wrote no report"}, victim]


def main(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    trace = None if args.no_trace else (args.trace or default_trace())
    vcpu_args = ["--variant", args.variant, "--scenario", args.scenario] + (["--highpte"] if args.scenario == "kmap-readonly" else [])
    if args.address_size == "both":
        raise UsageError("--address-size both is for --race; a scenario runs one guest: pick 64 or 32")
    size = int(args.address_size)
    highmem = PAGES - lowmem_pages(size, PAGES) if size == 32 else PAGES // 4 if args.scenario == "kmap-readonly" else 0
    with hypervisor_server(*(("--trace", trace) if trace else ())) as server:
        domain = create_domain(server, PAGES, scenario.vcpus, highmem_pages=highmem, address_size=size)
        print(f"scenario {args.scenario}, drop_mm_ref variant {args.variant}: dom{domain.domid} ({size}-bit), {scenario.vcpus} vCPU processes\n")
        _say(f"What happens: {scenario.story}")
        reports = _run_vcpus(server.address, domain.token, args.scenario, vcpu_args)
        findings = destroy_and_audit(server.toolstack(), server.metadata(), domain.domid)
    bug = next((r["bug"] for r in reports if r.get("bug")), None)
    print()
    if args.scenario == "kmap-readonly":
        seen = {k: reports[0].get(k) for k in ("writable_kmap_while_pinned", "valid_entry_store_emulated", "invalid_entry_store_fault", "writable_kmap_after_unpin")}
        print(f"What the kernel saw: {seen}")
        expected = not bug and seen["writable_kmap_while_pinned"] == "EBUSY" and bool(seen["writable_kmap_after_unpin"])
    else:
        print(f"What vCPU 0 saw: {bug if bug else 'exit_mmap unpinned and freed the page tables'}")
        expected = bool(bug) == (args.variant in scenario.bugs_with)
    _say(f"Why: {scenario.why_bug if bug else scenario.why_ok}")
    print(f"\naudit after destroying the domain: {len(findings)} findings; trace: {trace or 'not recorded'}")
    print("verdict: " + ("as expected for this variant" if expected and not findings else "NOT what this variant is known for"))
    return 0 if expected and not findings else 1
