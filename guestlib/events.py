"""Event-channel upcalls, guest side: Linux's xen_evtchn_do_upcall over the 2-level ABI
(`EventChannels`) or the FIFO ABI (`FifoEventChannels`, docs/linux.md section 12).

The Upcall push is only the interrupt; the truth is in the shared-info frame (docs/xen.md sections
16.5-16.6), which the guest reads and clears with its own simulated loads, stores and atomics
through the virtual address where it mapped that frame (Linux: set_fixmap of
start_info->shared_info). The contract has no physical-memory access, so the frame must be
mapped writable before events can be handled. Where the bits are and how wide the words are
depends on the guest's address size (`layout`, from its start_info magic: xen.guest_abi;
docs/pv32.md sections 6-7): a 32-bit guest has 32 words of 32 ports and a u32 selector.
"""

import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .hypercalls import Batch, HypercallClient, PageFault, Pending
from .xen import (
    EVTCHN_FIFO_CONTROL_HEAD,
    EVTCHN_FIFO_CONTROL_READY,
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_MAX_QUEUES,
    EVTCHN_FIFO_PENDING,
    GUEST_ABI,
    PAGE_SIZE,
    SHARED_INFO_EVTCHN_PENDING,
    SHARED_INFO_VCPU_INFO,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    GuestAbi,
)

Handler = Callable[[int, Batch], Awaitable[None]]
Prefetch = Callable[[Batch], Any]
"""A handler's prefetch: `prefetch(first)` queues the reads its handler will need on the upcall's
first message (the one that takes the port's pending bit) and returns what the handler should
get, so a handler that must read guest memory costs no message of its own."""
"""An event handler: `await handler(port, tail)`. It runs after the port's pending bit is
cleared (Linux acks before it handles, so a new event during the handler is not lost) and with
upcalls masked. Calls it queues on `tail` are sent in one message with the unmask that ends the
upcall; calls whose results it needs it makes on the client directly."""


