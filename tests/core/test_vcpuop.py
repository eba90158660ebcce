"""VCPUOP (docs/xen.md section 14): initialise, up, down, is_up; every errno row, the base
references initialise takes (as NEW_BASEPTR does) and keeps across down; and the rule that a
vCPU Xen does not run (down, or of a domain that shut down) makes no calls."""

import pytest

from hypervisor.core.abi import DOMID_SELF, Errno, MmuextCmd, SHUTDOWN_crash, SHUTDOWN_poweroff, VGCF_in_kernel, VGCF_online

from .conftest import fails_with as fails  # the errno, and nothing changed
from .conftest import refused
from .guest import Guest

RIP, RSP = 0xFFFFFFFF81000000, 0xFFFF880000123000


@pytest.fixture
def guest(hv):
    """A guest whose vCPU 1 is still down and uninitialised, as the domain builder leaves it."""
    return Guest(hv, online=1)


@pytest.fixture
def other(hv):
    return Guest(hv, online=1)


def context(guest, l4=None, **kw):
    """The context Linux's cpu_initialize_context passes: kernel mode, swapper's L4."""
    return {"flags": VGCF_in_kernel, "ctrlreg3": guest.l4 if l4 is None else l4, "rip": RIP, "rsp": RSP, **kw}


def refs(hv, mfn):
    info = hv.frame_info(mfn)
    return info["count"], info["type_count"]


def test_secondary_vcpus_start_down_and_uninitialised(guest):
    assert [guest.vcpu_op("is_up", n) for n in (0, 1)] == [1, 0]
    assert not guest.domain.vcpus[1].initialised


def test_initialise_takes_the_base_references_then_up_starts_the_vcpu(hv, guest):
    before = refs(hv, guest.l4)
    assert guest.vcpu_op("initialise", 1, context=context(guest)) == 0
    vcpu = guest.domain.vcpus[1]
    assert (vcpu.initialised, vcpu.guest_table, vcpu.rip, vcpu.rsp, vcpu.vgc_flags) == (True, guest.l4, RIP, RSP, VGCF_in_kernel)
    assert refs(hv, guest.l4) == (before[0] + 1, before[1] + 1)
    assert guest.vcpu_op("is_up", 1) == 0 and hv.take_kicks() == []
    assert guest.vcpu_op("up", 1) == 0
    assert guest.vcpu_op("is_up", 1) == 1 and hv.take_kicks() == [(guest.domid, 1)]
    assert guest.vcpu_op("up", 1) == 0 and hv.take_kicks() == []  # already up: no wake


def test_initialise_validates_an_unpinned_tree_like_new_baseptr(hv, guest):
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.vcpu_op("initialise", 1, context=context(guest, tree["l4"], ctrlreg1=tree["l4"]))
    info = hv.frame_info(tree["l4"])
    assert (info["type"], info["validated"], info["type_count"], info["pinned"]) == ("L4", True, 2, False)
    assert hv.frame_info(tree["l1"])["validated"]


def test_vcpu_with_online_flag_is_up_without_a_wake(hv, guest):
    guest.vcpu_op("initialise", 1, context=context(guest, flags=VGCF_in_kernel | VGCF_online))
    assert guest.vcpu_op("is_up", 1) == 1 and hv.take_kicks() == []


def test_initialise_twice_is_eexist(hv, guest):
    guest.vcpu_op("initialise", 1, context=context(guest))
    with fails(hv, Errno.EEXIST, match="already initialised"):
        guest.vcpu_op("initialise", 1, context=context(guest))
    with fails(hv, Errno.EEXIST):  # vCPU 0 was initialised by the builder
        guest.vcpu_op("initialise", 0, context=context(guest))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rip": 0x0000800000000000}, "rip 0x800000000000 is not canonical"),
        ({"rsp": 0xFFFF7FFFFFFFFFFF}, "rsp 0xffff7fffffffffff is not canonical"),
        ({"flags": 0}, "without a user pagetable"),
        ({"ctrlreg3": 0}, "ctrlreg3: mfn 0x0 is owned by dom32754"),
    ],
)
def test_initialise_context_errors_are_einval(hv, guest, change, match):
    with fails(hv, Errno.EINVAL, match=match):
        guest.vcpu_op("initialise", 1, context=context(guest, **change))


