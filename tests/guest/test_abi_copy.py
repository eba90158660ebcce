"""guestlib's copy of Xen's public ABI agrees with the hypervisor's (hypervisor/core/abi.py).

The guest keeps its own copy, as Linux does in include/xen/interface/, so the two can drift;
this test is what stops them. A name that only the guest needs is listed in GUEST_ONLY.
"""

import dataclasses
from enum import IntEnum

from guestlib import xen
from hypervisor.core import abi

# Xen ABI names the guest uses but the hypervisor core has no use for (yet).
GUEST_ONLY = {"SIF_PRIVILEGED", "SIF_INITDOMAIN"}


def _public(module) -> dict:
    return {name: value for name, value in vars(module).items() if name[0].isupper() and name != "IntEnum"}


def _members(value):
    if isinstance(value, type) and issubclass(value, IntEnum):
        return {member.name: member.value for member in value}
    if dataclasses.is_dataclass(value):  # a row type (its fields) or a row (its values)
        return [f.name for f in dataclasses.fields(value)] if isinstance(value, type) else dataclasses.asdict(value)
    if isinstance(value, dict):  # a table of rows, compared whole
        return [(key, _members(row)) for key, row in value.items()]
    return value


def test_every_guest_name_is_the_hypervisors_with_the_same_value():
    guest, hypervisor = _public(xen), _public(abi)
    for name, value in guest.items():
        if name not in hypervisor:
            assert name in GUEST_ONLY, f"guestlib.xen.{name} is not in hypervisor/core/abi.py: add it there or to GUEST_ONLY"
            continue
        ours, theirs = _members(value), _members(hypervisor[name])
        if isinstance(ours, dict):  # an enum: the guest may name fewer members, never others
            assert ours.items() <= theirs.items(), f"{name}: guest {ours}, hypervisor {theirs}"
        else:
            assert ours == theirs, f"{name}: guest {ours!r}, hypervisor {theirs!r}"


def test_the_copy_covers_what_a_guest_kernel_needs():
    """The groups the brief of guestlib names are all present (a guard against an empty copy)."""
    needed = [
        "PAGE_SHIFT", "PAGE_OFFSET", "DOMID_SELF", "UVMF_INVLPG", "UVMF_ALL", "Pte", "MmuCmd", "MmuextCmd",
        "VGCF_in_kernel", "VIRQ_TIMER", "EVTCHNOP_send", "EVTCHNSTAT_ipi", "SCHEDOP_block", "SHUTDOWN_crash",
        "SHARED_INFO_EVTCHN_PENDING", "SHARED_INFO_EVTCHN_MASK", "VCPU_INFO_SIZE", "VCPU_INFO_PENDING_SEL",
        "START_INFO_FIELDS", "START_INFO_FIELD_OFFSET",
    ]
    assert [name for name in needed if not hasattr(xen, name)] == []
