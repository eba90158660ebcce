"""The read-only views behind xl, xen-mfndump and the debug keys: what they say in the
lazy-TLB unpin race (the case they exist for), and that taking them changes nothing."""

import pytest

from hypervisor.core import XenError, views
from hypervisor.core.abi import Errno

from .conftest import unchanged
from .guest import RW


@pytest.fixture
def race(hv, guest):
    """vCPU 1 still runs on a tree that vCPU 0 has unpinned: the state of every EBUSY."""
    data = guest.alloc()[1]
    tree = guest.new_pgd({0x400000: data})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    return {**tree, "data": data}


def test_reverse_map_names_the_entry_and_the_vcpu_that_hold_a_busy_table(hv, guest, race):
    with unchanged(hv):
        l1 = views.reverse_map(hv, race["l1"])
        l4 = views.reverse_map(hv, race["l4"])
    (entry,) = [e for e in l1["entries"] if e["level"] == 2]
    assert (entry["table"], entry["owner"], entry["holds_reference"]) == (race["l2"], guest.domid, True)
    (direct,) = [e for e in l1["entries"] if e["level"] == 1]  # the kernel's read-only direct map
    assert (direct["table"], direct["slot"]) == guest.direct_l1(race["pfns"][3]) and not direct["entry"] & RW
    assert l1["bases"] == [] and l1["frame"]["type"] == "L1" and l1["frame"]["type_count"] == 1
    assert l4["bases"] == [{"domid": guest.domid, "vcpu": 1, "user": False}]
    assert not l4["frame"]["pinned"]
    # Its Xen slot 258 (the linear map) names the L4 itself and holds nothing.
    assert [(e["slot"], e["holds_reference"], e["xen_slot"]) for e in l4["entries"] if e["level"] == 4] == [(258, False, True)]


def test_reverse_map_finds_the_direct_map_entry_of_a_table_frame_and_every_data_mapping(hv, guest, race):
    found = views.reverse_map(hv, race["data"])
    tables = {(e["table"], e["level"]) for e in found["entries"]}
    assert (race["l1"], 1) in tables  # the user mapping
    assert any(level == 1 and table != race["l1"] for table, level in tables)  # the kernel's direct map


def test_reverse_map_of_a_frame_outside_memory_is_einval(hv):
    with pytest.raises(XenError) as e:
        views.reverse_map(hv, hv.nr_frames)
    assert e.value.errno == Errno.EINVAL and f"{hv.nr_frames:#x}" in e.value.message


def test_pagetable_decodes_entries_and_refuses_data_frames(hv, guest, race):
    with unchanged(hv):
        table = views.pagetable(hv, race["l2"])
    assert table["level"] == 2
    (entry,) = table["entries"]
    assert entry["mfn"] == race["l1"] and entry["frame"]["type"] == "L1" and entry["pfn"] == guest.hv.m2p[race["l1"]]
    with pytest.raises(XenError) as e:
        views.pagetable(hv, race["data"])
    assert e.value.errno == Errno.EINVAL and "not a pagetable" in e.value.message


def test_pagetable_tree_visits_each_table_once_parents_first(hv, guest, race):
    tree = views.pagetable_tree(hv, race["l4"])
    mfns = [t["frame"]["mfn"] for t in tree]
    assert mfns[0] == race["l4"]
    assert len(mfns) == len(set(mfns))
    assert {race["l3"], race["l2"], race["l1"]} <= set(mfns)
    # The boot kernel half the tree shares with the boot L4 is in it too, once.
    boot = {t["frame"]["mfn"] for t in views.pagetable_tree(hv, guest.l4)}
    assert (boot - {guest.l4}) <= set(mfns)
    levels = [t["level"] for t in tree]
    assert levels == sorted(levels, reverse=True)


def test_vcpu_and_port_views_read_the_shared_info_bits(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.evtchn("send", port=port)
    domain = hv.domain(guest.domid)
    (view,) = [p for p in views.evtchn_ports(hv, domain) if p["port"] == port]
    assert (view["pending"], view["masked"]) == (guest.pending(port), guest.masked(port)) == (True, False)
    assert view["status"]["vcpu"] == 1
    vcpu = views.vcpu_info(hv, domain, domain.vcpus[1])
    assert (vcpu["upcall_pending"], vcpu["upcall_mask"]) == (bool(guest.upcall_pending(1)), bool(guest.upcall_mask(1)))


def test_domain_summary_and_state(hv, guest, race):
    domain = hv.domain(guest.domid)
    summary = views.domain_summary(hv, domain)
    assert summary["pinned_pagetables"] == 1  # the boot L4; the race tree is unpinned
    assert summary["validated_pagetables"] >= 4 + 4  # the boot tree's and the race tree's
    assert summary["by_type"]["L4"] >= 2 and summary["frames"] == sum(summary["by_type"].values())
    assert summary["writable_mappings"] >= summary["writable_frames"] > 0
    assert views.domain_info(hv, domain)["state"] == "running"
    hv.toolstack("pause_domain", domid=guest.domid)
    assert views.domain_info(hv, domain)["state"] == "paused"


def test_p2m_and_m2p_agree(hv, guest):
    domain = hv.domain(guest.domid)
    p2m = views.p2m(hv, domain)
    m2p = {mfn: pfn for mfn, owner, pfn in views.m2p(hv, guest.domid)}
    assert all(m2p[mfn] == pfn for pfn, mfn in enumerate(p2m))
    assert len(m2p) == len(p2m) + 1  # and the shared-info frame
