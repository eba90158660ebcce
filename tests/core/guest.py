"""A test guest: a domain on a small machine plus the bookkeeping a guest kernel would keep.

Tests say what they build in guest terms (pfns, virtual addresses, entries) and this turns it
into hypercalls, so each test reads as the protocol it exercises.
"""

import numpy as np

from hypervisor.core import Continuation, Hypervisor
from hypervisor.core.abi import (
    DOMID_SELF,
    EVTCHN_FIFO_CONTROL_HEAD,
    EVTCHN_FIFO_CONTROL_READY,
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_PENDING,
    PAGE_OFFSET,
    PAGE_OFFSET_PAE,
    PAGE_SHIFT,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    MmuCmd,
    MmuextCmd,
    Pte,
    VGCF_in_kernel,
    VGCF_online,
    VMASST_CMD_enable,
    VMASST_TYPE_writable_pagetables,
)
from hypervisor.core.cpu import PageFault

P, RW, US, A, D = (int(f) for f in (Pte.PRESENT, Pte.RW, Pte.USER, Pte.ACCESSED, Pte.DIRTY))
TABLE = P | RW | A | D  # how Linux writes upper-level entries (_KERNPG_TABLE)


def slot(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & 511


class Guest:
    """One domain of `hv`, with a bump allocator over its free pfns."""

    def __init__(self, hv: Hypervisor, nr_pages: int = 2048, nr_vcpus: int = 2, online: int | None = None, ticking: bool = False, **kw):
        """`online`: how many vCPUs (from 0) run, the others left down; all of them by default,
        since only a running vCPU makes calls (sched.check_running). Unless `ticking`, every
        vCPU's periodic timer is stopped at once, as a Linux guest stops it at boot, so that
        only the timers a test arms are armed. VMASST writable_pagetables is on, as Linux
        turns it on at boot (docs/xen.md section 25)."""
        self.hv = hv
        created = hv.toolstack("create_domain", nr_pages=nr_pages, nr_vcpus=nr_vcpus, **kw)
        self.domid = created["domid"]
        self.start_info = created["start_info"]
        self.domain = hv.domains[self.domid]
        self.next_pfn = self.start_info["first_free_pfn"]
        self.local_head: dict[tuple[int, int], int] = {}  # FIFO: (vCPU, queue) -> Linux's q->head
        self.l4 = self.start_info["pt_base_mfn"]  # the boot top level: a PV32 guest's PAE L3
        self.pv32 = self.domain.address_size == 32
        self.page_offset = PAGE_OFFSET_PAE if self.pv32 else PAGE_OFFSET
        self.call("vm_assist", cmd=VMASST_CMD_enable, type=VMASST_TYPE_writable_pagetables)
        if not ticking:
            for vcpu in range(nr_vcpus):
                self.vcpu_op("stop_periodic_timer", vcpu)
        for vcpu in range(1, nr_vcpus if online is None else online):
            self.bring_up(vcpu)

    def bring_up(self, vcpu: int) -> None:
        """Start a secondary vCPU in kernel mode on the boot L4, as Linux's
        cpu_initialize_context does, but with VGCF_online so that it is up at once without a
        wake-up (no kick for the adapter: a fresh guest has nothing to look at)."""
        self.vcpu_op("initialise", vcpu, context={"flags": VGCF_in_kernel | VGCF_online, "ctrlreg3": self.l4})

    # -- memory ------------------------------------------------------------------------------

    def mfn(self, pfn: int) -> int:
        return int(self.domain.p2m[pfn])

    def alloc(self) -> tuple[int, int]:
        """A fresh page: (pfn, mfn). It is mapped writable in the kernel's direct map."""
        pfn = self.next_pfn
        self.next_pfn += 1
        return pfn, self.mfn(pfn)

    def direct_va(self, pfn: int) -> int:
        return self.page_offset + (pfn << PAGE_SHIFT)

    def direct_l1(self, pfn: int) -> tuple[int, int]:
        """(mfn of the boot L1 that maps pfn in the direct map, slot), from the boot layout:
        the L4, one L3, the L2s, then the L1s (PV32: the L3, its one L2, the L1s)."""
        nr_l1 = -(-self.start_info["nr_lowmem_pages"] // 512)
        nr_l2 = -(-nr_l1 // 512)
        pt_base_pfn = (self.start_info["pt_base"] - self.page_offset) >> PAGE_SHIFT
        return self.mfn(pt_base_pfn + (1 if self.pv32 else 2) + nr_l2 + pfn // 512), pfn % 512

    # -- hypercalls as vCPU n ------------------------------------------------------------------

    def call(self, op: str, vcpu: int = 0, **args):
        return self.hv.hypercall(self.domid, vcpu, op, **args)

    def mmu_update(self, *reqs, vcpu: int = 0, foreigndom: int = DOMID_SELF) -> int:
        return self.call("mmu_update", vcpu, reqs=[list(r) for r in reqs], foreigndom=foreigndom)

    def mmuext(self, *ops, vcpu: int = 0, foreigndom: int = DOMID_SELF) -> int:
        return self.call("mmuext_op", vcpu, ops=[[int(c), a1, a2] for c, a1, a2 in (o + (0,) * (3 - len(o)) for o in ops)], foreigndom=foreigndom)

    def set_entry(self, table_mfn: int, index: int, value: int, vcpu: int = 0) -> int:
        return self.mmu_update(((table_mfn << PAGE_SHIFT) + 8 * index, value), vcpu=vcpu)

    def pin(self, level: int, mfn: int, vcpu: int = 0) -> int:
        return self.mmuext((MmuextCmd.PIN_L1_TABLE + level - 1, mfn), vcpu=vcpu)

    def unpin(self, mfn: int, vcpu: int = 0) -> int:
        return self.mmuext((MmuextCmd.UNPIN_TABLE, mfn), vcpu=vcpu)

    def new_baseptr(self, mfn: int, vcpu: int = 0) -> int:
        return self.mmuext((MmuextCmd.NEW_BASEPTR, mfn), vcpu=vcpu)

    def machphys(self, mfn: int, pfn: int, vcpu: int = 0) -> int:
        return self.mmu_update(((mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, pfn), vcpu=vcpu)

    def make_readonly(self, pfn: int) -> None:
        """Drop the direct map's write access to pfn, as a guest does before pinning it."""
        l1, index = self.direct_l1(pfn)
        self.set_entry(l1, index, (self.mfn(pfn) << PAGE_SHIFT) | P | A | D)

    def leave_boot_tree(self, vcpu: int = 0) -> int:
        """Load a fresh empty L4 as the base of `vcpu` and of every other vCPU on the boot L4,
        and unpin the boot L4, so that nothing holds the boot tree any more and each pin of it
        validates the whole tree. Returns the new base."""
        pfn, mfn = self.alloc()
        self.make_readonly(pfn)
        for other, state in enumerate(self.domain.vcpus):
            if other != vcpu and state.guest_table == self.l4:
                assert self.go_on(self.mmuext((MmuextCmd.NEW_BASEPTR, mfn), vcpu=other), other)[0] == 1
        assert self.go_on(self.mmuext((MmuextCmd.NEW_BASEPTR, mfn), (MmuextCmd.UNPIN_TABLE, self.l4), vcpu=vcpu), vcpu)[0] == 2
        return mfn

    def go_on(self, answer, vcpu: int = 0) -> tuple[object, list[dict]]:
        """Resume a call that answered a Continuation until it is over, as the server does:
        (its final result, where each run stopped). Raises its final XenError."""
        stops = []
        while isinstance(answer, Continuation):
            stops.append(answer.summary())
            answer = self.hv.resume(self.domid, vcpu, answer)
        return answer, stops

    def make_writable(self, pfn: int) -> None:
        l1, index = self.direct_l1(pfn)
        self.set_entry(l1, index, (self.mfn(pfn) << PAGE_SHIFT) | P | RW | A | D)

    # -- memory accesses as vCPU n (the dispatch's result, unwrapped) ---------------------------

    def access(self, op: str, vcpu: int = 0, **args):
        """Run a memory access: its value (None for a store or write), or the PageFault."""
        result = self.call(op, vcpu, **args)
        if "fault" in result:
            return PageFault(**result["fault"])
        return next(iter(result.values()), None)

    def load(self, va: int, size: int = 8, vcpu: int = 0, user: bool = False):
        return self.access("load", vcpu, va=va, size=size, user=user)

    def store(self, va: int, value: int, size: int = 8, vcpu: int = 0, user: bool = False):
        return self.access("store", vcpu, va=va, size=size, value=value, user=user)

    def atomic(self, operation: str, va: int, operand: int, size: int = 8, expected: int | None = None, vcpu: int = 0, user: bool = False):
        cmp = {} if expected is None else {"expected": expected}
        return self.access("atomic", vcpu, operation=operation, va=va, size=size, operand=operand, user=user, **cmp)

    def new_data_page(self, value: int) -> tuple[int, int]:
        """A fresh page whose first word holds `value`, written through the direct map."""
        pfn, mfn = self.alloc()
        assert self.store(self.direct_va(pfn), value) is None
        return pfn, mfn

    def vcpumask(self, *vcpus: int) -> int:
        """The virtual address of a vCPU bitmap naming `vcpus`, kept in guest memory as Linux
        keeps an mm's cpumask (what the MULTI flushes read)."""
        pfn, _ = self.alloc()
        assert self.store(self.direct_va(pfn), sum(1 << v for v in vcpus)) is None
        return self.direct_va(pfn)

    # -- building address spaces ------------------------------------------------------------

    def new_table(self, entries: dict[int, int] | None = None) -> tuple[int, int]:
        """A page filled with `entries` (index -> raw value), written while still plain memory."""
        pfn, mfn = self.alloc()
        for index, value in (entries or {}).items():
            self.set_entry(mfn, index, value)
        return pfn, mfn

    def new_pgd(self, user_pages: dict[int, int] | None = None, user_rw: bool = True, kernel: bool = True, l4_entries: dict[int, int] | None = None) -> dict:
        """An L4 with the boot kernel half copied in and a fresh L3/L2/L1 chain mapping
        `user_pages` (va -> mfn), plus any raw `l4_entries` (index -> value) written over them.
        All its table pages are made read-only in the direct map, as Linux does before pinning.
        Returns the tree's mfns and pfns."""
        l1_pfn, l1 = self.new_table(
            {slot(va, 1): (m << PAGE_SHIFT) | P | US | A | D | (RW if user_rw else 0) for va, m in (user_pages or {}).items()}
        )
        any_va = next(iter(user_pages)) if user_pages else 0x400000
        l2_pfn, l2 = self.new_table({slot(any_va, 2): (l1 << PAGE_SHIFT) | TABLE | US})
        l3_pfn, l3 = self.new_table({slot(any_va, 3): (l2 << PAGE_SHIFT) | TABLE | US})
        entries = {slot(any_va, 4): (l3 << PAGE_SHIFT) | TABLE | US}
        if kernel:
            boot = self.hv.memory.entries(self.l4)
            entries.update({i: int(boot[i]) for i in range(272, 512) if int(boot[i]) & P})
        l4_pfn, l4 = self.new_table({**entries, **(l4_entries or {})})
        tree = {"l4": l4, "l3": l3, "l2": l2, "l1": l1, "pfns": [l4_pfn, l3_pfn, l2_pfn, l1_pfn]}
        for pfn in tree["pfns"]:
            self.make_readonly(pfn)
        return tree

    # -- event channels, vCPU and scheduler ops (`caller`: the calling vCPU; the ops' own
    # fields may name a `vcpu`) ------------------------------------------------------------

    def evtchn(self, cmd: str, caller: int = 0, **fields):
        return self.hv.hypercall(self.domid, caller, "event_channel_op", cmd=cmd, **fields)

    def vcpu_op(self, cmd: str, vcpuid: int, caller: int = 0, **fields):
        return self.hv.hypercall(self.domid, caller, "vcpu_op", cmd=cmd, vcpuid=vcpuid, **fields)

    def sched_op(self, cmd: str, caller: int = 0, **fields):
        return self.hv.hypercall(self.domid, caller, "sched_op", cmd=cmd, **fields)

    # -- the shared-info frame, read and written as the guest does through its mapping --------

    def _shared(self, offset: int, size: int = 8) -> int:
        return int.from_bytes(self.hv.memory.read(self.domain.shared_info_mfn, offset, size), "little")

    def _set_shared(self, offset: int, value: int, size: int = 8) -> None:
        self.hv.memory.write(self.domain.shared_info_mfn, offset, value.to_bytes(size, "little"))

    def _port_bit(self, base: int, port: int) -> tuple[int, int]:
        return base + 8 * (port // 64), port % 64

    def pending(self, port: int) -> bool:
        offset, bit = self._port_bit(SHARED_INFO_EVTCHN_PENDING, port)
        return bool(self._shared(offset) >> bit & 1)

    def masked(self, port: int) -> bool:
        offset, bit = self._port_bit(SHARED_INFO_EVTCHN_MASK, port)
        return bool(self._shared(offset) >> bit & 1)

    def mask(self, port: int, masked: bool = True) -> None:
        """Set or clear the port's mask bit, as Linux's mask_evtchn does with sync_set_bit."""
        offset, bit = self._port_bit(SHARED_INFO_EVTCHN_MASK, port)
        word = self._shared(offset)
        self._set_shared(offset, word | 1 << bit if masked else word & ~(1 << bit))

    def clear_pending(self, port: int) -> None:
        offset, bit = self._port_bit(SHARED_INFO_EVTCHN_PENDING, port)
        self._set_shared(offset, self._shared(offset) & ~(1 << bit))

    def pending_sel(self, vcpu: int) -> int:
        return self._shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_PENDING_SEL)

    def upcall_pending(self, vcpu: int) -> int:
        return self._shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_UPCALL_PENDING, 1)

    def upcall_mask(self, vcpu: int) -> int:
        return self._shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_UPCALL_MASK, 1)

    def set_upcall_mask(self, vcpu: int, value: int) -> None:
        self._set_shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_UPCALL_MASK, value, 1)

    def ack_upcall(self, vcpu: int) -> None:
        """What an upcall handler does first: clear upcall-pending and take the selector."""
        self._set_shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_UPCALL_PENDING, 0, 1)
        self._set_shared(VCPU_INFO_SIZE * vcpu + VCPU_INFO_PENDING_SEL, 0)

    # -- FIFO event words and control blocks (docs/xen.md section 24), read and written as the
    # guest does through its own mappings of the pages it gave Xen (found here from Xen's record)

    def _u32(self, mfn: int) -> np.ndarray:
        return self.hv.memory.frame(mfn).view(np.uint32)

    def fifo_word(self, port: int) -> int:
        page, index = divmod(port, 1024)
        return self._u32(self.domain.evtchn_fifo.event_array[page]).item(index)

    def set_fifo_word(self, port: int, value: int) -> None:
        page, index = divmod(port, 1024)
        self._u32(self.domain.evtchn_fifo.event_array[page])[index] = value

    def fifo_consume(self, vcpu: int, limit: int = 4096) -> list[int]:
        """Linux's __evtchn_fifo_handle_events on `vcpu`: xchg `ready`, then consume_one_event
        from the highest-priority ready queue (its local head, or the control block's head
        when that is 0; clear_linked; follow the old LINK) until none is ready. Returns the
        ports handled (pending and unmasked), each acked (PENDING cleared) as its handler
        would be. A queue longer than `limit` is a cycle, which Xen must never link."""
        efv = self.domain.evtchn_fifo.vcpus[vcpu]
        control, base = self._u32(efv.control_mfn), efv.offset // 4
        ready_at, head_at = base + EVTCHN_FIFO_CONTROL_READY // 4, base + EVTCHN_FIFO_CONTROL_HEAD // 4
        handled = []
        ready = control.item(ready_at)
        control[ready_at] = 0
        for _ in range(limit):
            if not ready:
                return handled
            q = (ready & -ready).bit_length() - 1
            port = self.local_head.get((vcpu, q), 0) or control.item(head_at + q)
            word = self.fifo_word(port)
            self.set_fifo_word(port, word & ~((1 << EVTCHN_FIFO_LINKED) | EVTCHN_FIFO_LINK_MASK))
            self.local_head[(vcpu, q)] = word & EVTCHN_FIFO_LINK_MASK
            if not word & EVTCHN_FIFO_LINK_MASK:
                ready &= ~(1 << q)
            word = self.fifo_word(port)
            if word >> EVTCHN_FIFO_PENDING & 1 and not word >> EVTCHN_FIFO_MASKED & 1:
                self.set_fifo_word(port, word & ~(1 << EVTCHN_FIFO_PENDING))
                handled.append(port)
            ready |= control.item(ready_at)
            control[ready_at] = 0
        raise AssertionError(f"dom{self.domid} vCPU {vcpu}: a FIFO queue longer than {limit} events: a cycle")
