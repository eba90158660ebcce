"""Event channels, FIFO ABI (docs/xen.md section 24): xen/common/event_fifo.c.

Theory of operation. A domain speaks the 2-level ABI (evtchn.py) until its first
EVTCHNOP_init_control; from then on each port's state for the guest is a u32 *event word* in
an event-array page the guest gave with EVTCHNOP_expand_array (PENDING, MASKED, LINKED, BUSY
and a 17-bit LINK to the next port of its queue), and each vCPU that registered a control
block has 16 queues, one per priority (0 highest): the guest-visible part is the control
block's `ready` bitmap and its `head[]` words; the tail of each queue is Xen's own. All of it
lives in frames the guest owns, which Xen maps with a general and a writable type reference
(map_guest_page): they cannot become pagetables or be freed while mapped, and EVTCHNOP_reset
(DOMID_SELF) or the domain's death gives them back.

Delivery (`set_pending`) sets PENDING; an unmasked event not yet LINKED is LINKED and appended
to its priority's queue on the notified vCPU, by writing its port into the LINK of the tail's
word if that word is still LINKED (the guest has not consumed it), else into the queue's head
in the control block; only then does the queue's `ready` bit go 0->1 and, with it, the vCPU's
evtchn_upcall_pending (the caller does that part, see evtchn.set_pending). The guest consumes
each ready queue from its head, clearing LINKED (and LINK) of each word it takes, as Linux's
events_fifo.c consume_one_event does.

Xen's loops around the guest's concurrent updates (lock_old_queue's three tries, set_link's
BUSY bit and retries) exist because Xen and the guest run at the same time; the core runs
each hypercall as one step between guest accesses, so their first attempt always stands and
BUSY is never left set by Xen. What the guest may write (BUSY included) is taken as it is.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .abi import (
    EVTCHN_FIFO_BUSY,
    EVTCHN_FIFO_CONTROL_HEAD,
    EVTCHN_FIFO_CONTROL_READY,
    EVTCHN_FIFO_CONTROL_SIZE,
    EVTCHN_FIFO_LINK_BITS,
    EVTCHN_FIFO_LINK_MASK,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_MAX_QUEUES,
    EVTCHN_FIFO_NR_CHANNELS,
    EVTCHN_FIFO_PENDING,
    EVTCHN_FIFO_PRIORITY_DEFAULT,
    EVTCHN_FIFO_PRIORITY_MIN,
    PAGE_SIZE,
    Errno,
    PageType,
)
from .errors import XenError

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .evtchn import Evtchn
    from .hypervisor import Hypervisor

EVENT_WORDS_PER_PAGE = PAGE_SIZE // 4
MAX_EVENT_ARRAY_PAGES = EVTCHN_FIFO_NR_CHANNELS // EVENT_WORDS_PER_PAGE


@dataclass
class FifoVcpu:
    """struct evtchn_fifo_vcpu: where the vCPU's control block is (mfn 0: none registered,
    events for it are dropped but stay PENDING) and each queue's tail (0: none)."""

    control_mfn: int = 0
    offset: int = 0
    tails: list[int] = field(default_factory=lambda: [0] * EVTCHN_FIFO_MAX_QUEUES)


@dataclass
class EvtchnFifo:
    """struct evtchn_fifo_domain and the vCPUs' halves: the event-array frames in port order
    (each EVENT_WORDS_PER_PAGE ports) and one FifoVcpu per vCPU."""

    event_array: list[int]
    vcpus: list[FifoVcpu]

    @property
    def num_evtchns(self) -> int:
        return len(self.event_array) * EVENT_WORDS_PER_PAGE

    def frames(self) -> list[int]:
        """Every frame Xen maps for the domain's FIFO state, once per mapping."""
        return self.event_array + [v.control_mfn for v in self.vcpus if v.control_mfn]


# -- guest memory ----------------------------------------------------------------------------


def _u32(hv: "Hypervisor", mfn: int) -> np.ndarray:
    return hv.memory.frame(mfn).view(np.uint32)


def _word(hv: "Hypervisor", domain: "Domain", port: int) -> tuple[np.ndarray, int] | None:
    """evtchn_fifo_word_from_port: the event word of `port` as (u32 view of its frame, index),
    or None beyond the event array."""
    fifo = domain.evtchn_fifo
    if port >= fifo.num_evtchns:
        return None
    page, index = divmod(port, EVENT_WORDS_PER_PAGE)
    return _u32(hv, fifo.event_array[page]), index


