"""Random, partly hostile hypercalls from three domains of three vCPUs, each 64-bit or 32-bit
PAE (a mixed machine, docs/pv32.md); audit after every step.

Rules are hypercalls (bad levels, foreign frames, writable mappings of tables, double pins,
unpins of unpinned frames, Xen's reserved slots, stray commands, foreign-domain tricks), and
garbage left in frames before they become tables: arbitrary words and words that look like
entries naming another domain's frames, Xen's frames or frames past the end of RAM, in any
slot, Xen's L4 slots 256..271 included. Invariants: audit finds nothing, of the machine or of
any one domain (its reachability check included: no translation of any base, pin or TLB
reaches a frame its domain may not; its frame counts per owner included),
every access to Xen's range (a 32-bit guest's hole) faults, no exception but XenError (or VcpuNotRunning, for a vCPU
that is down or of a domain that shut down) escapes, and a call that fails before committing
any entry leaves the model exactly as it was. Domains are destroyed and re-created along the
way, so destruction is exercised from random states. The work budget is drawn small, so long
calls stop part-way (preempt.py): a call that answers a continuation is left in its vCPU while
other rules run, then goes on before that vCPU's next call (or when a rule says so; not while
the vCPU is down, as in Xen), or is given up, as a vCPU process that dies in it does.

CI runs a few hundred examples and prints how many hypercalls they made and how fast; README
says how to run a million. XENSIM_STATEFUL_EXAMPLES sets the number of examples.
"""

import os
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from hypervisor.core import Continuation, Hypervisor, VcpuNotRunning, XenError, audit, audit_domain
from hypervisor.core.abi import (
    DOMID_IO,
    DOMID_SELF,
    DOMID_XEN,
    HYPERVISOR_COMPAT_VIRT_START,
    HYPERVISOR_L4_FIRST,
    HYPERVISOR_L4_LAST,
    HYPERVISOR_VIRT_END,
    HYPERVISOR_VIRT_START,
    INVALID_MFN,
    PAGE_OFFSET_PAE,
    PAGE_SHIFT,
    RO_MPT_VIRT_START,
    MmuCmd,
    MmuextCmd,
    Pte,
)
from hypervisor.core.hypervisor import HYPERCALLS, RESERVED_FRAMES
from hypervisor.core.trace import state_digest

from .guest import Guest
from .test_pv32 import pae_pgd

FLAG_SETS = st.lists(st.sampled_from([int(f) for f in Pte if f.bit_count() == 1]), max_size=5).map(lambda fs: sum(set(fs)))
TABLE_FLAGS = st.sampled_from([int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY), int(Pte.PRESENT | Pte.ACCESSED)])
SLOTS = st.one_of(st.sampled_from([0, 1, 255, 256, 258, 271, 272, 511]), st.integers(0, 511))
XEN_SLOTS = st.integers(HYPERVISOR_L4_FIRST, HYPERVISOR_L4_LAST)
NR_DOMAINS = 3
NR_VCPUS = 3
WHO = st.integers(0, NR_DOMAINS - 1)  # also a peer: a domain naming itself by number is a case too
VCPU = st.integers(0, NR_VCPUS - 1)
ONLINE = 2  # vCPUs running from the start; the last is left down for VCPUOP_initialise and up
NR_PAGES = 160
POOL = range(NR_PAGES - 8, NR_PAGES)  # pfns only the balloon rules use, so other rules never meet a given-back pfn
NR_FRAMES = 1 << 12
# Addresses in Xen's range: its first and last word, the linear map over the boot L3 (present
# all the way down), and the per-domain and direct-map slots.
XEN_VAS = [HYPERVISOR_VIRT_START, 0xFFFF810000000000 | 272 << 30, 0xFFFF820000000000, 0xFFFF830000001000, HYPERVISOR_VIRT_END - 8]
# A 32-bit guest's hole (docs/pv32.md section 2): the compat M2P's first word, its last page,
# and past it; and its direct map.
HOLE_VAS = [HYPERVISOR_COMPAT_VIRT_START, HYPERVISOR_COMPAT_VIRT_START + 0x1FF000, 0xFFFFFFF8]
PAE_VAS = [PAGE_OFFSET_PAE, PAGE_OFFSET_PAE + 0x12008]
ADDRESS_SIZES = st.lists(st.sampled_from([64, 32]), min_size=NR_DOMAINS, max_size=NR_DOMAINS)
ENTRY_FLAGS = st.one_of(
    st.sampled_from([int(Pte.PRESENT | Pte.RW | Pte.USER | Pte.ACCESSED | Pte.DIRTY), int(Pte.PRESENT | Pte.USER | Pte.ACCESSED)]),
    FLAG_SETS,
)


