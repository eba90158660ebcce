"""Core CPU benchmarks: simulated loads and stores on TLB hits, and TLB-miss walks.

In-process, without any transport: the cost of the memory path itself (hypervisor/core/cpu.py),
called directly and through the core's dispatch table.
"""

import time

from hypervisor.core import Hypervisor, cpu
from hypervisor.core.abi import PAGE_OFFSET, PAGE_SHIFT
from hypervisor.core.tlb import DEFAULT_CAPACITY

MIN_SECONDS = 0.5
NR_PAGES = 2 * DEFAULT_CAPACITY  # cycling over more pages than the TLB holds: every access misses


def _rate(step, ops_per_step: int) -> float:
    """Operations per second of `step`, repeated until MIN_SECONDS have passed."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < MIN_SECONDS:
        step()
        done += ops_per_step
    return done / elapsed


def run() -> dict:
    hv = Hypervisor(nr_frames=1 << 14)
    created = hv.toolstack("create_domain", nr_pages=NR_PAGES + 1024)
    domid, info = created["domid"], created["start_info"]
    vcpu = hv.domains[domid].vcpus[0]
    first = PAGE_OFFSET + (info["first_free_pfn"] << PAGE_SHIFT)
    hot = [first + 8 * i for i in range(8)]  # one page: TLB hits after the first access
    pages = [first + (i << PAGE_SHIFT) for i in range(NR_PAGES)]

    def direct():
        for va in hot:
            cpu.store(hv, vcpu, va, 8, cpu.load(hv, vcpu, va, 8) ^ 1)

    def dispatched():
        for va in hot:
            hv.hypercall(domid, 0, "store", va=va, size=8, value=hv.hypercall(domid, 0, "load", va=va, size=8)["value"] ^ 1)

    def misses():
        for va in pages:
            cpu.load(hv, vcpu, va, 8)

    hits = _rate(direct, 2 * len(hot))
    via_dispatch = _rate(dispatched, 2 * len(hot))
    walks = _rate(misses, len(pages))
    return {
        "core.load_store_per_s": {
            "value": hits,
            "unit": "ops/s",
            "what": "alternating 8-byte load and store on TLB hits, cpu.load/cpu.store",
            "via_dispatch_per_s": via_dispatch,
            "target": "> 3e5",
        },
        "core.tlb_miss_walks_per_s": {
            "value": walks,
            "unit": "walks/s",
            "what": f"8-byte loads cycling over {NR_PAGES} pages, twice the TLB's capacity",
            "stale_hits": vcpu.stale_tlb_hits,
        },
    }
