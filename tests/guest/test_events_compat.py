"""The guest's 2-level upcall handler on a 32-bit guest (docs/pv32.md section 7), end to end:
a PAE domain on the real server, its shared-info frame mapped over a direct-map page at
PAGE_OFFSET_PAE (update_va_mapping), IPI ports 1..70 on vCPU 1, and EventChannels with the
compat layout (xen.guest_abi of the start_info magic): 32-bit event words, evtchn_mask at byte
2176, a u32 evtchn_pending_sel at byte 4 of the vcpu_info.
"""

from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from guestlib import EventChannels, HypercallClient, Toolstack, connect, ops
from guestlib.xen import (
    COMPAT_SHARED_INFO_EVTCHN_MASK,
    COMPAT_VCPU_INFO_PENDING_SEL,
    GUEST_ABI,
    PAGE_SHIFT,
    SHARED_INFO_EVTCHN_PENDING,
    UVMF_INVLPG,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_PENDING,
    GuestAbi,
    guest_abi,
)

from .domain import TIMEOUT
from .layout import RW, A, D, P

PAGE_OFFSET_PAE = 0xC0000000  # 32-bit Linux's direct map (docs/pv32.md section 4)
NR_PAGES = 2048
VCPU = 1
NR_PORTS = 70  # ports 1..70: 40 is in u32 word 1, 70 in word 2


@dataclass
class Compat:
    xen0: HypercallClient  # sends, and reads shared info
    xen1: HypercallClient  # handles
    shared_info: int
    layout: GuestAbi  # what the guest learnt from its start_info magic

    async def peek(self, offset: int, size: int) -> int:
        value = await self.xen0.load(self.shared_info + offset, size)
        assert isinstance(value, int), value
        return value

    def pending_bit(self, port: int) -> tuple[int, int]:
        """(offset of the u32 word, bit) of a port in evtchn_pending, the compat ABI's words."""
        return SHARED_INFO_EVTCHN_PENDING + 4 * (port // 32), port % 32

    async def selector(self) -> int:
        return await self.peek(VCPU * VCPU_INFO_SIZE + COMPAT_VCPU_INFO_PENDING_SEL, 4)


@asynccontextmanager
async def compat_domain(server):
    async with Toolstack(server.address, server.admin_token) as xl:
        created = await xl.create_domain(nr_pages=NR_PAGES, nr_vcpus=2, address_size=32)
        start = created.start_info
        layout = guest_abi(start.magic)
        assert layout is GUEST_ABI[32]
        async with connect(server.address, created.token, 0) as xen0:
            await xen0.wait_started()
            shared_info = PAGE_OFFSET_PAE + (start.first_free_pfn << PAGE_SHIFT)  # a free lowmem page's place
            assert await xen0.update_va_mapping(shared_info, start.shared_info | P | RW | A | D, UVMF_INVLPG) is None
            ports = await xen0.submit([ops.evtchn_bind_ipi(VCPU) for _ in range(NR_PORTS)])
            assert [p.result() for p in ports] == list(range(1, NR_PORTS + 1))
            initialised, up = await xen0.submit([ops.vcpu_initialise(VCPU, start.pt_base_mfn), ops.vcpu_up(VCPU)], stop_on_error=True)
            assert (initialised.result(), up.result()) == (None, None)
            async with connect(server.address, created.token, VCPU) as xen1:
                await xen1.wait_started()
                yield Compat(xen0, xen1, shared_info, layout)
        assert await xl.audit() == []
        await xl.destroy_domain(created.domid)
        assert await xl.audit() == []


def test_the_layout_comes_from_the_start_info_magic():
    assert guest_abi(b"xen-3.0-x86_32p\0") is GUEST_ABI[32] and guest_abi("xen-3.0-x86_64") is GUEST_ABI[64]
    with pytest.raises(ValueError, match="neither"):
        guest_abi(b"xen-3.0-x86_32")


async def test_an_upcall_is_handled_in_the_compat_layout(server):
    """Xen sets bit 1 of the u32 selector for port 40 and pushes the upcall; port 70 comes after
    the push (bit 2, not in the hint) and is found by the scan of the 32-bit words."""
    with trio.fail_after(TIMEOUT):
        async with compat_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU, layout=dom.layout)
            ran = []

            async def handler(port, tail):
                offset, bit = dom.pending_bit(port)
                ran.append((port, not await dom.peek(offset, 4) >> bit & 1))

            for port in (40, 70):
                events.bind(port, handler)
            await events.local_irq_enable()
            assert await dom.xen0.evtchn_send(40) is None
            upcall = await dom.xen1.session.upcalls.receive()
            assert list(upcall.pending_ports) == [40] and await dom.selector() == 1 << 1
            assert await dom.xen0.evtchn_send(70) is None
            assert await dom.selector() == 1 << 1 | 1 << 2
            await events.do_upcall(upcall.pending_ports)
            assert ran == [(40, True), (70, True)]
            assert await dom.selector() == 0 and await dom.peek(VCPU * VCPU_INFO_SIZE + VCPU_INFO_UPCALL_PENDING, 1) == 0
            with pytest.raises(trio.WouldBlock):  # nothing left to deliver
                dom.xen1.session.upcalls.receive_nowait()


async def test_a_port_masked_in_the_compat_mask_waits_for_its_unmask(server):
    with trio.fail_after(TIMEOUT):
        async with compat_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU, layout=dom.layout)
            events.bind(40, lambda port, tail: trio.lowlevel.checkpoint())
            async with dom.xen1.batch() as batch:
                events.mask(batch, 40)
            assert await dom.peek(COMPAT_SHARED_INFO_EVTCHN_MASK + 4, 4) == 1 << 8
            await events.local_irq_enable()
            assert await dom.xen0.evtchn_send(40) is None
            offset, bit = dom.pending_bit(40)
            assert await dom.peek(offset, 4) == 1 << bit and await dom.selector() == 0  # masked: pending only
            assert await dom.xen1.evtchn_unmask(40) is None  # Xen clears the compat mask bit and redelivers
            assert await dom.peek(COMPAT_SHARED_INFO_EVTCHN_MASK + 4, 4) == 0
            upcall = await dom.xen1.session.upcalls.receive()
            assert list(upcall.pending_ports) == [40] and await dom.selector() == 1 << 1
            async with dom.xen1.batch() as batch:
                events.mask(batch, 70)
                events.unmask(batch, 40)
            assert await dom.peek(COMPAT_SHARED_INFO_EVTCHN_MASK + 8, 4) == 1 << 6
