"""Random, partly hostile hypercalls from two domains; audit after every step.

Rules are hypercalls (bad levels, foreign frames, writable mappings of tables, double pins,
unpins of unpinned frames, Xen's reserved slots, stray commands, foreign-domain tricks);
invariants: audit finds nothing, no exception but XenError escapes, and a call that fails
before committing any entry leaves the model exactly as it was. Domains are destroyed and
re-created along the way, so destruction is exercised from random states.

CI runs a few hundred examples; run it long with XENSIM_STATEFUL_EXAMPLES=20000.
"""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule

from hypervisor.core import Hypervisor, XenError, audit
from hypervisor.core.abi import DOMID_IO, DOMID_SELF, DOMID_XEN, PAGE_SHIFT, MmuCmd, MmuextCmd, Pte
from hypervisor.core.trace import state_digest

from .guest import Guest

FLAG_SETS = st.lists(st.sampled_from([int(f) for f in Pte if f.bit_count() == 1]), max_size=5).map(lambda fs: sum(set(fs)))
TABLE_FLAGS = st.sampled_from([int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY), int(Pte.PRESENT | Pte.ACCESSED)])
SLOTS = st.one_of(st.sampled_from([0, 1, 255, 256, 258, 271, 272, 511]), st.integers(0, 511))
WHO = st.integers(0, 1)
VCPU = st.integers(0, 1)
NR_PAGES = 160


