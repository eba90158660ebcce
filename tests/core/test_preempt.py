"""Preemption: a long hypercall stops at clean, deterministic points and goes on to the end
it reaches when it runs at once.

Xen bounds the work of a hypercall, not its number of operations: do_mmu_update and
do_mmuext_op (xen/arch/x86/mm.c) and do_multicall (xen/common/multicall.c) check
hypercall_preempt_check() between entries, promote_lN_table / demote_lN_table between the
entries of one table (leaving it PGT_partial), and the guest re-issues the rest as one call.
These tests run calls on a core with a budget of two L1s of work, look at what is visible
between two runs (partial tables, which audit clean), and compare the end with a core that
runs the same call at once.
"""

import pytest

from hypervisor.core import Continuation, Hypervisor, XenError, audit
from hypervisor.core.abi import (
    ENTRIES_PER_TABLE,
    PAGE_SHIFT,
    Errno,
    MmuextCmd,
    VGCF_in_kernel,
)
from hypervisor.core.trace import state_digest

from .guest import TABLE, A, D, Guest, P

SMALL = 2 * ENTRIES_PER_TABLE
AT_ONCE = 1 << 40
PAGES = 4096  # a boot tree of 8 L1s, one L2, one L3 and the L4
PIN, UNPIN, FLUSH = MmuextCmd.PIN_L4_TABLE, MmuextCmd.UNPIN_TABLE, MmuextCmd.TLB_FLUSH_LOCAL


