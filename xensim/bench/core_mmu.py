"""Core MMU benchmarks: validation throughput and what pinning buys a cr3 load.

Both work on a Linux-like process tree (1 L4, 1 L3, 4 L2, 64 full L1s of user pages, plus the
shared kernel half), through the core's dispatch but without any transport. Validation is also
measured on a 32-bit PAE guest's tree in the same run (docs/pv32.md): 1 PAE L3, 3 user L2s over
the same 64 full L1s, and the kernel pmd copied into slot 3's own L2, as 32-bit Linux with
shared_kernel_pmd = 0 builds each pgd.
"""

import statistics
import time

from hypervisor.core import Continuation, Hypervisor
from hypervisor.core.abi import L2_SLOT_COMPAT_XEN_FIRST, PAE_XEN_L3_SLOT, PAGE_OFFSET, PAGE_OFFSET_PAE, PAGE_SHIFT, MmuextCmd, Pte

_USER = int(Pte.PRESENT | Pte.RW | Pte.USER | Pte.ACCESSED | Pte.DIRTY)
_TABLE = int(Pte.PRESENT | Pte.RW | Pte.USER | Pte.ACCESSED | Pte.DIRTY)
_RO = int(Pte.PRESENT | Pte.ACCESSED | Pte.DIRTY)
_PAE_PGD = int(Pte.PRESENT)  # 32-bit Linux's pgd entry under PAE (pgd_populate)
NR_L2, L1_PER_L2 = 4, 16