def _read(hv: "Hypervisor", domain: "Domain", port: int) -> int | None:
    """The event word of `port` (None beyond the event array), without storing its frame."""
    fifo = domain.evtchn_fifo
    if port >= fifo.num_evtchns:
        return None
    page, index = divmod(port, EVENT_WORDS_PER_PAGE)
    return hv.memory.entries(fifo.event_array[page]).view(np.uint32).item(index)


def _test_and_set(words: np.ndarray, index: int, bit: int) -> bool:
    old = words.item(index)
    words[index] = old | 1 << bit
    return bool(old >> bit & 1)


def is_pending(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_fifo_is_pending."""
    word = _read(hv, domain, port)
    return word is not None and bool(word >> EVTCHN_FIFO_PENDING & 1)


def is_masked(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_fifo_is_masked: a port beyond the event array counts as masked."""
    word = _read(hv, domain, port)
    return word is None or bool(word >> EVTCHN_FIFO_MASKED & 1)


def is_busy(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_fifo_is_busy: still LINKED on a queue, so get_free_port passes it over."""
    word = _read(hv, domain, port)
    return word is not None and bool(word >> EVTCHN_FIFO_LINKED & 1)


# -- delivery --------------------------------------------------------------------------------


def _set_link(words: np.ndarray, index: int, link: int) -> bool:
    """evtchn_fifo_set_link: write `link` into a word still LINKED (clearing BUSY and the old
    LINK, as Xen's try_set_link does); False if the guest has unlinked it (queue empty)."""
    old = words.item(index)
    if not old >> EVTCHN_FIFO_LINKED & 1:
        return False
    words[index] = (old & ~((1 << EVTCHN_FIFO_BUSY) | EVTCHN_FIFO_LINK_MASK)) | link
    return True


def set_pending(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", chn: "Evtchn", port: int) -> tuple[bool, bool]:
    """evtchn_fifo_set_pending for `port` notifying `vcpu`. Returns (was_pending, ready):
    whether PENDING was already set (then pollers are not woken), and whether a queue's ready
    bit went 0->1 (then the caller marks the vCPU's events pending)."""
    word = _word(hv, domain, port)
    if word is None:  # no event-array page yet: remembered for expand_array
        chn.fifo_pending = True
        return False, False
    words, index = word
    was_pending = _test_and_set(words, index, EVTCHN_FIFO_PENDING)
    efv = domain.evtchn_fifo.vcpus[vcpu.vcpu_id]
    if not efv.control_mfn:  # the guest must not unmask before it registers: dropped
        return was_pending, False
    if words.item(index) >> EVTCHN_FIFO_MASKED & 1 or _test_and_set(words, index, EVTCHN_FIFO_LINKED):
        return was_pending, False
    old = domain.evtchn_fifo.vcpus[chn.last_vcpu_id]
    if old.tails[chn.last_priority] == port:  # the old queue is empty now
        old.tails[chn.last_priority] = 0
    chn.last_vcpu_id, chn.last_priority = vcpu.vcpu_id, chn.priority
    tail = efv.tails[chn.priority]
    efv.tails[chn.priority] = port
    if tail:
        same_page = tail // EVENT_WORDS_PER_PAGE == port // EVENT_WORDS_PER_PAGE
        tail_words, tail_index = (words, tail % EVENT_WORDS_PER_PAGE) if same_page else _word(hv, domain, tail)
        if _set_link(tail_words, tail_index, port):
            return was_pending, False
    control = _u32(hv, efv.control_mfn)  # the queue was empty: the port is its head
    base = efv.offset // 4
    control[base + EVTCHN_FIFO_CONTROL_HEAD // 4 + chn.priority] = port
    return was_pending, not _test_and_set(control, base + EVTCHN_FIFO_CONTROL_READY // 4, chn.priority)


def clear_pending(hv: "Hypervisor", domain: "Domain", port: int) -> None:
    """evtchn_fifo_clear_pending (on close): PENDING only; the guest unlinks the rest."""
    word = _word(hv, domain, port)
    if word is not None:
        word[0][word[1]] = word[0].item(word[1]) & ~(1 << EVTCHN_FIFO_PENDING)


def unmask(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_fifo_unmask, first half: clear MASKED; True if the port is PENDING and must be
    relinked (the caller calls set_pending for its notify vCPU)."""
    word = _word(hv, domain, port)
    if word is None:
        return False
    words, index = word
    words[index] = words.item(index) & ~(1 << EVTCHN_FIFO_MASKED)
    return bool(words.item(index) >> EVTCHN_FIFO_PENDING & 1)


def linked_ports(hv: "Hypervisor", domain: "Domain", vcpu_id: int) -> list[int]:
    """The ports queued on a vCPU, each ready queue from its head in priority order: the
    Upcall's hint. The links are the guest's to write, so the walk stops at a word not LINKED,
    beyond the array, or seen before."""
    efv = domain.evtchn_fifo.vcpus[vcpu_id]
    if not efv.control_mfn:
        return []
    control, base = hv.memory.entries(efv.control_mfn).view(np.uint32), efv.offset // 4
    ready = control.item(base + EVTCHN_FIFO_CONTROL_READY // 4)
    ports: list[int] = []
    seen: set[int] = set()
    for priority in range(EVTCHN_FIFO_MAX_QUEUES):
        if not ready >> priority & 1:
            continue
        port = control.item(base + EVTCHN_FIFO_CONTROL_HEAD // 4 + priority) & EVTCHN_FIFO_LINK_MASK
        while port and port not in seen:
            w = _read(hv, domain, port)
            if w is None or not w >> EVTCHN_FIFO_LINKED & 1:
                break
            seen.add(port)
            if w >> EVTCHN_FIFO_PENDING & 1 and not w >> EVTCHN_FIFO_MASKED & 1:
                ports.append(port)
            port = w & EVTCHN_FIFO_LINK_MASK
    return ports


# -- mapping guest frames ----------------------------------------------------------------------


def _map_guest_page(hv: "Hypervisor", domain: "Domain", gfn: int, what: str) -> int:
    """map_guest_page: a general and a writable type reference on a frame the domain owns (a PV
    guest's gfn is its mfn). EINVAL if it does not own it or the frame has another type."""
    try:
        hv.frames.get_page_and_type(gfn, domain.domid, PageType.WRITABLE)
    except XenError as e:
        raise XenError(Errno.EINVAL, f"{what}: mfn {gfn:#x} cannot be mapped for dom{domain.domid} (map_guest_page: {e.message})") from None
    return gfn


def destroy(hv: "Hypervisor", domain: "Domain") -> None:
    """evtchn_fifo_destroy: unmap every control block and event-array page, back to 2-level."""
    if domain.evtchn_fifo is None:
        return
    for mfn in domain.evtchn_fifo.frames():
        hv.frames.put_page_and_type(mfn)
    domain.evtchn_fifo = None


# -- EVTCHNOP_init_control, expand_array, set_priority --------------------------------------


def init_control(hv: "Hypervisor", current: "Vcpu", control_gfn: int, offset: int, vcpu: int) -> dict:
    """Register `vcpu`'s control block at `offset` in frame `control_gfn`. The first one
    switches the domain to FIFO (every bound port's 2-level pending bit is remembered and its
    priority reset to the default). Returns {"link_bits": 17}."""
    domain = hv.domains[current.domid]
    if not 0 <= vcpu < len(domain.vcpus):
        raise XenError(Errno.ENOENT, f"init_control: dom{domain.domid} has no vCPU {vcpu}")
    if offset > PAGE_SIZE - EVTCHN_FIFO_CONTROL_SIZE:
        raise XenError(Errno.EINVAL, f"init_control: offset {offset:#x} puts the {EVTCHN_FIFO_CONTROL_SIZE}-byte control block across the end of mfn {control_gfn:#x}")
    if offset % 8:
        raise XenError(Errno.EINVAL, f"init_control: offset {offset:#x} is not 8-byte aligned")
    fifo = domain.evtchn_fifo
    if fifo is not None and fifo.vcpus[vcpu].control_mfn:
        have = fifo.vcpus[vcpu]
        raise XenError(Errno.EINVAL, f"init_control: vCPU {vcpu} of dom{domain.domid} already has its control block (mfn {have.control_mfn:#x} offset {have.offset:#x})")
    mfn = _map_guest_page(hv, domain, control_gfn, "init_control")
    if fifo is None:
        domain.evtchn_fifo = fifo = EvtchnFifo(event_array=[], vcpus=[FifoVcpu() for _ in domain.vcpus])
        _setup_ports(hv, domain)
    fifo.vcpus[vcpu].control_mfn, fifo.vcpus[vcpu].offset = mfn, offset
    return {"link_bits": EVTCHN_FIFO_LINK_BITS}


def _setup_ports(hv: "Hypervisor", domain: "Domain") -> None:
    """setup_ports: each valid port keeps its 2-level pending bit as `fifo_pending` (raised
    when its event-array page arrives) and takes the default priority."""
    from .evtchn import two_level_pending  # evtchn imports this module

    for port, chn in enumerate(domain.evtchn[1:], start=1):
        if two_level_pending(hv, domain, port):
            chn.fifo_pending = True
        chn.priority = EVTCHN_FIFO_PRIORITY_DEFAULT


def expand_array(hv: "Hypervisor", current: "Vcpu", array_gfn: int) -> int:
    """add_page_to_event_array: the next EVENT_WORDS_PER_PAGE ports' words are in `array_gfn`;
    events that came for them meanwhile are raised now. EOPNOTSUPP before init_control,
    ENOSPC beyond the ABI's 2^17 ports."""
    from .evtchn import set_pending  # evtchn imports this module

    domain = hv.domains[current.domid]
    fifo = domain.evtchn_fifo
    if fifo is None:
        raise XenError(Errno.EOPNOTSUPP, f"expand_array: dom{domain.domid} uses the 2-level ABI (no EVTCHNOP_init_control yet)")
    if len(fifo.event_array) >= MAX_EVENT_ARRAY_PAGES:
        raise XenError(Errno.ENOSPC, f"expand_array: dom{domain.domid} already has all {MAX_EVENT_ARRAY_PAGES} event-array pages ({EVTCHN_FIFO_NR_CHANNELS} ports)")
    first = fifo.num_evtchns
    fifo.event_array.append(_map_guest_page(hv, domain, array_gfn, "expand_array"))
    for port in range(first, min(fifo.num_evtchns, len(domain.evtchn))):
        chn = domain.evtchn[port]
        if chn.fifo_pending:
            chn.fifo_pending = False
            set_pending(hv, domain, chn.notify_vcpu_id, port)
    return 0


def set_priority(hv: "Hypervisor", current: "Vcpu", port: int, priority: int) -> int:
    """evtchn_set_priority: future events of `port` go to queue `priority` (one pending or
    being linked stays on its old queue). EINVAL for an invalid port or a priority beyond
    EVTCHN_FIFO_PRIORITY_MIN, ENOSYS while the domain speaks 2-level."""
    from .evtchn import valid_port  # evtchn imports this module

    domain = hv.domains[current.domid]
    chn = valid_port(domain, port, "set_priority")
    if domain.evtchn_fifo is None:
        raise XenError(Errno.ENOSYS, f"set_priority: dom{domain.domid} uses the 2-level ABI, which has no priorities")
    if priority > EVTCHN_FIFO_PRIORITY_MIN:
        raise XenError(Errno.EINVAL, f"set_priority: priority {priority} is beyond EVTCHN_FIFO_PRIORITY_MIN ({EVTCHN_FIFO_PRIORITY_MIN})")
    chn.priority = priority
    return 0


def audit(hv: "Hypervisor", domain: "Domain") -> list[str]:
    """Each frame Xen maps for the domain is the domain's and writable (its references are
    counted by audit.py), and each vCPU's queue tails lie within the event array."""
    fifo, d = domain.evtchn_fifo, domain.domid
    findings = []
    for mfn in fifo.frames():
        if hv.frames.owner.item(mfn) != d or hv.frames.type.item(mfn) != PageType.WRITABLE:
            findings.append(f"dom{d}: FIFO event-channel frame mfn {mfn:#x} is {hv.frames.describe_owner(mfn)}, type {PageType(hv.frames.type.item(mfn)).name}")
    for vcpu_id, efv in enumerate(fifo.vcpus):
        for priority, tail in enumerate(efv.tails):
            if tail >= max(fifo.num_evtchns, 1):
                findings.append(f"dom{d} vCPU {vcpu_id}: FIFO queue {priority} tail {tail} is beyond the event array")
    return findings
