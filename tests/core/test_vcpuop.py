"""VCPUOP (xen-semantics.md section 14): initialise, up, down, is_up; every errno row, the base
references initialise takes (as NEW_BASEPTR does) and keeps across down."""

import pytest

from hypervisor.core.abi import Errno, SHUTDOWN_poweroff, VGCF_in_kernel, VGCF_online

from .conftest import fails_with as fails  # the errno, and nothing changed

RIP, RSP = 0xFFFFFFFF81000000, 0xFFFF880000123000


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
        ({"ctrlreg3": 0}, "ctrlreg3 mfn 0x0"),
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
        guest.vcpu_op("set_periodic_timer", 0)


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
    assert guest.vcpu_op("is_up", 0) == 1 and refs(hv, guest.l4) == held
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
