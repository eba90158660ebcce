"""memory_op over a real server (docs/xen.md section 23): a balloon of more extents than one
run of the call does (abi.PREEMPT_WORK), so that the server goes on with its continuations,
and the read-only M2P that reflects it (docs/xen.md section 22)."""

import pytest

from hypervisor.core.abi import PREEMPT_WORK, RO_MPT_VIRT_START, STEP_WORK
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(120)

N = 3 * PREEMPT_WORK // STEP_WORK  # extents: three runs' worth at least


def reservation(extents: list[int]) -> h.XenMemoryReservation:
    return h.XenMemoryReservation(extent_start=extents, nr_extents=len(extents))


def test_a_balloon_of_many_pages_goes_out_and_back_in_across_preemptions(server):
    guest = WireGuest(server, nr_pages=4096, nr_vcpus=1)
    first = guest.start_info.first_free_pfn
    pfns = list(range(first, first + N))
    base, size = guest.start_info.mfn_list + 8 * first, 8 * N  # the P2M: where the guest finds its frames
    raw = b"".join(guest.call("Read", m.ReadRequest(va=base + at, length=length)).data for at, length in _chunks(base, size))
    mfns = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, size, 8)]
    l1s = {pfn // 512: guest.direct_l1(pfn)[0] for pfn in pfns}
    guest.mmu_update(*(((l1s[pfn // 512] << 12) + 8 * (pfn % 512), 0) for pfn in pfns))  # the balloon unmaps them first
    free = guest.toolstack("HostInfo", t.HostInfoRequest()).free_frames

    out = guest.call("MemoryOp", h.MemoryOpRequest(decrease_reservation=reservation(mfns)))
    assert (out.result, out.stopped) == (N, "")
    assert guest.toolstack("HostInfo", t.HostInfoRequest()).free_frames == free + N
    assert guest.call("Load", m.LoadRequest(va=RO_MPT_VIRT_START + 8 * mfns[0], size=8)).value == (1 << 64) - 1

    back = guest.call("MemoryOp", h.MemoryOpRequest(populate_physmap=reservation(pfns)))
    assert (back.result, back.stopped) == (N, "") and len(set(back.extent_start)) == N
    assert guest.toolstack("HostInfo", t.HostInfoRequest()).free_frames == free
    for pfn, mfn in list(zip(pfns, back.extent_start, strict=True))[:: N // 7]:
        assert guest.call("Load", m.LoadRequest(va=RO_MPT_VIRT_START + 8 * mfn, size=8)).value == pfn
    assert guest.call("MemoryOp", h.MemoryOpRequest(current_reservation=h.XenMemoryDomain())).result == 4096
    assert not guest.toolstack("Audit", t.AuditRequest()).findings


def _chunks(start: int, size: int):
    """(offset, length) of reads from `start` that cover `size` bytes, none crossing a page."""
    at = 0
    while at < size:
        length = min(4096 - (start + at) % 4096, size - at)
        yield at, length
        at += length
