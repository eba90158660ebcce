"""HYPERVISOR_vm_assist (docs/xen.md section 25; xen/common/domain.c, do_vm_assist): the type
is checked against the domain's address size first (EINVAL whatever the cmd), then the cmd
(ENOSYS); a failed call changes nothing. What the assists change is tested where it acts
(ptwr in test_cpu.py, the PAE L3 above 4 GiB in test_pv32_rules.py)."""

import pytest

from hypervisor.core.abi import (
    PV32_VM_ASSIST_MASK,
    PV64_VM_ASSIST_MASK,
    Errno,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_pae_extended_cr3,
    VMASST_TYPE_writable_pagetables,
)

from .conftest import fails_with
from .guest import Guest


@pytest.fixture(params=[64, 32], ids=["pv64", "pv32"])
def domain_guest(hv, request):
    return Guest(hv, address_size=request.param)


def assist(guest: Guest, cmd: int, type: int, vcpu: int = 0) -> int:
    return guest.call("vm_assist", vcpu=vcpu, cmd=cmd, type=type)


@pytest.mark.parametrize("address_size, valid", [(64, PV64_VM_ASSIST_MASK), (32, PV32_VM_ASSIST_MASK)])
def test_each_allowed_type_is_set_and_cleared_and_every_other_is_einval(hv, address_size, valid):
    guest = Guest(hv, address_size=address_size)
    for type in range(70):
        if valid >> type & 1:
            assert assist(guest, VMASST_CMD_enable, type) == 0
            assert guest.domain.vm_assist >> type & 1
            assert assist(guest, VMASST_CMD_disable, type) == 0
            assert not guest.domain.vm_assist >> type & 1
        else:
            with fails_with(hv, Errno.EINVAL, match=f"type {type}"):
                assist(guest, VMASST_CMD_enable, type)


def test_m2p_strict_is_a_64bit_domains_only(hv, domain_guest):
    if domain_guest.pv32:
        with fails_with(hv, Errno.EINVAL, match="32-bit"):
            assist(domain_guest, VMASST_CMD_enable, VMASST_TYPE_m2p_strict)
    else:
        assert assist(domain_guest, VMASST_CMD_enable, VMASST_TYPE_m2p_strict) == 0


def test_pae_extended_cr3_is_allowed_to_a_64bit_domain_too(hv, guest):
    """PV64_VM_ASSIST_MASK keeps the 32-bit assists: "we can't make such requests fail"."""
    assert assist(guest, VMASST_CMD_enable, VMASST_TYPE_pae_extended_cr3) == 0


def test_a_bad_cmd_is_enosys_after_the_type_check_and_changes_nothing(hv, domain_guest):
    with fails_with(hv, Errno.ENOSYS, match="cmd 2"):
        assist(domain_guest, 2, VMASST_TYPE_writable_pagetables)
    with fails_with(hv, Errno.EINVAL):  # the type first: a bad type with a bad cmd is EINVAL
        assist(domain_guest, 2, 6)
    assert domain_guest.domain.vm_assist == 1 << VMASST_TYPE_writable_pagetables  # the Guest's boot


def test_assists_are_the_domains_not_the_vcpus_and_not_another_domains(hv, guest, other):
    assert assist(guest, VMASST_CMD_enable, VMASST_TYPE_pae_extended_cr3, vcpu=1) == 0
    assert guest.domain.vm_assist >> VMASST_TYPE_pae_extended_cr3 & 1
    assert not other.domain.vm_assist >> VMASST_TYPE_pae_extended_cr3 & 1
