"""The guest's 2-level upcall handler with a 32-bit guest's layout (docs/pv32.md section 21):
32-bit event words, evtchn_mask at byte 2176, and a u32 evtchn_pending_sel at byte 4 of the
vcpu_info.

The server does not build 32-bit domains yet (the PV32 builder is another branch's), so these
tests run a 64-bit domain and write what Xen's evtchn_2l_set_pending writes for a 32-bit guest
themselves, through vCPU 0: the pending bits (the same bits for both sizes, counted from
evtchn_pending) and the selector's bits. The 64-bit selector stays 0, so the server itself
delivers nothing; what is checked is where the guest's handler reads, clears and masks.
"""

import trio

from guestlib import EventChannels
from guestlib.xen import COMPAT_SHARED_INFO_EVTCHN_MASK, COMPAT_VCPU_INFO_PENDING_SEL, GUEST_ABI, guest_abi

from .domain import TIMEOUT
from .test_events import VCPU, events_domain


def test_the_layout_comes_from_the_start_info_magic():
    assert guest_abi(b"xen-3.0-x86_32p\0") is GUEST_ABI[32] and guest_abi("xen-3.0-x86_64") is GUEST_ABI[64]


async def test_the_upcall_scans_u32_words_from_the_u32_selector(server):
    with trio.fail_after(TIMEOUT):
        async with events_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU, layout=GUEST_ABI[32])
            ran = []
            for port in (40, 70):  # u32 words 1 and 2
                events.bind(port, dom.handler_log(ran))
            for port in (40, 70, 9):  # 9: pending, but not selected (Xen would have set bit 0)
                await dom.xen0.atomic("fetch_or", dom.word(port), 1 << port % 64)
            selector = dom.vcpu_info(COMPAT_VCPU_INFO_PENDING_SEL)
            assert await dom.xen0.store(selector, 0b110, size=4) is None
            await events.do_upcall()
            assert ran == [(40, True), (70, True)]
            assert await dom.peek(selector, 4) == 0 and await dom.peek(dom.word(0)) == 1 << 9 and await dom.peek(dom.word(70)) == 0


async def test_mask_and_unmask_write_the_compat_evtchn_mask(server):
    with trio.fail_after(TIMEOUT):
        async with events_domain(server) as dom:
            events = EventChannels(dom.xen1, dom.shared_info, VCPU, layout=GUEST_ABI[32])
            word = dom.shared_info + COMPAT_SHARED_INFO_EVTCHN_MASK + 4 * (40 // 32)
            async with dom.xen1.batch() as batch:
                events.mask(batch, 40)
            assert await dom.peek(word, 4) == 1 << 40 % 32 and await dom.peek(dom.mask_word(40)) == 0  # not the 64-bit mask
            async with dom.xen1.batch() as batch:
                events.unmask(batch, 40)
            assert await dom.peek(word, 4) == 0