def garbage(frames: Bundle) -> st.SearchStrategy[int]:
    """Words a hostile guest leaves in a frame: anything, or an entry naming a frame it knows
    (its own, another domain's, a forged chain), one of Xen's, or one past the end of RAM."""
    mfn = st.one_of(frames, st.integers(0, RESERVED_FRAMES - 1), st.integers(NR_FRAMES, (1 << 40) - 1))
    entry = st.builds(lambda m, f: (m << PAGE_SHIFT | f) & 0xFFFFFFFFFFFFFFFF, mfn, ENTRY_FLAGS)
    return st.one_of(entry, st.integers(0, 2**64 - 1))


class HostileGuests(RuleBasedStateMachine):
    issued = 0  # hypercalls made by every example so far (HYPERCALLS ops, as the core counts them)
    frames = Bundle("frames")
    tables = Bundle("tables")
    ports = Bundle("ports")

    @initialize(target=frames, budget=st.sampled_from([64, 128, 256, 512, 1 << 13]), sizes=ADDRESS_SIZES)
    def boot(self, budget, sizes):
        self.hv = Hypervisor(nr_frames=NR_FRAMES, preempt_work=budget)
        self.parked: dict[tuple[int, int], Continuation] = {}  # (who, vCPU) -> the call it is in
        self.roots: list[list[int]] = [[] for _ in range(NR_DOMAINS)]  # each guest's top-level tables from build_tree
        self.sizes = sizes
        self.guests = [self.new_guest(who) for who in range(NR_DOMAINS)]
        interesting = {0, 5, self.hv.nr_frames - 1, self.hv.nr_frames + 3}
        for g in self.guests:
            interesting |= {g.mfn(pfn) for pfn in range(g.start_info["first_free_pfn"] + 8)}
        return multiple(*sorted(interesting))

    def new_guest(self, who: int) -> Guest:
        return Guest(self.hv, nr_pages=NR_PAGES, nr_vcpus=NR_VCPUS, online=ONLINE, address_size=self.sizes[who])

    def attempt(self, who: int, op: str, caller: int = 0, **args):
        """Run a hypercall as guest `who`, after the call its vCPU is in; a failure that
        committed nothing changed nothing (unless the vCPU first finished tearing down what a
        call it gave up left, as put_old_guest_table does). A continuation stays parked in
        the vCPU."""
        guest = self.guests[who]
        self.go_on(who, caller)
        before = state_digest(self.hv)
        inherited = bool(guest.domain.vcpus[caller].old_guest_tables)
        try:
            answer = self.hv.hypercall(guest.domid, caller, op, **args)
        except VcpuNotRunning as e:  # the caller is down or its domain shut down
            assert state_digest(self.hv) == before, f"{op} of a stopped vCPU changed the model: {e}"
            return e
        except XenError as e:
            partial = e.done not in (None, 0) or (op == "update_va_mapping" and e.errno.name == "EFAULT")
            if not partial and not inherited:
                assert state_digest(self.hv) == before, f"failed {op} changed the model: {e}"
            return e
        if isinstance(answer, Continuation):
            self.parked[(who, caller)] = answer
        return answer

    def go_on(self, who: int, vcpu: int, steps: int | None = None):
        """Go on with the call the vCPU is in (for `steps` runs, or to its end): its outcome."""
        answer = self.parked.pop((who, vcpu), None)
        while isinstance(answer, Continuation) and steps != 0:
            try:
                answer = self.hv.resume(self.guests[who].domid, vcpu, answer)
            except VcpuNotRunning as e:  # the call waits in its vCPU until it runs again
                self.parked[(who, vcpu)] = answer
                return e
            except XenError as e:
                return e
            steps = None if steps is None else steps - 1
        if isinstance(answer, Continuation):
            self.parked[(who, vcpu)] = answer
        return answer

    # -- building blocks a guest would use ---------------------------------------------------

    @rule(target=frames, who=WHO, leaves=st.lists(garbage(frames), min_size=1, max_size=4))
    def forge_chain(self, who, leaves):
        """The issue's attack material: an L3 -> L2 -> L1 chain of the guest's own plain pages,
        all entries USER and writable, whose L1 holds `leaves` (often entries naming another
        domain's frames, Xen's, or frames past RAM). Nothing checks plain pages; what matters
        is that no validated table ever lets a walk into it."""
        guest = self.guests[who]
        if guest.next_pfn + 4 >= POOL.start:
            guest.next_pfn = guest.start_info["first_free_pfn"] + 8
        table = int(Pte.PRESENT | Pte.RW | Pte.USER | Pte.ACCESSED | Pte.DIRTY)
        try:
            _, l1 = guest.new_table(dict(enumerate(leaves)))
            _, l2 = guest.new_table({i: l1 << PAGE_SHIFT | table for i in range(4)})
            _, l3 = guest.new_table({i: l2 << PAGE_SHIFT | table for i in range(4)})
        except VcpuNotRunning:  # its vCPU 0 was taken down: it writes nothing
            return multiple()
        except XenError:  # a page it took was one the guest gave back to Xen (balloon_out)
            return multiple()
        return l3

    @rule(target=tables, who=WHO, mapped=st.booleans(), junk=st.dictionaries(st.one_of(XEN_SLOTS, SLOTS), garbage(frames), max_size=6))
    def build_tree(self, who, mapped, junk):
        """A process tree whose L4 also holds `junk`, left there before it is pinned or loaded:
        in Xen's slots it must be accepted and clobbered, elsewhere it mostly fails validation."""
        guest = self.guests[who]
        if guest.next_pfn + 6 >= POOL.start:
            guest.next_pfn = guest.start_info["first_free_pfn"] + 8
        data = {0x400000: guest.alloc()[1]} if mapped else None
        try:
            if guest.pv32:  # a PAE pgd, its junk left in the L3 (entries 4.. are zeroed, the rest mostly fail)
                tree = pae_pgd(guest, data)
                for slot, value in junk.items():
                    self.hv.memory.frame(tree["l3"])[slot] = value
                tree["l4"] = tree["l3"]
            else:
                tree = guest.new_pgd(data, l4_entries=junk)
        except (XenError, VcpuNotRunning):
            return multiple()
        self.roots[who].append(tree["l4"])
        return multiple(*(tree[k] for k in ("l4", "l3", "l2", "l1", "kernel_l2") if k in tree))

    @rule(who=WHO, frame=st.one_of(tables, frames), words=st.dictionaries(st.one_of(XEN_SLOTS, SLOTS), garbage(frames), min_size=1, max_size=8))
    def scribble(self, who, frame, words):
        """Raw writes into a frame: plain memory (a table not live is plain too), or a checked
        update of a live table, which refuses Xen's slots."""
        self.attempt(who, "mmu_update", reqs=[[(frame << PAGE_SHIFT) + 8 * slot, value] for slot, value in words.items()])

    @rule(who=WHO, mfn=frames)
    def make_readonly(self, who, mfn):
        """Drop the direct map's write access to a frame (the guest's own, or not), so that it
        may be pinned with whatever it holds."""
        guest = self.guests[who]
        pfn = int(self.hv.m2p[mfn]) if mfn < NR_FRAMES else -1
        if 0 <= pfn < NR_PAGES:
            l1, index = guest.direct_l1(pfn)
            self.attempt(who, "mmu_update", reqs=[[(l1 << PAGE_SHIFT) + 8 * index, mfn << PAGE_SHIFT | int(Pte.PRESENT | Pte.ACCESSED)]])

    @rule(who=WHO, table=st.one_of(tables, frames), slot=SLOTS, to=st.one_of(tables, frames), flags=FLAG_SETS, cmd=st.sampled_from([0, 0, 0, 1, 2, 3, 5]))
    def mmu_update(self, who, table, slot, to, flags, cmd):
        value = (to << PAGE_SHIFT | flags) & 0xFFFFFFFFFFFFFFFF
        self.attempt(who, "mmu_update", reqs=[[(table << PAGE_SHIFT) + 8 * slot + cmd, value]])

    @rule(who=WHO, table=tables, slot=SLOTS, to=tables, flags=TABLE_FLAGS)
    def link_tables(self, who, table, slot, to, flags):
        self.attempt(who, "mmu_update", reqs=[[(table << PAGE_SHIFT) + 8 * slot, to << PAGE_SHIFT | flags]])

    @rule(who=WHO, level=st.integers(1, 4), mfn=st.one_of(tables, frames), foreign=st.booleans(), peer=WHO)
    def pin(self, who, level, mfn, foreign, peer):
        fd = self.guests[peer].domid if foreign else DOMID_SELF
        self.attempt(who, "mmuext_op", ops=[[MmuextCmd.PIN_L1_TABLE + level - 1, mfn, 0]], foreigndom=fd)

    @rule(who=WHO, vcpu=VCPU, pick=st.integers(0, 7), pairs=st.integers(1, 3))
    def pin_unpin_pairs(self, who, vcpu, pick, pairs):
        """Issue 10's attack in small, on one of the guest's own trees: each pin validates the
        tree, each unpin devalidates it, so long calls stop inside trees."""
        roots = self.roots[who] or [self.guests[who].l4]
        top = roots[pick % len(roots)]
        pin = MmuextCmd.PIN_L3_TABLE if self.guests[who].pv32 else MmuextCmd.PIN_L4_TABLE
        self.attempt(who, "mmuext_op", vcpu, ops=[[pin, top, 0], [MmuextCmd.UNPIN_TABLE, top, 0]] * pairs)

    @rule(who=WHO, mfn=st.one_of(tables, frames))
    def unpin(self, who, mfn):
        self.attempt(who, "mmuext_op", ops=[[MmuextCmd.UNPIN_TABLE, mfn, 0]])

    @rule(who=WHO, vcpu=VCPU, mfn=st.one_of(tables, frames), user=st.booleans())
    def new_baseptr(self, who, vcpu, mfn, user):
        cmd = MmuextCmd.NEW_USER_BASEPTR if user else MmuextCmd.NEW_BASEPTR
        self.attempt(who, "mmuext_op", vcpu, ops=[[cmd, mfn, 0]])

    @rule(who=WHO, vcpu=VCPU, cmd=st.sampled_from(list(MmuextCmd) + [14, 40]), arg1=st.one_of(tables, frames), arg2=st.one_of(frames, st.sampled_from(XEN_VAS), st.integers(0, 2**64 - 1)))
    def any_mmuext(self, who, vcpu, cmd, arg1, arg2):
        self.attempt(who, "mmuext_op", vcpu, ops=[[int(cmd), arg1, arg2]])

    @rule(who=WHO, vcpu=VCPU, va=st.sampled_from([0x400000, 0x401000, 0xFFFF880000000000, 0xFFFF880000010000, *XEN_VAS, *PAE_VAS, *HOLE_VAS]), to=st.one_of(tables, frames), flags=FLAG_SETS, uvmf=st.sampled_from([0, 1, 2, 3, 4, 6, 8, XEN_VAS[1]]))
    def update_va_mapping(self, who, vcpu, va, to, flags, uvmf):
        outcome = self.attempt(who, "update_va_mapping", vcpu, va=va, val=(to << PAGE_SHIFT | flags) & 0xFFFFFFFFFFFFFFFF, flags=uvmf)
        if (va in XEN_VAS or (self.guests[who].pv32 and va in HOLE_VAS)) and not isinstance(outcome, VcpuNotRunning):
            assert isinstance(outcome, XenError) and outcome.errno.name == "EINVAL", outcome

    @rule(who=WHO, mfn=frames, pfn=st.integers(0, NR_PAGES + 2), fd=st.sampled_from([DOMID_SELF, DOMID_IO, DOMID_XEN, 0x1234, "peer"]), peer=WHO)
    def machphys_update(self, who, mfn, pfn, fd, peer):
        fd = self.guests[peer].domid if fd == "peer" else fd
        self.attempt(who, "mmu_update", reqs=[[(mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, pfn]], foreigndom=fd)

    @rule(who=WHO, mfns=st.lists(st.one_of(tables, frames), min_size=1, max_size=4))
    def multicall(self, who, mfns):
        calls = [{"op": "mmuext_op", "args": {"ops": [[MmuextCmd.PIN_L4_TABLE, m, 0]]}} for m in mfns]
        calls.append({"op": "multicall", "args": {"calls": []}})
        results = self.attempt(who, "multicall", calls=calls)
        if isinstance(results, Continuation):
            results = self.go_on(who, 0)
        assert isinstance(results, VcpuNotRunning) or results[-1]["errno"] == "EINVAL"

    # -- event channels, vCPU ops and memory accesses, across both domains -------------------

    @rule(target=ports, who=WHO, to_other=st.booleans(), vcpu=VCPU, peer=WHO)
    def open_port(self, who, to_other, vcpu, peer):
        other = self.guests[peer].domid if to_other else DOMID_SELF
        outcome = self.attempt(who, "event_channel_op", cmd="alloc_unbound", remote_dom=other)
        ipi = self.attempt(who, "event_channel_op", cmd="bind_ipi", vcpu=vcpu)
        return multiple(*[p for p in (outcome, ipi) if isinstance(p, int)])

    @rule(target=ports, who=WHO, port=ports, peer=WHO)
    def bind_interdomain(self, who, port, peer):
        outcome = self.attempt(who, "event_channel_op", cmd="bind_interdomain", remote_dom=self.guests[peer].domid, remote_port=port)
        return multiple(outcome) if isinstance(outcome, int) else multiple()

    @rule(who=WHO, vcpu=VCPU, cmd=st.sampled_from(["send", "close", "unmask", "status", "bind_vcpu"]), port=st.one_of(ports, st.integers(0, 5000)), target_vcpu=st.integers(0, NR_VCPUS))
    def port_op(self, who, vcpu, cmd, port, target_vcpu):
        fields = {"port": port} if cmd != "bind_vcpu" else {"port": port, "vcpu": target_vcpu}
        self.attempt(who, "event_channel_op", vcpu, cmd=cmd, **fields)

    @rule(who=WHO, caller=VCPU, cmd=st.sampled_from(["initialise", "up", "down", "is_up"]), vcpuid=st.integers(0, NR_VCPUS), cr3=st.one_of(tables, frames))
    def vcpu_op(self, who, caller, cmd, vcpuid, cr3):
        fields = {"context": {"flags": 1, "ctrlreg3": cr3, "ctrlreg1": 0, "rip": 0x1000, "rsp": 0x2000}} if cmd == "initialise" else {}
        self.attempt(who, "vcpu_op", caller, cmd=cmd, vcpuid=vcpuid, **fields)

    @rule(who=WHO, vcpu=VCPU, op=st.sampled_from(["load", "store", "atomic", "read", "write"]), va=st.sampled_from([0x400000, 0x400ff8, 0xFFFF880000000000, 0xFFFF880000012008, 0x7, *XEN_VAS, *PAE_VAS, *HOLE_VAS]), user=st.booleans())
    def memory_access(self, who, vcpu, op, va, user):
        args = {"va": va, "user": user}
        if op in ("load", "store", "atomic"):
            args["size"] = 8
        if op == "store":
            args["value"] = 0x1234
        elif op == "atomic":
            args.update(operation="cmpxchg", operand=0x67, expected=0)
        elif op == "read":
            args["length"] = 8
        elif op == "write":
            args["data"] = b"\xff" * 8
        outcome = self.attempt(who, op, vcpu, **args)
        if isinstance(outcome, VcpuNotRunning):
            return
        if self.guests[who].pv32:
            self.check_hole(op, va, user, outcome)
        elif va in XEN_VAS:
            if va == RO_MPT_VIRT_START and op in ("load", "read") and "fault" not in outcome:
                # the read-only M2P, mapped in a kernel base (docs/xen.md section 22): mfn 0's entry
                value = outcome.get("value", int.from_bytes(outcome.get("data", b""), "little"))
                assert value == int(self.hv.m2p[0]), f"{op} of the read-only M2P: {outcome}"
            else:
                assert isinstance(outcome, dict) and "fault" in outcome, f"{op} at {va:#x} in Xen's range: {outcome}"

    def check_hole(self, op, va, user, outcome):
        """A 32-bit guest's access past 4 GiB is no address (EINVAL); in its hole it faults,
        but for a kernel read of the compat M2P, which gets the M2P's low words."""
        if va >> 32:
            assert isinstance(outcome, XenError) and outcome.errno.name == "EINVAL", f"{op} at {va:#x} of a 32-bit guest: {outcome}"
        elif va >= HYPERVISOR_COMPAT_VIRT_START:
            if op in ("load", "read") and not user and "fault" not in outcome:
                first = (va - HYPERVISOR_COMPAT_VIRT_START) >> 2
                want = sum((int(self.hv.m2p[first + i]) & 0xFFFFFFFF if first + i < NR_FRAMES else 0xFFFFFFFF) << (32 * i) for i in range(2))
                value = outcome.get("value", int.from_bytes(outcome.get("data", b""), "little"))
                assert value == want, f"{op} of the compat M2P at {va:#x}: {outcome}"
            else:
                assert isinstance(outcome, dict) and "fault" in outcome, f"{op} at {va:#x} in a 32-bit guest's hole: {outcome}"

    # -- memory_op (docs/xen.md section 23) ------------------------------------------------------

    @rule(who=WHO, vcpu=VCPU, pfns=st.lists(st.sampled_from(POOL), max_size=4, unique=True), extra=st.lists(st.one_of(tables, frames), max_size=2), order=st.sampled_from([0, 0, 1, 10]), peer=WHO, foreign=st.booleans())
    def balloon_out(self, who, vcpu, pfns, extra, order, peer, foreign):
        """Linux's balloon, hostile in part: unmap pool pages, give them back with frames that
        are not the guest's to give (often in use, another domain's, Xen's, past RAM)."""
        guest = self.guests[who]
        mfns = [guest.mfn(pfn) for pfn in pfns if guest.domain.p2m[pfn] != INVALID_MFN]
        for pfn in pfns:
            if guest.domain.p2m[pfn] != INVALID_MFN:
                l1, index = guest.direct_l1(pfn)
                self.attempt(who, "mmu_update", vcpu, reqs=[[(l1 << PAGE_SHIFT) + 8 * index, 0]])
        domid = self.guests[peer].domid if foreign else DOMID_SELF
        self.attempt(who, "memory_op", vcpu, cmd="decrease_reservation", extent_start=mfns + extra, nr_extents=len(mfns + extra), extent_order=order, domid=domid)

    @rule(who=WHO, vcpu=VCPU, cmd=st.sampled_from(["populate_physmap", "increase_reservation"]), order=st.sampled_from([0, 0, 2, 10]), junk=st.lists(st.integers(0, 2**64 - 1), max_size=2))
    def balloon_in(self, who, vcpu, cmd, order, junk):
        """Take frames again for the pool's empty pfns (and for junk pfns, as a hostile guest
        may), and map them back in the direct map."""
        guest = self.guests[who]
        empty = [pfn for pfn in POOL if guest.domain.p2m[pfn] == INVALID_MFN]
        listed = empty + junk
        answer = self.attempt(who, "memory_op", vcpu, cmd=cmd, extent_start=listed, nr_extents=len(listed), extent_order=order)
        if isinstance(answer, dict) and cmd == "populate_physmap":
            for pfn, mfn in zip(empty, answer["extent_start"][: answer["result"]], strict=False):
                l1, index = guest.direct_l1(pfn)
                self.attempt(who, "mmu_update", vcpu, reqs=[[(l1 << PAGE_SHIFT) + 8 * index, mfn << PAGE_SHIFT | int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY)]])

    @rule(who=WHO, vcpu=VCPU, pfns=st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True), extra=st.lists(st.one_of(tables, frames), max_size=1), out_order=st.sampled_from([0, 1, 2]), forged=st.sampled_from([0, 0, 1, 2**40]))
    def exchange(self, who, vcpu, pfns, extra, out_order, forged):
        """xen_create_contiguous_region on pool pages, with a stray input frame or a forged
        nr_exchanged now and then."""
        guest = self.guests[who]
        ins = [guest.mfn(pfn) for pfn in pfns if guest.domain.p2m[pfn] != INVALID_MFN] + extra
        outs = pfns[: max(1, len(ins) >> out_order)]
        self.attempt(
            who,
            "memory_op",
            vcpu,
            cmd="exchange",
            input={"extent_start": ins, "nr_extents": len(ins)},
            output={"extent_start": outs, "nr_extents": len(outs), "extent_order": out_order},
            nr_exchanged=forged,
        )

    @rule(who=WHO, vcpu=VCPU, cmd=st.sampled_from(["current_reservation", "maximum_reservation", "maximum_ram_page", 5]), peer=WHO)
    def reservation_stats(self, who, vcpu, cmd, peer):
        fields = {} if cmd in ("maximum_ram_page", 5) else {"domid": self.guests[peer].domid}
        self.attempt(who, "memory_op", vcpu, cmd=cmd, **fields)

    @rule(who=WHO, vcpu=VCPU, steps=st.integers(1, 3))
    def resume(self, who, vcpu, steps):
        self.go_on(who, vcpu, steps)

    @rule(who=WHO, vcpu=VCPU)
    def give_up(self, who, vcpu):
        """The vCPU's process died in its call: nobody goes on with it."""
        self.parked.pop((who, vcpu), None)

    @rule(who=WHO)
    def destroy_and_recreate(self, who):
        self.hv.toolstack("destroy_domain", domid=self.guests[who].domid)
        self.parked = {key: answer for key, answer in self.parked.items() if key[0] != who}
        self.roots[who] = []
        self.guests[who] = self.new_guest(who)

    @invariant()
    def audit_is_clean(self):
        """The whole machine's audit (which checks the per-owner frame counts too) and each
        domain's own, which must agree with it (audit.audit_domain)."""
        if hasattr(self, "hv"):
            assert audit(self.hv) == []
            for guest in self.guests:
                assert audit_domain(self.hv, guest.domid) == []

    def teardown(self):
        if hasattr(self, "hv"):
            HostileGuests.issued += sum(n for (op, _), n in self.hv.stats.items() if op in HYPERCALLS)
            for guest in self.guests:
                self.hv.toolstack("destroy_domain", domid=guest.domid)
            assert audit(self.hv) == []
            assert self.hv.allocated_frames() == 16, "destroying every domain must free every frame"


EXAMPLES = int(os.environ.get("XENSIM_STATEFUL_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.timeout(60 + EXAMPLES)
def test_hostile_guests(capsys):
    """The run, and how many hypercalls it made: the figure README's long run is sized by."""
    HostileGuests.issued = 0
    start = time.perf_counter()
    run_state_machine_as_test(HostileGuests, settings=SETTINGS)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nstate machine: {EXAMPLES} examples, {HostileGuests.issued} hypercalls in {elapsed:.1f} s ({HostileGuests.issued / elapsed:.0f}/s)")
    assert HostileGuests.issued >= EXAMPLES