def machine(budget: int) -> tuple[Hypervisor, Guest, Guest]:
    """A core with this work budget; a guest whose boot tree nothing holds, its vCPU 1 not
    yet initialised; another domain."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=budget)
    guest, other = Guest(hv, nr_pages=PAGES, online=1), Guest(hv, nr_pages=256)
    guest.leave_boot_tree()
    return hv, guest, other


def at_once_and_preempted(op: str, **args) -> tuple[object, tuple]:
    """The call's answer on a core that runs it at once, and (its first answer, its final
    result, where it stopped, the final state) on a small budget, checked to be the same on
    two such cores and to end in the same state as at once."""
    hv, guest, _ = machine(AT_ONCE)
    expected = guest.call(op, **args)
    runs = []
    for _ in range(2):
        hv2, guest2, _ = machine(SMALL)
        first = guest2.call(op, **args)
        result, stops = guest2.go_on(first)
        assert audit(hv2) == []
        runs.append((first.summary() if isinstance(first, Continuation) else first, result, stops, state_digest(hv2)))
    assert runs[0] == runs[1], "the same calls on the same budget must stop at the same points"
    assert runs[0][3] == state_digest(hv), "going on must end where running at once ends"
    return expected, runs[0]


def test_pin_unpin_batch_stops_at_deterministic_points_and_ends_as_if_run_at_once():
    _, guest, _ = machine(AT_ONCE)
    ops = [[PIN, guest.l4, 0], [UNPIN, guest.l4, 0]] * 4
    expected, (first, result, stops, _) = at_once_and_preempted("mmuext_op", ops=ops)
    assert expected == result == 8
    assert first == {"op": "mmuext_op", "start": 0}  # the first pin stops inside the tree
    assert len(stops) > 8 and {"op": "mmuext_op", "start": 2} in stops


def test_a_pin_stops_inside_the_tree_leaving_it_partial_and_auditing_clean():
    hv, guest, _ = machine(SMALL)
    answer, runs = guest.pin(4, guest.l4), 0
    while isinstance(answer, Continuation):
        assert answer.summary() == {"op": "mmuext_op", "start": 0}  # the pin itself goes on
        info = hv.frame_info(guest.l4)
        assert (info["type"], info["type_count"], info["validated"], info["pinned"]) == ("L4", 1, False, False)
        assert audit(hv) == []
        answer, runs = hv.resume(guest.domid, 0, answer), runs + 1
    assert answer == 1 and runs >= 2
    info = hv.frame_info(guest.l4)
    assert (info["type_count"], info["validated"], info["pinned"]) == (1, True, True)


def test_mmu_update_stops_between_entries_and_inside_the_tree_an_entry_links():
    hv, guest, _ = machine(AT_ONCE)
    base = hv.domains[guest.domid].vcpus[0].guest_table
    _, page = guest.alloc()
    boot_l3 = int(hv.memory.entries(guest.l4)[272]) >> PAGE_SHIFT & ((1 << 40) - 1)
    writes = [[(page << PAGE_SHIFT) + 8 * i, i] for i in range(100)]
    reqs = [*writes, [base << PAGE_SHIFT, boot_l3 << PAGE_SHIFT | TABLE], *writes]
    expected, (first, result, stops, _) = at_once_and_preempted("mmu_update", reqs=reqs)
    assert expected == result == 201
    assert first == {"op": "mmu_update", "start": 31}  # the call's own work and 31 entries' make two L1s

    assert stops.count({"op": "mmu_update", "start": 100}) >= 2  # the linking entry stops inside the tree


def test_an_error_in_a_later_run_reports_the_done_count_of_the_whole_call():
    _, guest, other = machine(SMALL)
    ops = [[PIN, guest.l4, 0], [UNPIN, guest.l4, 0]] * 3 + [[PIN, other.l4, 0]]
    with pytest.raises(XenError) as failed:
        guest.go_on(guest.call("mmuext_op", ops=ops))
    assert (failed.value.errno, failed.value.index, failed.value.done) == (Errno.EINVAL, 6, 6)
    _, page = guest.alloc()
    reqs = [[(page << PAGE_SHIFT) + 8 * (i % 512), i] for i in range(600)] + [[other.l4 << PAGE_SHIFT, 0]]
    first = guest.call("mmu_update", reqs=reqs)
    assert first.summary() == {"op": "mmu_update", "start": 31}
    with pytest.raises(XenError) as failed:
        guest.go_on(first)
    assert (failed.value.errno, failed.value.index, failed.value.done) == (Errno.EINVAL, 600, 600)


def test_a_multicall_goes_on_in_the_entry_it_stopped_in():
    _, guest, other = machine(AT_ONCE)
    calls = [
        {"op": "xen_version", "args": {}},
        {"op": "mmuext_op", "args": {"ops": [[PIN, guest.l4, 0], [UNPIN, guest.l4, 0]]}},
        {"op": "mmuext_op", "args": {"ops": [[PIN, other.l4, 0]]}},
        {"op": "mmuext_op", "args": {"ops": [[PIN, guest.l4, 0]]}},
    ]
    expected, (first, result, stops, _) = at_once_and_preempted("multicall", calls=calls)
    assert result == expected
    assert [r.get("errno") for r in result] == [None, None, "EINVAL", None]
    assert first == {"op": "multicall", "start": 1, "inner": {"op": "mmuext_op", "start": 0}}
    assert {"op": "multicall", "start": 3, "inner": {"op": "mmuext_op", "start": 0}} in stops


def test_an_unpin_answers_once_the_tree_it_devalidates_is_torn_down():
    hv, guest, _ = machine(SMALL)
    guest.go_on(guest.pin(4, guest.l4))
    answer = guest.mmuext((UNPIN, guest.l4), (FLUSH,))
    assert answer.summary() == {"op": "mmuext_op", "start": 1}  # done with the unpin, not with its teardown
    vcpu = hv.domains[guest.domid].vcpus[0]
    assert vcpu.old_guest_tables == [guest.l4]
    info = hv.frame_info(guest.l4)
    assert (info["type_count"], info["validated"], info["pinned"]) == (1, False, False)
    assert audit(hv) == []
    assert guest.go_on(answer)[0] == 2
    assert vcpu.old_guest_tables == [] and hv.frame_info(guest.l4)["type_count"] == 0


def test_a_validation_that_fails_after_stopping_is_torn_down_before_the_call_fails():
    hv, guest, other = machine(SMALL)
    last_l1, slot = guest.direct_l1(PAGES - 1)
    assert guest.set_entry(last_l1, slot, (other.l4 << PAGE_SHIFT) | P | A | D) == 1
    counts = (hv.frames.count.copy(), hv.frames.type_count.copy())
    answer = guest.pin(4, guest.l4)
    assert isinstance(answer, Continuation)
    with pytest.raises(XenError) as failed:
        guest.go_on(answer)
    assert (failed.value.errno, failed.value.done) == (Errno.EBUSY, 0)
    assert f"L1 entry {slot} of mfn {last_l1:#x}" in failed.value.message
    assert (hv.frames.count == counts[0]).all() and (hv.frames.type_count == counts[1]).all()
    assert audit(hv) == [] and hv.domains[guest.domid].vcpus[0].old_guest_tables == []


def test_another_vcpu_takes_over_a_pin_that_stopped_and_the_first_finds_it_pinned():
    hv, guest, _ = machine(SMALL)
    base = hv.domains[guest.domid].vcpus[0].guest_table
    assert guest.vcpu_op("initialise", 1, context={"flags": VGCF_in_kernel, "ctrlreg3": base}) == 0
    assert guest.vcpu_op("up", 1) == 0
    stopped = guest.pin(4, guest.l4)
    assert isinstance(stopped, Continuation)
    assert guest.go_on(guest.pin(4, guest.l4, vcpu=1), vcpu=1)[0] == 1
    with pytest.raises(XenError) as failed:
        guest.go_on(stopped)
    assert (failed.value.errno, failed.value.done) == (Errno.EINVAL, 0) and "already pinned" in failed.value.message
    assert hv.frame_info(guest.l4)["type_count"] == 1 and audit(hv) == []


def test_work_given_up_part_way_stays_consistent_and_destruction_frees_it():
    hv, guest, _ = machine(SMALL)
    guest.go_on(guest.pin(4, guest.l4))
    assert isinstance(guest.unpin(guest.l4), Continuation)  # given up with its teardown pending
    assert audit(hv) == []
    answer = guest.mmuext((FLUSH,))  # the vCPU's next MMU call first goes on with the teardown
    assert guest.go_on(answer)[0] == 1 and hv.frame_info(guest.l4)["type_count"] == 0
    assert isinstance(guest.pin(4, guest.l4), Continuation)  # given up with the tree partial
    assert audit(hv) == []
    for domid in list(hv.domains):
        hv.toolstack("destroy_domain", domid=domid)
    assert audit(hv) == [] and hv.allocated_frames() == 16


def test_vcpu_initialise_on_an_unvalidated_tree_stops_and_goes_on():
    hv, guest, _ = machine(SMALL)
    answer = guest.vcpu_op("initialise", 1, context={"flags": VGCF_in_kernel, "ctrlreg3": guest.l4})
    assert answer.summary() == {"op": "vcpu_op"}
    assert guest.go_on(answer)[0] == 0
    assert hv.domains[guest.domid].vcpus[1].guest_table == guest.l4 and audit(hv) == []


def test_a_continued_call_whose_foreign_domain_died_meanwhile_fails_with_the_entries_done():
    """Each run looks its owners up again (as each of Xen's re-issued calls does); a failure
    there still reports the entries done by the earlier runs."""
    hv, guest, other = machine(SMALL)
    guest.domain.privileged = True
    _, page = guest.alloc()
    first = guest.mmu_update(*[((page << PAGE_SHIFT) + 8 * i, i) for i in range(100)], foreigndom=other.domid)
    assert first.summary() == {"op": "mmu_update", "start": 31}
    hv.toolstack("destroy_domain", domid=other.domid)
    with pytest.raises(XenError) as failed:
        guest.go_on(first)
    assert (failed.value.errno, failed.value.done) == (Errno.ESRCH, 31)


def test_a_preemptible_call_over_at_once_makes_no_continuation(monkeypatch):
    """Most preemptible calls (a TLB flush, one mmu_update) finish in their first run: they
    cost no Continuation, which is made only for a call that stops (the per-call Python path,
    docs/transport.md section 5)."""
    from hypervisor.core import hypervisor as dispatch

    made = []

    class Counted(Continuation):
        def __init__(self, op, *args, **kwargs):
            made.append(op)
            super().__init__(op, *args, **kwargs)

    monkeypatch.setattr(dispatch, "Continuation", Counted)
    _, guest, _ = machine(AT_ONCE)
    assert guest.mmuext((FLUSH,)) == 1
    assert guest.call("multicall", calls=[{"op": "mmuext_op", "args": {"ops": [[int(FLUSH), 0, 0]]}}]) == [{"result": 1}]
    assert made == []
    _, guest, _ = machine(SMALL)  # a call that stops still makes one
    assert isinstance(guest.mmuext((PIN, guest.l4)), Continuation)
    assert made
