"""The guest's FIFO upcall handler (docs/linux.md section 12) against the real server.

A two-vCPU domain maps its shared-info frame (the vcpu_info bytes stay there), gives Xen a
control block per vCPU and one event-array page of MASKED words, and binds IPI ports 1..4 to
vCPU 1, unmasked. vCPU 0 sends; vCPU 1's FifoEventChannels consumes its queues from guest
memory. Event words and control blocks are read through vCPU 0's Session.
"""

from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from guestlib import FifoEventChannels, HypercallClient, ops
from guestlib.xen import EVTCHN_FIFO_LINKED, EVTCHN_FIFO_MASKED, EVTCHN_FIFO_PENDING, PAGE_SIZE, VCPU_INFO_SIZE, VCPU_INFO_UPCALL_PENDING

from .domain import TIMEOUT, Exchanges, boot, second_vcpu
from .layout import RW, A, D, P

VCPU = 1
PORTS = (1, 2, 3, 4)
PENDING, MASKED, LINKED = 1 << EVTCHN_FIFO_PENDING, 1 << EVTCHN_FIFO_MASKED, 1 << EVTCHN_FIFO_LINKED


@dataclass
class Fifo:
    xen0: HypercallClient
    xen1: HypercallClient
    sent: Exchanges  # vCPU 1's messages
    events: FifoEventChannels  # vCPU 1's
    shared_info: int
    control: int  # vCPU 1's control block
    array: int

    async def word(self, port: int) -> int:
        return await self.xen0.load(self.array + 4 * port, 4)

    async def ready(self) -> int:
        return await self.xen0.load(self.control, 4)


@asynccontextmanager
async def fifo_domain(server):
    async with boot(server, nr_vcpus=2) as guest:
        layout, xen0 = guest.layout, guest.xen
        shared_info_pfn = layout.alloc()
        assert await xen0.mmu_update([(layout.direct_entry(shared_info_pfn), guest.start_info.shared_info | P | RW | A | D)]) == 1
        controls, array = [guest.page() for _ in range(2)], guest.page()
        calls = [ops.write(array, MASKED.to_bytes(4, "little") * (PAGE_SIZE // 4))]
        calls += [ops.evtchn_init_control(guest.mfn_of(va), vcpu=v) for v, va in enumerate(controls)]
        calls += [ops.evtchn_expand_array(guest.mfn_of(array)), *(ops.evtchn_bind_ipi(VCPU) for _ in PORTS)]
        done = await xen0.submit(calls, stop_on_error=True)
        assert [p.result() for p in done[-len(PORTS) :]] == list(PORTS)
        async with second_vcpu(guest, VCPU) as xen1:
            events = FifoEventChannels(xen1, layout.direct_va(shared_info_pfn), VCPU, controls[VCPU], array)
            setup = xen1.batch()
            for port in PORTS:
                events.unmask(setup, port)
            await setup.flush()
            yield Fifo(xen0, xen1, Exchanges(xen1.session), events, layout.direct_va(shared_info_pfn), controls[VCPU], array)


def logger(ran: list):
    async def handler(port, tail):
        ran.append(port)

    return handler


async def test_the_upcall_consumes_the_queues_in_priority_order_in_two_messages(server):
    with trio.fail_after(TIMEOUT):
        async with fifo_domain(server) as dom:
            ran = []
            for port in PORTS:
                dom.events.bind(port, logger(ran))
            await dom.xen0.evtchn_set_priority(3, 0)
            for port in (1, 2, 3):
                await dom.xen0.evtchn_send(port)
            await dom.events.local_irq_enable()  # the builder left upcalls masked: one push now
            upcall = await dom.xen1.session.upcalls.receive()
            assert list(upcall.pending_ports) == [3, 1, 2]
            dom.sent.clear()
            await dom.events.do_upcall(upcall.pending_ports)
            assert ran == [3, 1, 2] and len(dom.sent.messages) == 2
            assert [await dom.word(port) for port in PORTS] == [0, 0, 0, 0] and await dom.ready() == 0


async def test_a_queue_whose_head_a_dead_process_took_is_recovered(server):
    """The dead process took `ready` and unlinked port 1, the head: the rest of the queue (2,
    then 3) is still LINKED, so Xen appends port 4 after 3 and never sets `ready` again. The
    process that takes over unlinks every port of its vCPU and handles the live ones; the
    next event is delivered as usual."""
    with trio.fail_after(TIMEOUT):
        async with fifo_domain(server) as dom:
            ran = []
            for port in PORTS:
                dom.events.bind(port, logger(ran))
            for port in (1, 2, 3):
                await dom.xen0.evtchn_send(port)
            assert await dom.ready() == 1 << 7
            await dom.xen1.atomic("xchg", dom.control, 0, size=4)  # the dead process's upcall
            await dom.xen1.atomic("fetch_and", dom.array + 4, ~(LINKED | 0x1FFFF) & 0xFFFFFFFF, size=4)
            await dom.xen0.evtchn_send(4)
            assert await dom.word(3) == PENDING | LINKED | 4 and await dom.ready() == 0  # stuck
            await dom.events.recover()
            assert sorted(ran) == [1, 2, 3, 4]
            assert [await dom.word(port) for port in PORTS] == [0, 0, 0, 0]
            await dom.xen0.evtchn_send(2)
            assert await dom.word(2) == PENDING | LINKED and await dom.ready() == 1 << 7
            assert await dom.xen0.load(dom.shared_info + VCPU * VCPU_INFO_SIZE + VCPU_INFO_UPCALL_PENDING, 1) == 1


async def test_a_port_relinked_during_the_first_message_is_consumed_again_not_looped_on(server):
    """Queue 1 -> 2, hint [1, 2]. Between the first message's unlink of 1 and of 2, vCPU 0
    sends 1 again: Xen links 1 after 2 (2's LINK = 1). The walk reaches 1 a second time: it
    must unlink it afresh (its first old word still says LINK 2, which would loop 1 -> 2 -> 1
    for ever) and find it no longer pending (the ack took the new event with the old)."""
    with trio.fail_after(TIMEOUT):
        async with fifo_domain(server) as dom:
            ran = []
            for port in PORTS:
                dom.events.bind(port, logger(ran))
            for port in (1, 2):
                await dom.xen0.evtchn_send(port)
            session, real = dom.xen1.session, dom.xen1.session.exchange
            unlink_of = {dom.array + 4 * port: port for port in PORTS}

            async def exchange(calls, stop_on_error=False):
                """The first message, cut after its unlink of port 1 for vCPU 0's send."""
                session.exchange = real
                cut = next(i for i, c in enumerate(calls) if c.WhichOneof("call") == "atomic" and unlink_of.get(c.atomic.va) == 1) + 1
                head = await real(calls[:cut], stop_on_error)
                await dom.xen0.evtchn_send(1)
                rest = await real(calls[cut:], stop_on_error)
                head.results.extend(rest.results)
                return head

            session.exchange = exchange
            await dom.events.do_upcall([1, 2])
            assert ran == [1, 2]
            assert [await dom.word(port) for port in PORTS] == [0, 0, 0, 0]