class EventChannels:
    """One vCPU's event dispatch: handlers per port, and the upcall task `run()`.

    A port's handler must be bound on the vCPU that the port notifies (Linux's
    bind_evtchn_to_cpu): the scan takes only this vCPU's ports out of the shared bitmaps.
    """

    abi = "2l"

    def __init__(self, client: HypercallClient, shared_info_va: int, vcpu_id: int, vcpu_info_va: int | None = None, layout: GuestAbi = GUEST_ABI[64]):
        """`vcpu_info_va`: where the vCPU's vcpu_info is mapped if it was moved out of shared
        info (VCPUOP_register_vcpu_info); shared info's slot for the vCPU otherwise. `layout`:
        the guest's address size's (xen.guest_abi of its start_info magic)."""
        self._client = client
        self._shared_info = shared_info_va
        self._vcpu_info = shared_info_va + SHARED_INFO_VCPU_INFO + VCPU_INFO_SIZE * vcpu_id if vcpu_info_va is None else vcpu_info_va
        self._handlers: dict[int, Handler] = {}
        self._prefetch: dict[int, Prefetch] = {}
        self._word, self._bits = layout.word_bytes, layout.bits_per_evtchn_word
        self._word_mask = (1 << self._bits) - 1
        self._evtchn_mask = shared_info_va + layout.shared_info_evtchn_mask
        self._pending_sel = self._vcpu_info + layout.vcpu_info_pending_sel
        # evtchn_pending and evtchn_mask, back to back: `bits` little-endian words each.
        self._bitmap = f"<{self._bits}{'Q' if self._word == 8 else 'I'}"
        self._bitmap_bytes = layout.shared_info_evtchn_mask - SHARED_INFO_EVTCHN_PENDING

    def bind(self, port: int, handler: Handler, prefetch: Prefetch | None = None) -> None:
        """Handle port's events on this vCPU (bind_evtchn_to_irqhandler, minus the hypercall).
        With `prefetch`, the handler is called as `handler(port, tail, prefetched)`."""
        self._handlers[port] = handler
        if prefetch is not None:
            self._prefetch[port] = prefetch

    def unbind(self, port: int) -> None:
        del self._handlers[port]

    def mask(self, batch: Batch, port: int) -> None:
        """mask_evtchn: sync_set_bit on the port's mask bit."""
        word, bit = divmod(port, self._bits)
        batch.atomic("fetch_or", self._evtchn_mask + self._word * word, 1 << bit, size=self._word)

    def unmask(self, batch: Batch, port: int) -> None:
        """unmask_evtchn for a port bound in this boot, which has had no event yet: the mask
        bit cleared (a pending port would also need EVTCHNOP_unmask)."""
        word, bit = divmod(port, self._bits)
        batch.atomic("fetch_and", self._evtchn_mask + self._word * word, ~(1 << bit) & self._word_mask, size=self._word)

    def clear_pending(self, batch: Batch, port: int) -> Pending:
        """clear_evtchn: sync_clear_bit on the port's pending bit; the Pending's value is the old word."""
        return self._clear(batch, self._port_words([port]))[port // self._bits]

    async def recover(self) -> None:
        """What a process that takes over this vCPU must undo of its predecessor's upcall;
        nothing under 2-level, where Xen's hint names every pending port."""

    async def local_irq_enable(self) -> None:
        """Clear this vCPU's evtchn_upcall_mask; the hypervisor then delivers what is pending.
        Xen's domain builder leaves it set (libxenguest's shared_info_x86_64), so a guest
        calls this once it can take events."""
        self._mapped(await self._client.store(self._vcpu_info + VCPU_INFO_UPCALL_MASK, 0, size=1))

    async def run(self) -> None:
        """The upcall task: handle each Upcall push until the Session ends."""
        async for upcall in self._client.session.upcalls:
            await self.do_upcall(upcall.pending_ports)

    async def do_upcall(self, hint: Iterable[int] = ()) -> None:
        """xen_evtchn_do_upcall, in as few messages as the hint allows (usually two).

        Linux clears evtchn_upcall_pending, takes evtchn_pending_sel with xchg, scans
        pending & ~mask in the selected words, clears each pending bit it handles, runs the
        handlers, and leaves with the mask cleared (its iret). The first message here does the
        first two steps, and also clears the bits of the ports in the push's hint (ours,
        pending and unmasked when the push was sent; fetch_and's old value says which were
        still pending) and reads both bitmaps for the scan. Only a port the hint missed needs a
        second message to clear its bit before its handler runs. The last message carries what
        the handlers queued and the unmask; if an event came in meanwhile the hypervisor
        pushes a new Upcall as soon as the mask is clear.
        """
        mine = self._port_words(self._handlers)
        claimed = self._port_words(port for port in hint if port in self._handlers)
        async with self._client.batch() as first:
            first.store(self._vcpu_info + VCPU_INFO_UPCALL_PENDING, 0, size=1)
            selector = first.atomic("xchg", self._pending_sel, 0, size=self._word)
            cleared = self._clear(first, claimed)
            bitmaps = first.read(self._shared_info + SHARED_INFO_EVTCHN_PENDING, 2 * self._bitmap_bytes)
            prefetched = {port: self._prefetch[port](first) for port in hint if port in self._prefetch}
        ports = self._taken(cleared, claimed)
        pending, mask = (struct.unpack_from(self._bitmap, self._mapped(bitmaps.result()), offset) for offset in (0, self._bitmap_bytes))
        missed = {}
        for word in self._set_bits(self._mapped(selector.result())):
            bits = pending[word] & ~mask[word] & mine.get(word, 0)
            if bits:
                missed[word] = bits
        if missed:
            async with self._client.batch() as second:
                cleared = self._clear(second, missed)
            ports |= self._taken(cleared, missed)
        await self._run_handlers(sorted(ports), prefetched)

    async def _run_handlers(self, ports: list[int], prefetched: dict) -> None:
        """Run the handlers of the ports taken, in order, then end the upcall: one message
        with what they queued and the unmask."""
        tail = self._client.batch()
        for port in ports:
            if port in self._prefetch:
                if port not in prefetched:  # a port the hint missed reads on its own
                    async with self._client.batch() as late:
                        prefetched[port] = self._prefetch[port](late)
                await self._handlers[port](port, tail, prefetched[port])
            else:
                await self._handlers[port](port, tail)
        tail.store(self._vcpu_info + VCPU_INFO_UPCALL_MASK, 0, size=1)
        await tail.flush()

    def _clear(self, batch: Batch, words: dict[int, int]) -> dict[int, Pending]:
        """Queue sync_clear_bit for each word's bits; each Pending's value is the old word."""
        base = self._shared_info + SHARED_INFO_EVTCHN_PENDING
        return {word: batch.atomic("fetch_and", base + self._word * word, ~bits & self._word_mask, size=self._word) for word, bits in words.items()}

    def _taken(self, cleared: dict[int, Pending], wanted: dict[int, int]) -> set[int]:
        """The ports whose bit fetch_and found set, i.e. that this vCPU took off the bitmap."""
        return {word * self._bits + bit for word, old in cleared.items() for bit in self._set_bits(self._mapped(old.result()) & wanted[word])}

    def _port_words(self, ports: Iterable[int]) -> dict[int, int]:
        """Ports as {word index: bit mask}, the 2-level ABI's layout."""
        words: dict[int, int] = {}
        for port in ports:
            word, bit = divmod(port, self._bits)
            words[word] = words.get(word, 0) | 1 << bit
        return words

    def _set_bits(self, word: int) -> list[int]:
        return [bit for bit in range(self._bits) if word >> bit & 1]

    def _mapped(self, value):
        """A shared-info access's value; a fault means the guest has not mapped the frame."""
        if isinstance(value, PageFault):
            raise RuntimeError(f"the shared-info frame is not mapped writable at {self._shared_info:#x}: {value}")
        return value


U32 = 0xFFFFFFFF
_UNLINK = ~((1 << EVTCHN_FIFO_LINKED) | EVTCHN_FIFO_LINK_MASK) & U32
_ACK = ~(1 << EVTCHN_FIFO_PENDING) & U32
_HEADS = f"<{EVTCHN_FIFO_MAX_QUEUES}I"


def _live(word: int) -> bool:
    """PENDING and not MASKED: consume_one_event handles the port."""
    return bool(word >> EVTCHN_FIFO_PENDING & 1) and not word >> EVTCHN_FIFO_MASKED & 1


class FifoEventChannels(EventChannels):
    """One vCPU's event dispatch over the FIFO ABI (docs/linux.md section 12): its control
    block at `control_va` and the event array's first page at `array_va`, both in the
    kernel's direct map. Event words are u32, read and changed with 4-byte atomics."""

    abi = "fifo"

    def __init__(self, client: HypercallClient, shared_info_va: int, vcpu_id: int, control_va: int, array_va: int, vcpu_info_va: int | None = None, layout: GuestAbi = GUEST_ABI[64]):
        super().__init__(client, shared_info_va, vcpu_id, vcpu_info_va, layout)
        self._control, self._array = control_va, array_va

    def word_va(self, port: int) -> int:
        if not 0 < port < PAGE_SIZE // 4:
            raise ValueError(f"port {port} is beyond the kernel's one event-array page")
        return self._array + 4 * port

    def mask(self, batch: Batch, port: int) -> None:
        batch.atomic("fetch_or", self.word_va(port), 1 << EVTCHN_FIFO_MASKED, size=4)

    def unmask(self, batch: Batch, port: int) -> None:
        batch.atomic("fetch_and", self.word_va(port), ~(1 << EVTCHN_FIFO_MASKED) & U32, size=4)

    def clear_pending(self, batch: Batch, port: int) -> Pending:
        return batch.atomic("fetch_and", self.word_va(port), _ACK, size=4)

    async def do_upcall(self, hint: Iterable[int] = ()) -> None:
        """__evtchn_fifo_handle_events, pipelined on Xen's hint (the ready queues' pending
        ports in consumption order): the first message clears evtchn_upcall_pending, takes
        `ready` with xchg, reads the heads, and unlinks and acks each hinted port in order
        (clear_linked: the old word's LINK is the next port). Then each ready queue is walked
        from its head through those old words, highest priority first, each old word used once:
        a port the hint missed, or one Xen linked again after its unlink (the walk meets it a
        second time), is unlinked afresh in a message of its own. A walk that ends at LINK 0
        leaves the queue empty, so a later event writes a new head and sets `ready` again,
        which marks a new upcall."""
        hinted = list(dict.fromkeys(hint))
        async with self._client.batch() as first:
            first.store(self._vcpu_info + VCPU_INFO_UPCALL_PENDING, 0, size=1)
            ready = first.atomic("xchg", self._control + EVTCHN_FIFO_CONTROL_READY, 0, size=4)
            heads = first.read(self._control + EVTCHN_FIFO_CONTROL_HEAD, 4 * EVTCHN_FIFO_MAX_QUEUES)
            unlinked = {port: first.atomic("fetch_and", self.word_va(port), _UNLINK, size=4) for port in hinted}
            acked = {port: self.clear_pending(first, port) for port in hinted if port in self._handlers}
            prefetched = {port: self._prefetch[port](first) for port in hinted if port in self._prefetch}
        ports = [port for port, pending in acked.items() if _live(self._mapped(pending.result()))]
        head = struct.unpack(_HEADS, self._mapped(heads.result()))
        ready_bits = self._mapped(ready.result())
        for q in range(EVTCHN_FIFO_MAX_QUEUES):
            port = head[q] & EVTCHN_FIFO_LINK_MASK if ready_bits >> q & 1 else 0
            while port:
                if port in unlinked:
                    word = self._mapped(unlinked.pop(port).result())
                else:  # unlink it now, then ack it if it is live
                    async with self._client.batch() as late:
                        fresh = late.atomic("fetch_and", self.word_va(port), _UNLINK, size=4)
                    word = self._mapped(fresh.result())
                    if _live(word) and port in self._handlers:
                        async with self._client.batch() as late:
                            self.clear_pending(late, port)
                        if port not in ports:
                            ports.append(port)
                port = word & EVTCHN_FIFO_LINK_MASK
        await self._run_handlers(ports, prefetched)

    async def recover(self) -> None:
        """A process that died mid-upcall may have taken `ready` and unlinked the head of a
        queue whose rest only it knew: those words stay LINKED, so Xen appends to them and
        never sets `ready` again. Unlink every port of this vCPU (the guest may clear LINKED at
        any time) until a round finds none linked: a port Xen links meanwhile is linked after
        one of ours, which the next round then finds. The live ones are handled."""
        mine = sorted(self._handlers)
        live: set[int] = set()
        while True:
            async with self._client.batch() as batch:
                batch.atomic("xchg", self._control + EVTCHN_FIFO_CONTROL_READY, 0, size=4)
                words = {port: batch.atomic("fetch_and", self.word_va(port), _UNLINK, size=4) for port in mine}
            old = {port: self._mapped(word.result()) for port, word in words.items()}
            live |= {port for port, word in old.items() if _live(word)}
            if not any(word >> EVTCHN_FIFO_LINKED & 1 for word in old.values()):
                break
        if live:
            async with self._client.batch() as batch:
                for port in live:
                    self.clear_pending(batch, port)
            await self._run_handlers(sorted(live), {})
