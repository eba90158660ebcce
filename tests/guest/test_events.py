"""The guest's upcall handler (xen_evtchn_do_upcall) against the real server's shared info.

Each test boots a two-vCPU domain on a server subprocess, maps its shared-info frame in the
direct map (Linux: set_fixmap), binds IPI ports 1..70 (port 5 to vCPU 0, the rest to vCPU 1)
and brings vCPU 1 up with its own Session, in-process. vCPU 0 sends the events; the server
sets the pending bits, the selector and upcall-pending, and pushes an Upcall to vCPU 1 (masking
its upcalls as the bounce frame does). vCPU 1's EventChannels then handles that push. What
the handler left in shared info is read through vCPU 0's Session, so only vCPU 1's messages
are counted (by `Exchanges`, around its Session's exchange).
"""

from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from guestlib import EventChannels, HypercallClient, Toolstack, ops
from guestlib.xen import (
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
)

from .domain import TIMEOUT, Exchanges, boot, second_vcpu
from .layout import RW, A, D, P

VCPU = 1
NR_PORTS = 70  # ports 1..70: port 70 lies in word 1 of the bitmaps
VCPU0_PORT = 5  # "another vCPU's port": an IPI to vCPU 0


@dataclass
class Events:
    """The booted domain as the tests use it."""

    xl: Toolstack
    domid: int
    xen0: HypercallClient  # vCPU 0: sends events and inspects shared info
    xen1: HypercallClient  # vCPU 1: handles them
    sent: Exchanges  # vCPU 1's messages
    shared_info: int  # where shared info is mapped (every vCPU shares the kernel half)
    ack: int  # a u16 the handlers write, sent with the unmask

    def word(self, port: int) -> int:
        return self.shared_info + SHARED_INFO_EVTCHN_PENDING + 8 * (port // 64)

    def mask_word(self, port: int) -> int:
        return self.shared_info + SHARED_INFO_EVTCHN_MASK + 8 * (port // 64)

    def vcpu_info(self, offset: int) -> int:
        return self.shared_info + VCPU * VCPU_INFO_SIZE + offset

    async def peek(self, va: int, size: int = 8) -> int:
        value = await self.xen0.load(va, size)
        assert isinstance(value, int), value
        return value

    async def vcpu_state(self) -> list[int]:
        """vCPU 1's upcall-pending, upcall-mask and pending selector."""
        return [
            await self.peek(self.vcpu_info(VCPU_INFO_UPCALL_PENDING), 1),
            await self.peek(self.vcpu_info(VCPU_INFO_UPCALL_MASK), 1),
            await self.peek(self.vcpu_info(VCPU_INFO_PENDING_SEL)),
        ]

    async def next_upcall(self):
        """The Upcall the server pushed to vCPU 1."""
        upcall = await self.xen1.session.upcalls.receive()
        assert upcall.vcpu_id == VCPU
        return upcall

    def handler_log(self, ran: list):
        """A handler that records its port and whether the port's pending bit was already clear
        (read through vCPU 0, so it costs vCPU 1 no message), and acks into self.ack."""

        async def handler(port, tail):
            ran.append((port, not await self.peek(self.word(port)) >> port % 64 & 1))
            tail.store(self.ack, port, size=2)  # an ack, sent with the unmask

        return handler


@asynccontextmanager
async def events_domain(server):
    async with boot(server, nr_vcpus=2) as guest:
        layout = guest.layout
        slot = layout.alloc()
        mapped = await guest.xen.mmu_update([(layout.direct_entry(slot), guest.start_info.shared_info | P | RW | A | D)])
        assert mapped == 1
        ports = await guest.xen.submit([ops.evtchn_bind_ipi(0 if port == VCPU0_PORT else VCPU) for port in range(1, NR_PORTS + 1)])
        assert [p.result() for p in ports] == list(range(1, NR_PORTS + 1))
        async with second_vcpu(guest, VCPU) as xen1:
            yield Events(guest.xl, guest.created.domid, guest.xen, xen1, Exchanges(xen1.session), layout.direct_va(slot), guest.page())


async def test_hinted_event_is_acked_handled_and_unmasked_in_two_messages(server):
    with trio.fail_after(TIMEOUT):
        async with events_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU)
            ran = []
            events.bind(3, dom.handler_log(ran))
            await events.local_irq_enable()
            assert await dom.xen0.evtchn_send(3) is None
            upcall = await dom.next_upcall()
            assert list(upcall.pending_ports) == [3]
            # What Xen left: the pending bit, the selector, upcall-pending, and the mask it set.
            assert await dom.peek(dom.word(3)) == 1 << 3 and await dom.vcpu_state() == [1, 1, 1]
            dom.sent.clear()
            await events.do_upcall(upcall.pending_ports)
            assert ran == [(3, True)]  # its bit was cleared before the handler ran
            assert len(dom.sent.messages) == 2
            assert dom.sent.messages[1].kinds[-2:] == ["store", "store"] and await dom.peek(dom.ack, 2) == 3
            assert await dom.vcpu_state() == [0, 0, 0] and await dom.peek(dom.word(3)) == 0
            (info,) = await dom.xl.vcpu_info(dom.domid, VCPU)
            assert (info.upcall_pending, info.upcall_mask) == (False, False)
            with pytest.raises(trio.WouldBlock):  # nothing left to deliver: no second push
                dom.xen1.session.upcalls.receive_nowait()


async def test_scan_finds_unhinted_ports_and_leaves_masked_and_foreign_ones(server):
    with trio.fail_after(TIMEOUT):
        async with events_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU)
            ran = []
            for port in (3, 70, 9):
                events.bind(port, dom.handler_log(ran))
            assert await dom.xen0.atomic("fetch_or", dom.mask_word(9), 1 << 9) == 0  # mask_evtchn(9)
            await events.local_irq_enable()
            await dom.xen0.evtchn_send(3)
            upcall = await dom.next_upcall()
            assert list(upcall.pending_ports) == [3]
            await dom.xen0.evtchn_send(70)  # word 1, after the push: not in its (stale) hint
            await dom.xen0.evtchn_send(VCPU0_PORT)  # pending in word 0 but vCPU 0's port
            await dom.xen0.evtchn_send(9)  # masked: its pending bit only
            assert await dom.peek(dom.word(0)) == 1 << 3 | 1 << VCPU0_PORT | 1 << 9 and await dom.peek(dom.word(70)) == 1 << 70 % 64
            assert await dom.peek(dom.vcpu_info(VCPU_INFO_PENDING_SEL)) == 0b11
            dom.sent.clear()
            await events.do_upcall(upcall.pending_ports)
            assert ran == [(3, True), (70, True)]
            assert len(dom.sent.messages) == 3  # the missed port needs its bit cleared before its handler
            assert await dom.peek(dom.word(0)) == 1 << VCPU0_PORT | 1 << 9 and await dom.peek(dom.word(70)) == 0
            assert await dom.vcpu_state() == [0, 0, 0]
            with pytest.raises(trio.WouldBlock):
                dom.xen1.session.upcalls.receive_nowait()