def test_initialise_with_a_cr3_the_domain_does_not_own_is_einval(hv, guest, other):
    with fails(hv, Errno.EINVAL, match=f"not owned by dom{guest.domid}"):
        guest.vcpu_op("initialise", 1, context=context(guest, other.l4))


def test_initialise_with_a_writable_frame_as_cr3_is_einval(hv, guest):
    _, data = guest.alloc()  # mapped RW in the direct map: type WRITABLE
    with fails(hv, Errno.EINVAL, match="ctrlreg3"):
        guest.vcpu_op("initialise", 1, context=context(guest, data))


def test_a_bad_user_cr3_rolls_the_kernel_reference_back(hv, guest):
    _, data = guest.alloc()
    before = refs(hv, guest.l4)
    with fails(hv, Errno.EINVAL, match="ctrlreg1"):
        guest.vcpu_op("initialise", 1, context=context(guest, ctrlreg1=data))
    assert refs(hv, guest.l4) == before and guest.domain.vcpus[1].guest_table == 0


REFUSED_BASES = {
    # (ctrlreg3, ctrlreg1): errno and message. "tree" is an unpinned tree that only this call
    # would validate; "user" maps the tree's L1 writable, fine alone but not beside "tree".
    ("tree", "data"): (Errno.EINVAL, "ctrlreg1: "),
    ("tree", "other's l4"): (Errno.EINVAL, "ctrlreg1: "),
    ("tree", "user"): (Errno.EBUSY, "ctrlreg1: "),
    ("data", "tree"): (Errno.EINVAL, "ctrlreg3: "),
}


@pytest.mark.parametrize("bases", REFUSED_BASES, ids=" and ".join)
def test_a_refused_initialise_changes_nothing(hv, guest, other, bases):
    """Every base is checked before either is committed: the unpinned tree stays unvalidated."""
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    frames = {"tree": tree["l4"], "data": guest.alloc()[1], "other's l4": other.l4}
    frames["user"] = guest.new_pgd({0x400000: tree["l1"]}, kernel=False)["l4"]
    errno, match = REFUSED_BASES[bases]
    with fails(hv, errno, match=match):
        guest.vcpu_op("initialise", 1, context=context(guest, frames[bases[0]], ctrlreg1=frames[bases[1]]))
    assert hv.frame_info(tree["l4"])["type_count"] == 0 and not guest.domain.vcpus[1].initialised


def test_up_of_an_uninitialised_vcpu_is_einval(hv, guest):
    with fails(hv, Errno.EINVAL, match="not initialised"):
        guest.vcpu_op("up", 1)


@pytest.mark.parametrize("cmd", ["initialise", "up", "down", "is_up", "get_runstate_info"])
def test_a_vcpuid_that_does_not_exist_is_enoent(hv, guest, cmd):
    fields = {"context": context(guest)} if cmd == "initialise" else {}
    with fails(hv, Errno.ENOENT, match="has no vCPU 2"):
        guest.vcpu_op(cmd, 2, **fields)


def test_unknown_vcpu_op_is_enosys(hv, guest):
    with fails(hv, Errno.ENOSYS):
        guest.vcpu_op("send_nmi", 0)


def test_down_keeps_the_references_and_any_vcpu_may_be_targeted(hv, guest):
    guest.vcpu_op("initialise", 1, context=context(guest))
    guest.vcpu_op("up", 1)
    hv.take_kicks()
    held = refs(hv, guest.l4)
    assert guest.vcpu_op("down", 0, caller=1) == 0  # vCPU 1 takes vCPU 0 down
    assert guest.vcpu_op("is_up", 0, caller=1) == 0 and hv.take_kicks() == [(guest.domid, 0)]
    assert guest.domain.vcpus[0].guest_table == guest.l4 and refs(hv, guest.l4) == held
    assert guest.vcpu_op("down", 0, caller=1) == 0 and hv.take_kicks() == []  # already down
    assert guest.domain.shutdown_code is None


