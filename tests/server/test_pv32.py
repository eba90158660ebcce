"""A 32-bit PAE guest beside a 64-bit one over the wire (docs/pv32.md sections 1, 2 and 4)."""

import grpc
import pytest

from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import WireGuest

pytestmark = pytest.mark.timeout(60)


def test_a_32bit_domain_starts_with_its_own_start_info_and_runs_beside_a_64bit_one(server):
    pae, wide = WireGuest(server, nr_pages=512, address_size=32), WireGuest(server, nr_pages=512)
    info = pae.start_info
    assert (info.magic, info.page_offset) == ("xen-3.0-x86_32p", 0xC0000000)
    assert (wide.start_info.magic, wide.start_info.page_offset) == ("xen-3.0-x86_64", 0xFFFF880000000000)
    assert [pae.toolstack("DomainInfo", t.DomainInfoRequest(domid=g.domid)).domain.address_size for g in (pae, wide)] == [32, 64]
    (vcpu0, _) = pae.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=pae.domid)).vcpus
    assert (vcpu0.kernel_cr3_mfn, vcpu0.user_cr3_mfn) == (info.pt_base_mfn, 0)
    pt_base_pfn = (info.pt_base - info.page_offset) >> 12
    mfn = pae.call("Load", m.LoadRequest(va=info.mfn_list + 4 * pt_base_pfn, size=4)).value  # the P2M's u32 entries
    assert mfn == info.pt_base_mfn
    va = pae.direct_va(info.first_free_pfn)
    pae.call("Store", m.StoreRequest(va=va, size=4, value=0x32))
    assert pae.call("Load", m.LoadRequest(va=va, size=4)).value == 0x32
    fault = pae.call("Load", m.LoadRequest(va=0xF5800000, size=4, user_mode=True))
    assert fault.HasField("fault")
    with pytest.raises(grpc.RpcError) as caught:
        pae.call("MmuextOp", h.MmuextOpRequest(ops=[h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_NEW_USER_BASEPTR, arg1=info.pt_base_mfn)]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "EINVAL" in caught.value.details()
    assert not pae.toolstack("Audit", t.AuditRequest()).findings
    assert pae.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=pae.domid)).freed_frames == 513