class HostileGuests(RuleBasedStateMachine):
    frames = Bundle("frames")
    tables = Bundle("tables")

    @initialize(target=frames)
    def boot(self):
        self.hv = Hypervisor(nr_frames=1 << 12)
        self.guests = [Guest(self.hv, nr_pages=NR_PAGES, nr_vcpus=2) for _ in range(2)]
        interesting = {0, 5, self.hv.nr_frames - 1, self.hv.nr_frames + 3}
        for g in self.guests:
            interesting |= {g.mfn(pfn) for pfn in range(g.start_info["first_free_pfn"] + 8)}
        return multiple(*sorted(interesting))

    def attempt(self, who: int, op: str, vcpu: int = 0, **args):
        """Run a hypercall as guest `who`; a failure that committed nothing changed nothing."""
        guest = self.guests[who]
        before = state_digest(self.hv)
        try:
            return self.hv.hypercall(guest.domid, vcpu, op, **args)
        except XenError as e:
            partial = e.done not in (None, 0) or (op == "update_va_mapping" and e.errno.name == "EFAULT")
            if not partial:
                assert state_digest(self.hv) == before, f"failed {op} changed the model: {e}"
            return e

    # -- building blocks a guest would use ---------------------------------------------------

    @rule(target=tables, who=WHO, mapped=st.booleans())
    def build_tree(self, who, mapped):
        guest = self.guests[who]
        if guest.next_pfn + 6 >= NR_PAGES:
            guest.next_pfn = guest.start_info["first_free_pfn"] + 8
        data = {0x400000: guest.alloc()[1]} if mapped else None
        try:
            tree = guest.new_pgd(data)
        except XenError:
            return multiple()
        return multiple(tree["l4"], tree["l3"], tree["l2"], tree["l1"])

    @rule(who=WHO, table=st.one_of(tables, frames), slot=SLOTS, to=st.one_of(tables, frames), flags=FLAG_SETS, cmd=st.sampled_from([0, 0, 0, 1, 2, 3, 5]))
    def mmu_update(self, who, table, slot, to, flags, cmd):
        value = (to << PAGE_SHIFT | flags) & 0xFFFFFFFFFFFFFFFF
        self.attempt(who, "mmu_update", reqs=[[(table << PAGE_SHIFT) + 8 * slot + cmd, value]])

    @rule(who=WHO, table=tables, slot=SLOTS, to=tables, flags=TABLE_FLAGS)
    def link_tables(self, who, table, slot, to, flags):
        self.attempt(who, "mmu_update", reqs=[[(table << PAGE_SHIFT) + 8 * slot, to << PAGE_SHIFT | flags]])

    @rule(who=WHO, level=st.integers(1, 4), mfn=st.one_of(tables, frames), foreign=st.booleans())
    def pin(self, who, level, mfn, foreign):
        fd = self.guests[1 - who].domid if foreign else DOMID_SELF
        self.attempt(who, "mmuext_op", ops=[[MmuextCmd.PIN_L1_TABLE + level - 1, mfn, 0]], foreigndom=fd)

    @rule(who=WHO, mfn=st.one_of(tables, frames))
    def unpin(self, who, mfn):
        self.attempt(who, "mmuext_op", ops=[[MmuextCmd.UNPIN_TABLE, mfn, 0]])

    @rule(who=WHO, vcpu=VCPU, mfn=st.one_of(tables, frames), user=st.booleans())
    def new_baseptr(self, who, vcpu, mfn, user):
        cmd = MmuextCmd.NEW_USER_BASEPTR if user else MmuextCmd.NEW_BASEPTR
        self.attempt(who, "mmuext_op", vcpu, ops=[[cmd, mfn, 0]])

    @rule(who=WHO, vcpu=VCPU, cmd=st.sampled_from(list(MmuextCmd) + [14, 40]), arg1=st.one_of(tables, frames), arg2=st.one_of(frames, st.integers(0, 2**64 - 1)))
    def any_mmuext(self, who, vcpu, cmd, arg1, arg2):
        self.attempt(who, "mmuext_op", vcpu, ops=[[int(cmd), arg1, arg2]])

    @rule(who=WHO, vcpu=VCPU, va=st.sampled_from([0x400000, 0x401000, 0xFFFF880000000000, 0xFFFF880000010000, 0xFFFF800000000000]), to=st.one_of(tables, frames), flags=FLAG_SETS, uvmf=st.sampled_from([0, 1, 2, 3, 4, 6, 8]))
    def update_va_mapping(self, who, vcpu, va, to, flags, uvmf):
        self.attempt(who, "update_va_mapping", vcpu, va=va, val=(to << PAGE_SHIFT | flags) & 0xFFFFFFFFFFFFFFFF, flags=uvmf)

    @rule(who=WHO, mfn=frames, pfn=st.integers(0, NR_PAGES + 2), fd=st.sampled_from([DOMID_SELF, DOMID_IO, DOMID_XEN, 0x1234, "own", "other"]))
    def machphys_update(self, who, mfn, pfn, fd):
        fd = {"own": self.guests[who].domid, "other": self.guests[1 - who].domid}.get(fd, fd)
        self.attempt(who, "mmu_update", reqs=[[(mfn << PAGE_SHIFT) | MmuCmd.MACHPHYS_UPDATE, pfn]], foreigndom=fd)

    @rule(who=WHO, mfns=st.lists(st.one_of(tables, frames), min_size=1, max_size=4))
    def multicall(self, who, mfns):
        calls = [{"op": "mmuext_op", "args": {"ops": [[MmuextCmd.PIN_L4_TABLE, m, 0]]}} for m in mfns]
        calls.append({"op": "multicall", "args": {"calls": []}})
        results = self.attempt(who, "multicall", calls=calls)
        assert results[-1]["errno"] == "EINVAL"

    @rule(who=WHO)
    def destroy_and_recreate(self, who):
        self.hv.toolstack("destroy_domain", domid=self.guests[who].domid)
        self.guests[who] = Guest(self.hv, nr_pages=NR_PAGES, nr_vcpus=2)

    @invariant()
    def audit_is_clean(self):
        if hasattr(self, "hv"):
            assert audit(self.hv) == []

    def teardown(self):
        if hasattr(self, "hv"):
            for guest in self.guests:
                self.hv.toolstack("destroy_domain", domid=guest.domid)
            assert audit(self.hv) == []
            assert self.hv.allocated_frames() == 16, "destroying every domain must free every frame"


HostileGuests.TestCase.settings = settings(
    max_examples=int(os.environ.get("XENSIM_STATEFUL_EXAMPLES", "200")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHostileGuests = HostileGuests.TestCase