def test_down_of_the_last_vcpu_shuts_the_domain_down_and_leaves_it_up(hv, guest):
    held = refs(hv, guest.l4)
    assert guest.vcpu_op("down", 0) == 0
    assert guest.domain.shutdown_code == SHUTDOWN_poweroff
    assert not guest.domain.vcpus[0].down and refs(hv, guest.l4) == held
    assert set(hv.take_kicks()) == {(guest.domid, 0), (guest.domid, 1)}  # every vCPU paused
    assert guest.domain.info()["shutdown_code"] == SHUTDOWN_poweroff


def test_vcpu_op_names_vcpus_of_the_callers_domain_only(hv, guest, other):
    guest.vcpu_op("initialise", 1, context=context(guest))
    assert other.vcpu_op("is_up", 1) == 0 and not other.domain.vcpus[1].initialised
    other.vcpu_op("initialise", 1, context=context(other))
    assert other.domain.vcpus[1].guest_table == other.l4 and guest.domain.vcpus[1].guest_table == guest.l4


def test_destroying_a_domain_with_initialised_vcpus_frees_everything(hv, guest):
    tree = guest.new_pgd()
    guest.vcpu_op("initialise", 1, context=context(guest, tree["l4"]))
    guest.vcpu_op("down", 1)
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert hv.frame_info(tree["l4"])["owner"] is None


# -- a vCPU that Xen does not run makes no calls (sched.check_running) ----------------------


def stopped_calls(guest):
    """Calls a stopped vCPU's process might still send: the three the issue found succeeding
    (NEW_BASEPTR, a store, alloc_unbound), a load and an op that exists nowhere."""
    pfn, _ = guest.alloc()
    return [
        ("mmuext_op", {"ops": [[MmuextCmd.NEW_BASEPTR, guest.l4, 0]]}),
        ("store", {"va": guest.direct_va(pfn), "size": 8, "value": 1, "user": False}),
        ("event_channel_op", {"cmd": "alloc_unbound", "dom": DOMID_SELF, "remote_dom": DOMID_SELF}),
        ("load", {"va": guest.direct_va(pfn), "size": 8, "user": False}),
        ("no_such_hypercall", {}),
    ]


def test_a_vcpu_never_brought_up_makes_no_calls(hv, guest):
    for op, args in stopped_calls(guest):
        with refused(hv, match=f"dom{guest.domid} vCPU 1 does not run: it was never initialised"):
            guest.call(op, 1, **args)


def test_a_vcpu_initialised_but_not_up_makes_no_calls(hv, guest):
    guest.vcpu_op("initialise", 1, context=context(guest))
    for op, args in stopped_calls(guest):
        with refused(hv, match="is down (initialised but not yet up"):
            guest.call(op, 1, **args)


@pytest.mark.parametrize("by", [0, 1])
def test_a_vcpu_taken_down_makes_no_calls_until_it_is_up_again(hv, guest, by):
    guest.vcpu_op("initialise", 1, context=context(guest))
    guest.vcpu_op("up", 1)
    assert guest.vcpu_op("down", 1, caller=by) == 0  # by itself (Linux's play_dead) or by vCPU 0
    for op, args in stopped_calls(guest):
        with refused(hv, match="taken down by VCPUOP_down"):
            guest.call(op, 1, **args)
    guest.vcpu_op("up", 1)
    assert guest.vcpu_op("is_up", 1, caller=1) == 1


@pytest.mark.parametrize("how", ["SCHEDOP_shutdown", "VCPUOP_down of the last vCPU"])
def test_no_vcpu_of_a_domain_that_shut_down_makes_calls(hv, guest, how):
    guest.vcpu_op("initialise", 1, context=context(guest))
    guest.vcpu_op("up", 1)
    if how == "SCHEDOP_shutdown":
        guest.sched_op("shutdown", reason=SHUTDOWN_crash, caller=1)
    else:
        guest.vcpu_op("down", 1)
        guest.vcpu_op("down", 0)
    for vcpu in (0, 1):
        for op, args in stopped_calls(guest):
            with refused(hv, match=f"dom{guest.domid} has shut down"):
                guest.call(op, vcpu, **args)


def test_a_stopped_vcpu_of_one_domain_leaves_the_others_running(hv, guest, other):
    guest.sched_op("shutdown", reason=SHUTDOWN_crash)
    assert other.call("xen_version")["major"] == 4 and other.vcpu_op("is_up", 0) == 1
