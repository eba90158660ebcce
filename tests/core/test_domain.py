"""The domain builder and domain destruction (sections 12.4, 17)."""

import numpy as np
import pytest

from hypervisor.core import Hypervisor, audit
from hypervisor.core.abi import PAGE_OFFSET, PAGE_SHIFT, START_INFO_FIELD_OFFSET, START_INFO_FIELDS, START_INFO_MAGIC, Errno

from .guest import Guest


def test_start_info_in_guest_memory_matches_record(hv, guest):
    info = guest.start_info
    raw = hv.memory.read(guest.mfn(0), 0, START_INFO_FIELD_OFFSET + 8 * len(START_INFO_FIELDS))
    assert raw.startswith(START_INFO_MAGIC)
    for i, name in enumerate(START_INFO_FIELDS):
        assert int.from_bytes(raw[START_INFO_FIELD_OFFSET + 8 * i :][:8], "little") == info[name]


def test_p2m_list_in_guest_memory(hv, guest):
    first = (guest.start_info["mfn_list"] - PAGE_OFFSET) >> PAGE_SHIFT
    words = hv.memory.entries(guest.mfn(first))
    assert [int(w) for w in words[:8]] == [guest.mfn(pfn) for pfn in range(8)]
    assert all(hv.frame_info(guest.mfn(pfn))["m2p"] == pfn for pfn in range(0, 2048, 97))


def test_initial_pagetable_pinned_loaded_and_readonly(hv):
    guest = Guest(hv, online=1)  # as the builder leaves it
    l4 = hv.frame_info(guest.l4)
    assert (l4["type"], l4["pinned"], l4["validated"], l4["type_count"]) == ("L4", True, True, 2)
    assert guest.domain.vcpus[0].guest_table == guest.l4
    assert [v.down for v in guest.domain.vcpus] == [False, True]
    first_pt = (guest.start_info["pt_base"] - PAGE_OFFSET) >> PAGE_SHIFT
    for pfn in range(first_pt, first_pt + guest.start_info["nr_pt_frames"]):
        assert hv.frame_info(guest.mfn(pfn))["type"] in ("L1", "L2", "L3", "L4")


def test_pfn_and_mfn_differ(hv, guest):
    assert any(guest.mfn(pfn) != pfn for pfn in range(16))


def test_destroy_frees_every_frame_and_m2p_entry():
    hv = Hypervisor(nr_frames=1 << 14)
    free = hv.frames.free_frames()
    guest = Guest(hv, nr_vcpus=2)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    result = hv.toolstack("destroy_domain", domid=guest.domid)
    assert result["freed_frames"] == 2048 + 1
    assert hv.frames.free_frames() == free
    assert hv.memory.stored_frames == 0
    assert audit(hv) == []


def test_destroy_breaks_linear_pagetable_cycles():
    """Two L4s that reference each other linearly would never be freed by refcounting alone."""
    hv = Hypervisor(nr_frames=1 << 14)
    guest = Guest(hv)
    a, b = guest.new_pgd(), guest.new_pgd()
    guest.pin(4, a["l4"])
    guest.pin(4, b["l4"])
    from .guest import A, P

    guest.set_entry(a["l4"], 300, (b["l4"] << PAGE_SHIFT) | P | A)  # linear, read-only
    guest.set_entry(a["l4"], 301, (a["l4"] << PAGE_SHIFT) | P | A)  # self-map: no reference
    assert hv.frame_info(b["l4"])["type_count"] == 2
    assert audit(hv) == []
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert audit(hv) == [] and hv.allocated_frames() == 16


def test_linear_entry_with_rw_is_refused(hv, guest):
    from hypervisor.core import XenError

    from .guest import A, P, RW

    a, b = guest.new_pgd(), guest.new_pgd()
    guest.pin(4, a["l4"])
    guest.pin(4, b["l4"])
    with pytest.raises(XenError) as caught:
        guest.set_entry(a["l4"], 300, (b["l4"] << PAGE_SHIFT) | P | RW | A)
    assert caught.value.errno == Errno.EINVAL


@pytest.mark.parametrize("pages,vcpus", [(4, 1), (2048, 0), (2048, 33)])
def test_create_rejects_bad_sizes(hv, pages, vcpus):
    with pytest.raises(Exception) as caught:
        hv.toolstack("create_domain", nr_pages=pages, nr_vcpus=vcpus)
    assert caught.value.errno == Errno.EINVAL


def test_create_without_memory_enomem():
    hv = Hypervisor(nr_frames=1024)
    with pytest.raises(Exception) as caught:
        hv.toolstack("create_domain", nr_pages=4096)
    assert caught.value.errno == Errno.ENOMEM and hv.frames.free_frames() == 1024 - 16


def test_highmem_pages_are_outside_the_direct_map(hv):
    guest = Guest(hv, nr_pages=4096, highmem_pages=1024)
    assert guest.start_info["nr_lowmem_pages"] == 3072
    assert int(np.count_nonzero(hv.frames.owner == guest.domid)) == 4097