async def test_stale_hint_runs_no_handler_for_a_port_no_longer_pending(server):
    with trio.fail_after(TIMEOUT):
        async with events_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU)
            ran = []
            events.bind(3, dom.handler_log(ran))
            await events.local_irq_enable()
            await dom.xen0.evtchn_send(3)
            upcall = await dom.next_upcall()
            assert list(upcall.pending_ports) == [3]
            await dom.xen0.evtchn_close(3)  # EVTCHNOP_close clears the port's pending bit
            assert await dom.peek(dom.word(3)) == 0 and await dom.peek(dom.vcpu_info(VCPU_INFO_UPCALL_MASK), 1) == 1
            dom.sent.clear()
            await events.do_upcall(upcall.pending_ports)
            assert ran == [] and len(dom.sent.messages) == 2
            assert await dom.vcpu_state() == [0, 0, 0]


async def test_unmapped_shared_info_is_a_clear_error(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            events = EventChannels(guest.xen, 0x1000, 0)  # nothing is mapped in the user half
            with pytest.raises(RuntimeError, match="shared-info frame is not mapped writable at 0x1000"):
                await events.do_upcall()
            # Mapped read-only, the frame reads but the handler's stores fault: the same error.
            slot = guest.layout.alloc()
            assert await guest.xen.mmu_update([(guest.layout.direct_entry(slot), guest.start_info.shared_info | P | A | D)]) == 1
            readonly = guest.layout.direct_va(slot)
            events = EventChannels(guest.xen, readonly, 0)
            with pytest.raises(RuntimeError, match=f"shared-info frame is not mapped writable at {readonly:#x}"):
                await events.do_upcall()
