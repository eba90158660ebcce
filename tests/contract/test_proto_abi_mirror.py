"""The proto's Xen numbers and records agree with hypervisor/core/abi.py, both ways.

XenErrno carries Xen's numbers; MmuextCmd, PageType, EvtchnStat, ShutdownReason and RunstateState carry Xen's
number + 1 because their Xen numbering starts at 0, which proto3 reserves for UNSPECIFIED
(common.proto explains the rule); StartInfo lists the builder's start-info record in its order.
"""

import pytest

from hypervisor.core import abi
from xensim.v1 import common_pb2


def _proto_values(enum_name: str, prefix: str, offset: int) -> dict[str, int]:
    """Name (prefix dropped) -> Xen number for every value but UNSPECIFIED."""
    values = common_pb2.DESCRIPTOR.enum_types_by_name[enum_name].values
    return {v.name.removeprefix(prefix): v.number - offset for v in values if v.number != 0}


def _abi_constants(prefix: str) -> dict[str, int]:
    """abi's module-level constants named <prefix><xen suffix>, keyed by the upper-cased suffix."""
    return {name.removeprefix(prefix).upper(): value
            for name, value in vars(abi).items() if name.startswith(prefix)}


def test_xen_errno_values_are_abi_errno_names_and_numbers():
    assert _proto_values("XenErrno", "XEN_ERRNO_", 0) == {e.name: e.value for e in abi.Errno}


@pytest.mark.parametrize("enum_name, prefix, xen", [
    ("MmuextCmd", "MMUEXT_CMD_", {c.name: c.value for c in abi.MmuextCmd}),
    ("PageType", "PAGE_TYPE_", {t.name: t.value for t in abi.PageType}),
    ("EvtchnStat", "EVTCHN_STAT_", _abi_constants("EVTCHNSTAT_")),
    ("ShutdownReason", "SHUTDOWN_REASON_", _abi_constants("SHUTDOWN_")),
    ("RunstateState", "RUNSTATE_STATE_", {k: v for k, v in _abi_constants("RUNSTATE_").items() if not k.startswith("INFO_")}),
])
def test_zero_based_xen_enum_is_xen_number_plus_one(enum_name, prefix, xen):
    assert xen, f"abi.py defines none of the Xen numbers that {enum_name} mirrors"
    assert _proto_values(enum_name, prefix, 1) == xen


def test_start_info_fields_follow_the_builders_record_in_order():
    fields = [f.name for f in sorted(common_pb2.StartInfo.DESCRIPTOR.fields, key=lambda f: f.number)]
    assert fields[0] == "magic"
    assert fields[1:1 + len(abi.START_INFO_FIELDS)] == list(abi.START_INFO_FIELDS)