class ProcessTree:
    """A domain with one process pagetable built by hypercalls, tables read-only mapped; `l4`
    is its top level (a PAE L3 for `address_size` 32) and `pin` the command that pins it."""

    def __init__(self, address_size: int = 64):
        self.hv = Hypervisor(nr_frames=1 << 16)
        nr_l1 = NR_L2 * L1_PER_L2
        created = self.hv.toolstack("create_domain", nr_pages=nr_l1 * 512 + 2048, nr_vcpus=1, address_size=address_size)
        self.domid, info = created["domid"], created["start_info"]
        self.domain = self.hv.domains[self.domid]
        self.boot_l4 = info["pt_base_mfn"]
        self.page_offset = PAGE_OFFSET_PAE if address_size == 32 else PAGE_OFFSET
        pfn = iter(range(info["first_free_pfn"], info["nr_pages"]))
        mfn = lambda: int(self.domain.p2m[next(pfn)])  # noqa: E731
        top = mfn()
        l1s = [mfn() for _ in range(nr_l1)]
        for l1 in l1s:
            self._fill(l1, {i: (mfn() << PAGE_SHIFT) | _USER for i in range(512)})
        boot = self.hv.memory.entries(self.boot_l4)
        if address_size == 32:  # L3 slots 0..2 for the user L2s; slot 3 the kernel pmd's own copy
            l2s = [mfn() for _ in range(PAE_XEN_L3_SLOT)]
            kernel_l2 = mfn()
            boot_l2 = self.hv.memory.entries(int(boot[PAE_XEN_L3_SLOT]) >> PAGE_SHIFT & ((1 << 40) - 1))
            self._fill(kernel_l2, {i: int(boot_l2[i]) for i in range(L2_SLOT_COMPAT_XEN_FIRST) if int(boot_l2[i])})
            per_l2 = -(-nr_l1 // len(l2s))
            for i, l2 in enumerate(l2s):
                self._fill(l2, {j: (l1 << PAGE_SHIFT) | _TABLE for j, l1 in enumerate(l1s[i * per_l2 : (i + 1) * per_l2])})
            self._fill(top, {i: (l2 << PAGE_SHIFT) | _PAE_PGD for i, l2 in enumerate([*l2s, kernel_l2])})
            self.tables = [top, *l2s, kernel_l2, *l1s]
            self.pin = MmuextCmd.PIN_L3_TABLE
        else:
            l3 = mfn()
            l2s = [mfn() for _ in range(NR_L2)]
            for i, l2 in enumerate(l2s):
                self._fill(l2, {j: (l1s[i * L1_PER_L2 + j] << PAGE_SHIFT) | _TABLE for j in range(L1_PER_L2)})
            self._fill(l3, {i: (l2 << PAGE_SHIFT) | _TABLE for i, l2 in enumerate(l2s)})
            kernel = {i: int(boot[i]) for i in range(272, 512) if int(boot[i])}
            self._fill(top, {0: (l3 << PAGE_SHIFT) | _TABLE, **kernel})
            self.tables = [top, l3, *l2s, *l1s]
            self.pin = MmuextCmd.PIN_L4_TABLE
        self._make_readonly()
        self.l4 = top
        self.address_size = address_size

    def _fill(self, table: int, entries: dict[int, int]) -> None:
        self.call("mmu_update", reqs=[[(table << PAGE_SHIFT) + 8 * i, v] for i, v in entries.items()])

    def _make_readonly(self) -> None:
        """Remap each table page read-only in the direct map, as Linux does before a pin."""
        m2p = self.hv.m2p
        reqs = []
        for table in self.tables:
            pfn = int(m2p[table])
            l1 = self._direct_l1(pfn)
            reqs.append([(l1 << PAGE_SHIFT) + 8 * (pfn % 512), (table << PAGE_SHIFT) | _RO])
        self.call("mmu_update", reqs=reqs)

    def _direct_l1(self, pfn: int) -> int:
        from hypervisor.core.walk import walk_entries

        mode = self.domain.mode
        return walk_entries(self.hv.memory, self.boot_l4, self.page_offset + (pfn << PAGE_SHIFT), mode)[-1][0]

    def call(self, op: str, **args):
        """A hypercall to its end: one that stops part-way goes on at once, as the server
        makes it go on (between other calls), so the figures include what stopping costs."""
        answer = self.hv.hypercall(self.domid, 0, op, **args)
        while isinstance(answer, Continuation):
            answer = self.hv.resume(self.domid, 0, answer)
        return answer

    def mmuext(self, cmd: MmuextCmd, mfn: int) -> None:
        self.call("mmuext_op", ops=[[int(cmd), mfn, 0]])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_validate(tree: ProcessTree, rounds: int = 15) -> dict:
    """Pin and unpin the tree's top level: `core.validate_entries_per_s` for a 64-bit tree,
    `core.validate_entries_per_s_pv32` for a PAE one."""
    counter = tree.hv.pagetables
    times, entries = [], 0
    for _ in range(rounds):
        before = counter.entries_validated
        times.append(_timed(lambda: tree.mmuext(tree.pin, tree.l4)))
        entries = counter.entries_validated - before
        tree.mmuext(MmuextCmd.UNPIN_TABLE, tree.l4)
    pin = statistics.median(times)
    return {
        f"core.validate_entries_per_s{'_pv32' if tree.address_size == 32 else ''}": {
            "value": entries / pin,
            "address_size": tree.address_size,
            "unit": "entries/s",
            "entries_per_pin": entries,
            "tables_per_pin": len(tree.tables),
            "pin_ms_median": pin * 1e3,
            "target": ">= 5e6",
        }
    }


def bench_cr3(tree: ProcessTree, rounds: int = 15) -> dict:
    """NEW_BASEPTR onto the tree and back to the boot table, unpinned against pinned,
    interleaved round by round so both see the same machine."""

    def switch():
        tree.mmuext(MmuextCmd.NEW_BASEPTR, tree.l4)
        tree.mmuext(MmuextCmd.NEW_BASEPTR, tree.boot_l4)

    unpinned, pinned = [], []
    for _ in range(rounds):
        unpinned.append(_timed(switch))
        tree.mmuext(MmuextCmd.PIN_L4_TABLE, tree.l4)
        pinned.append(_timed(lambda: [switch() for _ in range(20)]) / 20)
        tree.mmuext(MmuextCmd.UNPIN_TABLE, tree.l4)
    u, p = statistics.median(unpinned), statistics.median(pinned)
    return {
        "core.cr3_unpinned_over_pinned": {
            "value": u / p,
            "unit": "ratio",
            "unpinned_us": u * 1e6,
            "pinned_us": p * 1e6,
            "target": ">= 100",
        }
    }


def run() -> dict:
    tree = ProcessTree()
    return {**bench_validate(tree), **bench_validate(ProcessTree(address_size=32)), **bench_cr3(tree)}
