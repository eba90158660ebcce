"""The guest's upcall handler (xen_evtchn_do_upcall) against shared info in a fake memory.

What Xen would have written before the push (pending bits, selector, upcall_pending, the mask
the bounce frame set) is poked in by hand; the test then checks what the guest cleared, which
handlers ran, and how many messages it took.
"""

import pytest

from guestlib import EventChannels, HypercallClient
from guestlib.xen import (
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
)

from .fake_xen import FakeSession

SHARED_INFO = 0xFFFF880000200000
VCPU = 1
VCPU_INFO = SHARED_INFO + VCPU * VCPU_INFO_SIZE


def word(port: int) -> int:
    return SHARED_INFO + SHARED_INFO_EVTCHN_PENDING + 8 * (port // 64)


def raise_event(xen: FakeSession, port: int, masked: bool = False) -> None:
    """What Xen's evtchn_2l_set_pending and the bounce frame leave in shared info."""
    xen.poke(word(port), xen.peek(word(port)) | 1 << port % 64)
    if masked:
        mask = word(port) + SHARED_INFO_EVTCHN_MASK - SHARED_INFO_EVTCHN_PENDING
        xen.poke(mask, xen.peek(mask) | 1 << port % 64)
    else:
        xen.poke(VCPU_INFO + VCPU_INFO_PENDING_SEL, xen.peek(VCPU_INFO + VCPU_INFO_PENDING_SEL) | 1 << port // 64)
        xen.poke(VCPU_INFO + VCPU_INFO_UPCALL_PENDING, 1, size=1)
    xen.poke(VCPU_INFO + VCPU_INFO_UPCALL_MASK, 1, size=1)


@pytest.fixture
def xen():
    return FakeSession(mapped={SHARED_INFO})


@pytest.fixture
def events(xen):
    return EventChannels(HypercallClient(xen), SHARED_INFO, VCPU)


def handler_log(xen: FakeSession, ran: list):
    """A handler that records its port and whether the port's pending bit was already clear."""

    async def handler(port, tail):
        ran.append((port, not xen.peek(word(port)) >> port % 64 & 1))
        tail.store(SHARED_INFO + 4000, port, size=2)  # an ack, sent with the unmask

    return handler


async def test_hinted_event_is_acked_handled_and_unmasked_in_two_messages(xen, events):
    ran = []
    events.bind(3, handler_log(xen, ran))
    raise_event(xen, 3)
    await events.do_upcall(hint=[3])
    assert ran == [(3, True)]  # its bit was cleared before the handler ran
    assert len(xen.messages) == 2
    assert xen.messages[1][-2].WhichOneof("call") == "store" and xen.peek(SHARED_INFO + 4000, 2) == 3
    assert [xen.peek(VCPU_INFO + off, size) for off, size in [(VCPU_INFO_UPCALL_PENDING, 1), (VCPU_INFO_UPCALL_MASK, 1), (VCPU_INFO_PENDING_SEL, 8)]] == [0, 0, 0]


async def test_scan_finds_unhinted_ports_and_leaves_masked_and_foreign_ones(xen, events):
    ran = []
    for port in (3, 70, 9):
        events.bind(port, handler_log(xen, ran))
    raise_event(xen, 3)
    raise_event(xen, 70)  # word 1, not in the (stale) hint
    raise_event(xen, 5)  # pending in word 0 but another vCPU's port
    raise_event(xen, 9, masked=True)
    await events.do_upcall(hint=[3])
    assert ran == [(3, True), (70, True)]
    assert len(xen.messages) == 3  # the missed port needs its bit cleared before its handler
    assert xen.peek(word(0)) == 1 << 5 | 1 << 9 and xen.peek(word(70)) == 0


async def test_stale_hint_runs_no_handler_for_a_port_no_longer_pending(xen, events):
    ran = []
    events.bind(3, handler_log(xen, ran))
    xen.poke(VCPU_INFO + VCPU_INFO_UPCALL_MASK, 1, size=1)
    await events.do_upcall(hint=[3])
    assert ran == [] and xen.peek(VCPU_INFO + VCPU_INFO_UPCALL_MASK, 1) == 0


async def test_unmapped_shared_info_is_a_clear_error(xen):
    events = EventChannels(HypercallClient(xen), 0x1000, VCPU)
    with pytest.raises(RuntimeError, match="shared-info frame is not mapped writable at 0x1000"):
        await events.do_upcall()
