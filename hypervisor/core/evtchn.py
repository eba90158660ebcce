"""Event channels, 2-level ABI (docs/xen.md section 16): the port table of each domain and
the pending, mask and selector bits that live in its shared-info frame.

Theory of operation. Each domain has a table of ports that grows in buckets of 64: a port below
the allocated buckets is *valid* (`port_is_valid`), a port beyond them is EINVAL to every op,
and an unallocated port inside a bucket is merely free (status: closed). Port 0 is reserved;
allocation takes the lowest free port up to the domain's `max_evtchn_port`. A port is free,
unbound (offered to one remote domain), interdomain (joined to a port of another domain, or of
its own: loopback), bound to a virtual IRQ, or an IPI. That state lives here, as Xen's struct
evtchn lives in Xen's heap. What the guest sees lives in its shared-info frame, exactly where
Xen puts it for the guest's address size (Domain.abi; docs/pv32.md section 7): a pending and a
mask bit per port and, per vCPU, a selector word and the upcall-pending and upcall-mask bytes.
The bitmaps are little-endian, so port p is bit p % 64 of the frame's u64 word p // 64 from
evtchn_pending on, whether the guest's words are 64 bits or 32 (the compat ABI's 1,024 ports). The guest reads and clears them
with its own loads and atomics, as Linux does; Xen writes a mask bit only in EVTCHNOP_unmask.

Delivery (`set_pending`, docs/xen.md section 16.5) sets the port's pending bit and goes on only if that bit
was clear. If the port is unmasked and the selector bit of its word was clear, the notified
vCPU's upcall-pending goes 0->1 and the vCPU is kicked (see `sched`). Each step fires only on
the edge of the one before, so events coalesce: a storm of sends costs the guest one upcall. A
masked port gets its pending bit only, and EVTCHNOP_unmask redelivers it. Pollers of the port
are woken either way.
"""

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

import numpy as np

from . import evtchn_fifo
from .abi import (
    BITS_PER_EVTCHN_WORD,
    DOMID_SELF,
    EVTCHN_FIFO_NR_CHANNELS,
    EVTCHN_FIFO_PRIORITY_DEFAULT,
    GUEST_ABI,
    NR_VIRQS,
    SHARED_INFO_EVTCHN_PENDING,
    SHARED_INFO_VCPU_INFO,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    VIRQ_ARGO,
    VIRQ_DEBUG,
    VIRQ_TIMER,
    VIRQ_XENOPROF,
    VIRQ_XENPMU,
    Errno,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_pirq,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from .errors import XenError
from .sched import rebind_periodic_timer, vcpu_kick, vcpu_unblock

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .hypervisor import Hypervisor

EVTCHNS_PER_BUCKET = 64
LIBXL_MAX_EVTCHN_PORT = 1023  # libxl's default event_channels (docs/xen.md section 16.2)
# A domU's d->nr_pirqs (xen/common/domain.c, domain_create): nr_static_irqs, which is
# nr_irqs_gsi, NR_ISA_IRQS = 16 on a host without an IO-APIC (xen/arch/x86/irq.c), plus
# extra_domU_irqs, DEFAULT_EXTRA_DOMU_IRQS = 32.
NR_PIRQS = 16 + 32

# The shared-info frame as 512 u64 words: where evtchn_pending starts, for either address size
# (evtchn_mask's word is _mask(domain)).
_PENDING = SHARED_INFO_EVTCHN_PENDING // 8
# evtchn_upcall_pending and _mask are bytes 0 and 1 of a vcpu_info's first word.
_UPCALL_PENDING_SHIFT = 8 * VCPU_INFO_UPCALL_PENDING
_UPCALL_MASK_SHIFT = 8 * VCPU_INFO_UPCALL_MASK
assert VCPU_INFO_UPCALL_PENDING < 8 and VCPU_INFO_UPCALL_MASK < 8


# Per address size, in the frame's u64 words (a hot path: computed once): where evtchn_mask
# starts, and evtchn_pending_sel's word within a vcpu_info, its first bit, and the ports per
# bit (the guest's word). A 32-bit guest's selector is the upper half of the first word.
_TWO_LEVEL = {
    size: (abi.shared_info_evtchn_mask // 8, abi.vcpu_info_pending_sel // 8, 8 * (abi.vcpu_info_pending_sel % 8), abi.bits_per_evtchn_word)
    for size, abi in GUEST_ABI.items()
}


def _mask(domain: "Domain") -> int:
    """The u64 word of the shared-info frame where the domain's evtchn_mask starts."""
    return _TWO_LEVEL[domain.address_size][0]


def _selector(domain: "Domain", port: int) -> tuple[int, int]:
    """evtchn_pending_sel's bit for the guest word that holds `port`: (u64 word within the
    vcpu_info, bit of it)."""
    _, index, first, bits = _TWO_LEVEL[domain.address_size]
    return index, first + port // bits


def vcpu_info_words(hv: "Hypervisor", vcpu: "Vcpu") -> tuple[int, int]:
    """Where the vCPU's vcpu_info is: (mfn, index of its first u64 word). vcpu_info[vcpu_id]
    of the shared-info frame until VCPUOP_register_vcpu_info moves it (docs/vcpu-time.md section 7)."""
    if vcpu.vcpu_info_area is not None:
        mfn, offset = vcpu.vcpu_info_area
        return mfn, offset // 8
    return hv.domains[vcpu.domid].shared_info_mfn, (SHARED_INFO_VCPU_INFO + vcpu.vcpu_id * VCPU_INFO_SIZE) // 8


class ECS(IntEnum):
    """A port's state: Xen's internal ECS_* (docs/xen.md section 16.1)."""

    FREE = 0
    RESERVED = 1
    UNBOUND = 2
    INTERDOMAIN = 3
    PIRQ = 4
    VIRQ = 5
    IPI = 6


# What EVTCHNOP_status reports for each state (docs/xen.md section 16.1).
_STATUS = {
    ECS.FREE: EVTCHNSTAT_closed,
    ECS.RESERVED: EVTCHNSTAT_closed,
    ECS.UNBOUND: EVTCHNSTAT_unbound,
    ECS.INTERDOMAIN: EVTCHNSTAT_interdomain,
    ECS.PIRQ: EVTCHNSTAT_pirq,
    ECS.VIRQ: EVTCHNSTAT_virq,
    ECS.IPI: EVTCHNSTAT_ipi,
}


class VirqType(Enum):
    """get_virq_type (docs/xen.md section 16.4): who a VIRQ belongs to, hence which vCPU's
    virq_to_evtchn holds its port (the target's for VCPU, vCPU 0's otherwise)."""

    VCPU = "per-vCPU"
    DOMAIN = "per-domain"
    GLOBAL = "global"


_VIRQ_TYPE = {
    VIRQ_TIMER: VirqType.VCPU,
    VIRQ_DEBUG: VirqType.VCPU,
    VIRQ_XENOPROF: VirqType.VCPU,
    VIRQ_XENPMU: VirqType.VCPU,
    VIRQ_ARGO: VirqType.DOMAIN,
}  # every other VIRQ, the x86 VIRQ_ARCH_* included, is global


def virq_type(virq: int) -> VirqType:
    return _VIRQ_TYPE.get(virq, VirqType.GLOBAL)


@dataclass(slots=True)
class Evtchn:
    """One port (Xen's struct evtchn): its state and what that state binds it to."""

    state: ECS = ECS.FREE
    notify_vcpu_id: int = 0
    remote_domid: int = 0  # UNBOUND: the domain that may bind; INTERDOMAIN: the peer
    remote_port: int = 0  # INTERDOMAIN: the peer's port
    virq: int = 0  # VIRQ: which one
    # FIFO ABI (evtchn_fifo.py): the queue of future events, the queue (vCPU, priority) the
    # port was last linked on (Xen's fifo_lastq, kept across close as Xen keeps it), and an
    # event that came before its event-array page (Xen's evtchn->pending).
    priority: int = EVTCHN_FIFO_PRIORITY_DEFAULT
    last_vcpu_id: int = 0
    last_priority: int = 0
    fifo_pending: bool = False

    @property
    def usable(self) -> bool:
        """evtchn_usable: bound to something (a guest port never has a Xen consumer here)."""
        return self.state > ECS.RESERVED


# -- the port table ----------------------------------------------------------------------


def evtchn_init(domain: "Domain") -> None:
    """evtchn_init: the first bucket, with port 0 reserved."""
    domain.evtchn = [Evtchn() for _ in range(EVTCHNS_PER_BUCKET)]
    domain.evtchn[0].state = ECS.RESERVED


def port_is_valid(domain: "Domain", port: int) -> bool:
    return 0 <= port < len(domain.evtchn)


def valid_port(domain: "Domain", port: int, op: str) -> Evtchn:
    if not port_is_valid(domain, port):
        raise XenError(
            Errno.EINVAL,
            f"{op}: dom{domain.domid} port {port} is beyond its allocated ports 0..{len(domain.evtchn) - 1} (port_is_valid)",
        )
    return domain.evtchn[port]


def max_evtchns(domain: "Domain") -> int:
    """max_evtchns: the ports of the ABI the domain speaks (docs/xen.md section 24.5), 2-level
    ones for its address size (docs/pv32.md section 8)."""
    return domain.abi.evtchn_2l_nr_channels if domain.evtchn_fifo is None else EVTCHN_FIFO_NR_CHANNELS


def _port_limit(domain: "Domain") -> int:
    """The highest port the domain may allocate: its cap, within its ABI."""
    return min(domain.max_evtchn_port, max_evtchns(domain) - 1)


def get_free_port(hv: "Hypervisor", domain: "Domain") -> int:
    """get_free_port (docs/xen.md section 16.2): the lowest free port up to the cap, which may lie in the
    next bucket. Unlike Xen, the table grows only when an op binds the port (`claim_port`): a
    failed op then leaves it as it was, and a foreign caller refused by XSM cannot grow or
    probe another domain's table. Under FIFO a free port still LINKED on a queue is passed
    over (evtchn_allocate_port: evtchn_is_busy), so the guest's queue is never corrupted."""
    table, limit, fifo = domain.evtchn, _port_limit(domain), domain.evtchn_fifo is not None
    for port in range(min(limit + 1, len(table))):
        if table[port].state == ECS.FREE and not (fifo and evtchn_fifo.is_busy(hv, domain, port)):
            return port
    port = len(table)
    if port > limit:
        raise XenError(
            Errno.ENOSPC,
            f"dom{domain.domid} has no free event-channel port: every port up to {limit} is in use or still linked "
            f"(max_evtchn_port {domain.max_evtchn_port}, {'FIFO' if fifo else '2-level'} ABI {max_evtchns(domain)} ports)",
        )
    return port


def claim_port(domain: "Domain", port: int) -> "Evtchn":
    """The channel of a port from `get_free_port`, adding its bucket if it is the next one,
    with the default FIFO priority (evtchn_port_init: a set_priority of the free port does not
    carry over into the binding)."""
    if port >= len(domain.evtchn):
        domain.evtchn.extend(Evtchn() for _ in range(EVTCHNS_PER_BUCKET))
    chn = domain.evtchn[port]
    chn.priority = EVTCHN_FIFO_PRIORITY_DEFAULT
    return chn


def _domain_by_any_id(hv: "Hypervisor", caller: "Domain", domid: int) -> "Domain":
    """rcu_lock_domain_by_any_id: DOMID_SELF or any existing domain (its own id included)."""
    if domid == DOMID_SELF:
        return caller
    domain = hv.domains.get(domid)
    if domain is None:
        raise XenError(Errno.ESRCH, f"dom{domid} does not exist")
    return domain


def _check_target(caller: "Domain", domain: "Domain", what: str) -> None:
    """The XSM dummy policy's XSM_TARGET: a domain acts on its own ports unless privileged."""
    if domain is not caller and not caller.privileged:
        raise XenError(Errno.EPERM, f"dom{caller.domid} may not {what} ports of dom{domain.domid} (itself only, unless privileged)")


# -- the bits in shared info ---------------------------------------------------------------


def _test_and_set_bit(words: np.ndarray, index: int, bit: int) -> bool:
    word = words.item(index)
    if word >> bit & 1:
        return True
    words[index] = word | (1 << bit)
    return False


def _test_and_clear_bit(words: np.ndarray, index: int, bit: int) -> bool:
    word = words.item(index)
    if not word >> bit & 1:
        return False
    words[index] = word & ~(1 << bit)
    return True


def _notify(hv: "Hypervisor", domain: "Domain", vcpu_id: int, port: int) -> None:
    """The tail of 2-level set_pending and unmask: a selector bit (of the port's word) that
    goes 0->1 marks the vCPU's events pending, and an upcall-pending that goes 0->1 kicks the
    vCPU (vcpu_mark_events_pending)."""
    vcpu = domain.vcpus[vcpu_id]
    mfn, info = vcpu_info_words(hv, vcpu)
    index, bit = _selector(domain, port)
    if not _test_and_set_bit(hv.memory.frame(mfn), info + index, bit):
        vcpu_mark_events_pending(hv, vcpu)


def vcpu_mark_events_pending(hv: "Hypervisor", vcpu: "Vcpu") -> None:
    """vcpu_mark_events_pending: an upcall-pending that goes 0->1 kicks the vCPU."""
    mfn, info = vcpu_info_words(hv, vcpu)
    if not _test_and_set_bit(hv.memory.frame(mfn), info, _UPCALL_PENDING_SHIFT):
        vcpu_kick(hv, vcpu)


def set_pending(hv: "Hypervisor", domain: "Domain", vcpu_id: int, port: int) -> bool:
    """evtchn_port_set_pending: through the ABI the domain speaks. Under FIFO
    (docs/xen.md section 24.3) a queue's ready bit that goes 0->1 marks the vCPU's events
    pending. Under 2-level (docs/xen.md section 16.5), in Xen's order: pending, then (if
    unmasked) the selector and upcall-pending of `vcpu_id`, then the pollers, all only on a
    0->1 edge. Returns whether the pending bit went 0->1 (the event was news): in either ABI
    an event already pending is not."""
    if domain.evtchn_fifo is not None:
        was_pending, ready = evtchn_fifo.set_pending(hv, domain, domain.vcpus[vcpu_id], domain.evtchn[port], port)
        if ready:
            vcpu_mark_events_pending(hv, domain.vcpus[vcpu_id])
        if not was_pending:
            check_pollers(hv, domain, port)
        return not was_pending
    words = hv.memory.frame(domain.shared_info_mfn)
    word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
    if _test_and_set_bit(words, _PENDING + word, bit):
        return False
    if not words.item(_mask(domain) + word) >> bit & 1:
        _notify(hv, domain, vcpu_id, port)
    check_pollers(hv, domain, port)
    return True


def check_pollers(hv: "Hypervisor", domain: "Domain", port: int) -> None:
    """evtchn_check_pollers: wake each vCPU polling this port, or polling several ports (Xen
    does not record which), whether or not the port is masked."""
    if not domain.poll_mask:
        return
    for vcpu_id in sorted(domain.poll_mask):
        vcpu = domain.vcpus[vcpu_id]
        if vcpu.poll_evtchn <= 0 or vcpu.poll_evtchn == port:
            vcpu_unblock(hv, vcpu)


def evtchn_port_poll(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """Whether a port SCHEDOP_poll names is pending; EINVAL unless it is valid and bound."""
    if not port_is_valid(domain, port) or not domain.evtchn[port].usable:
        what = domain.evtchn[port].state.name.lower() if port_is_valid(domain, port) else "beyond the allocated ports"
        raise XenError(Errno.EINVAL, f"poll: dom{domain.domid} port {port} is {what}, not a bound port")
    return port_is_pending(hv, domain, port)


def two_level_pending(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """The port's bit in shared_info.evtchn_pending."""
    word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
    return bool(hv.memory.entries(domain.shared_info_mfn).item(_PENDING + word) >> bit & 1)


def port_is_pending(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_port_is_pending, in the domain's ABI."""
    if domain.evtchn_fifo is not None:
        return evtchn_fifo.is_pending(hv, domain, port)
    return two_level_pending(hv, domain, port)


def port_is_masked(hv: "Hypervisor", domain: "Domain", port: int) -> bool:
    """evtchn_port_is_masked, in the domain's ABI."""
    if domain.evtchn_fifo is not None:
        return evtchn_fifo.is_masked(hv, domain, port)
    word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
    return bool(hv.memory.entries(domain.shared_info_mfn).item(_mask(domain) + word) >> bit & 1)


def local_events_need_delivery(hv: "Hypervisor", vcpu: "Vcpu") -> bool:
    """An upcall is deliverable: upcall-pending set and upcall-mask clear (docs/xen.md section 16.6)."""
    mfn, info = vcpu_info_words(hv, vcpu)
    word = hv.memory.entries(mfn).item(info)
    return bool(word >> _UPCALL_PENDING_SHIFT & 0xFF) and not word >> _UPCALL_MASK_SHIFT & 0xFF


def set_upcall_mask(hv: "Hypervisor", vcpu: "Vcpu", masked: bool) -> None:
    """Write the vCPU's evtchn_upcall_mask byte (local_event_delivery_enable/_disable)."""
    mfn, index = vcpu_info_words(hv, vcpu)
    words = hv.memory.frame(mfn)
    words[index] = (words.item(index) & ~(0xFF << _UPCALL_MASK_SHIFT)) | (int(masked) << _UPCALL_MASK_SHIFT)


def send_guest_vcpu_virq(hv: "Hypervisor", vcpu: "Vcpu", virq: int) -> bool:
    """send_guest_vcpu_virq: raise a per-vCPU VIRQ on the port the vCPU bound it to, if any.
    Returns whether that was news (see set_pending); a VIRQ bound to no port never is."""
    port = vcpu.virq_to_evtchn[virq]
    return bool(port) and set_pending(hv, hv.domains[vcpu.domid], vcpu.vcpu_id, port)


def deliver_upcall(hv: "Hypervisor", domid: int, vcpu: int) -> list[int] | None:
    """Toolstack op for the adapter: Xen's test_all_events on return to the guest (16.6).

    If the vCPU's upcall is deliverable, set its upcall mask as the bounce frame does
    (TBF_INTERRUPT) and return the ports pending, unmasked and notifying this vCPU, in port
    order: a hint for the guest, whose handler must still scan and clear the bitmaps. Under
    FIFO the hint is the pending, unmasked ports of the vCPU's ready queues, in the order
    the guest will consume them (docs/xen.md section 24.3). Otherwise return None and change
    nothing.
    """
    target = hv.vcpu(domid, vcpu)
    if not local_events_need_delivery(hv, target):
        return None
    set_upcall_mask(hv, target, True)
    domain = hv.domains[domid]
    if domain.evtchn_fifo is not None:
        return evtchn_fifo.linked_ports(hv, domain, vcpu)
    words = hv.memory.entries(domain.shared_info_mfn)
    nr_words, mask = domain.abi.evtchn_2l_nr_channels // BITS_PER_EVTCHN_WORD, _mask(domain)
    live = words[_PENDING : _PENDING + nr_words] & ~words[mask : mask + nr_words]
    ports = np.flatnonzero(np.unpackbits(live.view(np.uint8), bitorder="little")).tolist()
    table = domain.evtchn
    return [p for p in ports if p < len(table) and table[p].usable and table[p].notify_vcpu_id == vcpu]


# -- EVTCHNOP_* (docs/xen.md section 16.3) ---------------------------------------------------------------


def alloc_unbound(hv: "Hypervisor", current: "Vcpu", dom: int = DOMID_SELF, remote_dom: int = DOMID_SELF) -> int:
    """A port of `dom` that `remote_dom` (not checked for existence) may bind to."""
    caller = hv.domains[current.domid]
    domain = _domain_by_any_id(hv, caller, dom)
    _check_target(caller, domain, "allocate")
    port = get_free_port(hv, domain)
    chn = claim_port(domain, port)
    chn.state = ECS.UNBOUND
    chn.remote_domid = caller.domid if remote_dom == DOMID_SELF else remote_dom
    return port


def bind_interdomain(hv: "Hypervisor", current: "Vcpu", remote_port: int, remote_dom: int = DOMID_SELF) -> int:
    """Join a new local port to `remote_dom`'s unbound port offered to the caller. The new
    port is set pending at once, for events sent while the remote end was unbound."""
    local = hv.domains[current.domid]
    remote = _domain_by_any_id(hv, local, remote_dom)
    lport = get_free_port(hv, local)
    rchn = valid_port(remote, remote_port, "bind_interdomain")
    if rchn.state != ECS.UNBOUND or rchn.remote_domid != local.domid:
        offered = f"offered to dom{rchn.remote_domid}" if rchn.state == ECS.UNBOUND else rchn.state.name.lower()
        raise XenError(
            Errno.EINVAL,
            f"bind_interdomain: dom{remote.domid} port {remote_port} is {offered}, not unbound and offered to dom{local.domid}",
        )
    lchn = claim_port(local, lport)
    lchn.state, lchn.remote_domid, lchn.remote_port = ECS.INTERDOMAIN, remote.domid, remote_port
    rchn.state, rchn.remote_domid, rchn.remote_port = ECS.INTERDOMAIN, local.domid, lport
    set_pending(hv, local, lchn.notify_vcpu_id, lport)
    return lport


def bind_virq(hv: "Hypervisor", current: "Vcpu", virq: int, vcpu: int) -> int:
    """Bind a VIRQ (docs/xen.md section 16.4). Per-vCPU VIRQs bind on any vCPU, the others on vCPU 0
    only. Global VIRQs belong to the hardware domain, which xensim does not have: EBUSY."""
    domain = hv.domains[current.domid]
    if not 0 <= virq < NR_VIRQS:
        raise XenError(Errno.EINVAL, f"bind_virq: VIRQ {virq} is not below NR_VIRQS ({NR_VIRQS})")
    kind = virq_type(virq)
    if kind is not VirqType.VCPU and vcpu != 0:
        raise XenError(Errno.EINVAL, f"bind_virq: VIRQ {virq} is {kind.value} and binds on vCPU 0, not vCPU {vcpu}")
    target = hv.vcpu(domain.domid, vcpu)
    if kind is VirqType.GLOBAL:
        raise XenError(Errno.EBUSY, f"bind_virq: global VIRQ {virq} is the hardware domain's, not dom{domain.domid}'s")
    if target.virq_to_evtchn[virq]:
        raise XenError(Errno.EEXIST, f"bind_virq: VIRQ {virq} is already bound on vCPU {vcpu} of dom{domain.domid} (port {target.virq_to_evtchn[virq]})")
    port = get_free_port(hv, domain)
    chn = claim_port(domain, port)
    chn.state, chn.notify_vcpu_id, chn.virq = ECS.VIRQ, vcpu, virq
    target.virq_to_evtchn[virq] = port
    if virq == VIRQ_TIMER:
        rebind_periodic_timer(hv, target)
    return port


def bind_ipi(hv: "Hypervisor", current: "Vcpu", vcpu: int) -> int:
    """A port whose sends notify `vcpu` of the caller's domain (Linux binds one per (vCPU,
    IPI kind), docs/linux.md section 7.2)."""
    domain = hv.domains[current.domid]
    hv.vcpu(domain.domid, vcpu)  # ENOENT if there is no such vCPU
    port = get_free_port(hv, domain)
    chn = claim_port(domain, port)
    chn.state, chn.notify_vcpu_id = ECS.IPI, vcpu
    return port


def bind_pirq(hv: "Hypervisor", current: "Vcpu", pirq: int, flags: int = 0) -> int:
    """evtchn_bind_pirq for a PV domU: a pirq beyond the domain's is EINVAL, any other fails
    pirq_access_permitted (EPERM), since xensim gives no domain a device."""
    if pirq >= NR_PIRQS:
        raise XenError(Errno.EINVAL, f"bind_pirq: pirq {pirq} is not below dom{current.domid}'s nr_pirqs ({NR_PIRQS})")
    raise XenError(Errno.EPERM, f"bind_pirq: dom{current.domid} has no access to physical IRQ {pirq} (xensim domains own no devices)")


def bind_vcpu(hv: "Hypervisor", current: "Vcpu", port: int, vcpu: int) -> int:
    """Move a port's notifications to another vCPU. Bits already pending stay where they are;
    IPIs and per-vCPU VIRQs cannot move."""
    domain = hv.domains[current.domid]
    target = hv.vcpu(domain.domid, vcpu)
    chn = valid_port(domain, port, "bind_vcpu")
    movable = chn.state in (ECS.UNBOUND, ECS.INTERDOMAIN) or (chn.state == ECS.VIRQ and virq_type(chn.virq) is not VirqType.VCPU)
    if not movable:
        what = f"per-vCPU VIRQ {chn.virq}" if chn.state == ECS.VIRQ else chn.state.name.lower()
        raise XenError(Errno.EINVAL, f"bind_vcpu: dom{domain.domid} port {port} is {what}: only unbound, interdomain and non-per-vCPU VIRQ ports move")
    chn.notify_vcpu_id = target.vcpu_id
    return 0


def send(hv: "Hypervisor", current: "Vcpu", port: int) -> int:
    """Notify the other end: an interdomain port sets its peer pending for the peer's notify
    vCPU, an IPI port sets itself pending for its vCPU, an unbound port drops the event."""
    domain = hv.domains[current.domid]
    chn = valid_port(domain, port, "send")
    if chn.state == ECS.INTERDOMAIN:
        remote = hv.domains[chn.remote_domid]
        set_pending(hv, remote, remote.evtchn[chn.remote_port].notify_vcpu_id, chn.remote_port)
    elif chn.state == ECS.IPI:
        set_pending(hv, domain, chn.notify_vcpu_id, port)
    elif chn.state != ECS.UNBOUND:
        raise XenError(Errno.EINVAL, f"send: dom{domain.domid} port {port} is {chn.state.name.lower()}: only interdomain, IPI and unbound ports take sends")
    return 0


def close(hv: "Hypervisor", current: "Vcpu", port: int) -> int:
    evtchn_close(hv, hv.domains[current.domid], port)
    return 0


def evtchn_close(hv: "Hypervisor", domain: "Domain", port: int) -> None:
    """evtchn_close: unbind and free the port. A VIRQ leaves its vCPU's virq_to_evtchn; an
    interdomain peer becomes unbound towards this domain, so it can be bound again. Freeing
    clears the pending bit but not the mask bit (nor, under FIFO, LINKED: the guest unlinks),
    and resets notify_vcpu to 0 and the priority to the default, keeping fifo_lastq."""
    chn = valid_port(domain, port, "close")
    if not chn.usable:
        raise XenError(Errno.EINVAL, f"close: dom{domain.domid} port {port} is {chn.state.name.lower()}")
    if chn.state == ECS.VIRQ:
        _virq_holder(domain, chn).virq_to_evtchn[chn.virq] = 0
    elif chn.state == ECS.INTERDOMAIN:
        peer = hv.domains[chn.remote_domid].evtchn[chn.remote_port]
        peer.state, peer.remote_domid, peer.remote_port = ECS.UNBOUND, domain.domid, 0
    if domain.evtchn_fifo is not None:
        evtchn_fifo.clear_pending(hv, domain, port)
    else:
        word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
        _test_and_clear_bit(hv.memory.frame(domain.shared_info_mfn), _PENDING + word, bit)
    domain.evtchn[port] = Evtchn(last_vcpu_id=chn.last_vcpu_id, last_priority=chn.last_priority)


def _virq_holder(domain: "Domain", chn: Evtchn) -> "Vcpu":
    """The vCPU whose virq_to_evtchn holds a VIRQ port: its own vCPU for a per-vCPU VIRQ,
    vCPU 0 for the others (wherever bind_vcpu moved their notifications)."""
    return domain.vcpus[chn.notify_vcpu_id if virq_type(chn.virq) is VirqType.VCPU else 0]


def close_all(hv: "Hypervisor", domain: "Domain") -> None:
    """Close every bound port: evtchn_reset's loop, and evtchn_destroy's when the domain dies
    (docs/xen.md section 12.4). The order does not matter: each close touches one port and its peer."""
    for port, chn in enumerate(domain.evtchn):
        if chn.usable:
            evtchn_close(hv, domain, port)


def status(hv: "Hypervisor", current: "Vcpu", port: int, dom: int = DOMID_SELF) -> dict:
    """The port's EVTCHNSTAT_* state, its notify vCPU and the fields its state defines (the
    others 0): remote_dom for unbound, remote_dom and remote_port for interdomain, virq."""
    caller = hv.domains[current.domid]
    domain = _domain_by_any_id(hv, caller, dom)
    chn = valid_port(domain, port, "status")
    _check_target(caller, domain, "query")
    result = {"state": _STATUS[chn.state], "vcpu": chn.notify_vcpu_id, "remote_dom": 0, "remote_port": 0, "virq": 0}
    if chn.state in (ECS.UNBOUND, ECS.INTERDOMAIN):
        result["remote_dom"] = chn.remote_domid
    if chn.state == ECS.INTERDOMAIN:
        result["remote_port"] = chn.remote_port
    if chn.state == ECS.VIRQ:
        result["virq"] = chn.virq
    return result


def unmask(hv: "Hypervisor", current: "Vcpu", port: int) -> int:
    """evtchn_2l_unmask: Xen clears the mask bit, and a port that was masked and is pending
    is delivered to its notify vCPU as set_pending would have. A free port is left alone.
    Under FIFO, evtchn_fifo_unmask: clear MASKED and relink the port if it is PENDING."""
    domain = hv.domains[current.domid]
    chn = valid_port(domain, port, "unmask")
    if chn.usable and domain.evtchn_fifo is not None:
        if evtchn_fifo.unmask(hv, domain, port):
            set_pending(hv, domain, chn.notify_vcpu_id, port)
    elif chn.usable:
        words = hv.memory.frame(domain.shared_info_mfn)
        word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
        if _test_and_clear_bit(words, _mask(domain) + word, bit) and words.item(_PENDING + word) >> bit & 1:
            _notify(hv, domain, chn.notify_vcpu_id, port)
    return 0


def reset(hv: "Hypervisor", current: "Vcpu", dom: int = DOMID_SELF) -> int:
    """Close every port of `dom`: the caller's own, or a domain the toolstack paused. A
    domain that resets itself by DOMID_SELF also leaves the FIFO ABI: its control blocks and
    event-array pages are unmapped and it speaks 2-level again (evtchn_reset;
    docs/xen.md section 24.6). Its own numeric id does not do that, as in Xen."""
    caller = hv.domains[current.domid]
    domain = _domain_by_any_id(hv, caller, dom)
    _check_target(caller, domain, "reset")
    if domain is not caller and not domain.paused:
        raise XenError(Errno.EINVAL, f"reset: dom{domain.domid} is neither the caller nor paused by the toolstack")
    close_all(hv, domain)
    if dom == DOMID_SELF:
        evtchn_fifo.destroy(hv, domain)
    return 0


def evtchn_destroy(hv: "Hypervisor", domain: "Domain") -> None:
    """evtchn_destroy, when the domain dies: close every port, then unmap the FIFO frames."""
    close_all(hv, domain)
    evtchn_fifo.destroy(hv, domain)


EVTCHNOP = {
    "bind_interdomain": bind_interdomain,
    "bind_virq": bind_virq,
    "bind_pirq": bind_pirq,
    "close": close,
    "send": send,
    "status": status,
    "alloc_unbound": alloc_unbound,
    "bind_ipi": bind_ipi,
    "bind_vcpu": bind_vcpu,
    "unmask": unmask,
    "reset": reset,
    "init_control": evtchn_fifo.init_control,
    "expand_array": evtchn_fifo.expand_array,
    "set_priority": evtchn_fifo.set_priority,
}


def event_channel_op(hv: "Hypervisor", current: "Vcpu", cmd: str, **fields):
    """HYPERVISOR_event_channel_op: `cmd` names the EVTCHNOP_* ("send", "bind_ipi", ...) and
    `fields` are that op's struct fields. alloc_unbound and the binds return the new port,
    status and init_control a dict, the rest 0."""
    handler = EVTCHNOP.get(cmd)
    if handler is None:
        raise XenError(Errno.ENOSYS, f"unknown event_channel_op {cmd!r} (known: {', '.join(EVTCHNOP)})")
    return handler(hv, current, **fields)


# -- audit ---------------------------------------------------------------------------------


def audit(hv: "Hypervisor", domains: list | None = None) -> list[str]:
    """Port-table invariants of `domains` (else every domain's): interdomain bindings are
    symmetric, virq_to_evtchn and the VIRQ ports agree both ways (so no VIRQ is bound twice on
    a vCPU), every notify vCPU exists, no port is bound beyond the cap, and pollers are blocked
    and listed in the poll mask."""
    findings: list[str] = []
    for domain in hv.domains.values() if domains is None else domains:
        table, limit, d = domain.evtchn, _port_limit(domain), domain.domid
        if not table or len(table) % EVTCHNS_PER_BUCKET or table[0].state != ECS.RESERVED:
            findings.append(f"dom{d}: port table of {len(table)} ports is not whole buckets with port 0 reserved")
        for port, chn in enumerate(table):
            where = f"dom{d} port {port} ({chn.state.name.lower()})"
            if chn.state == ECS.FREE or port == 0:
                continue
            if port > limit:
                findings.append(f"{where} is beyond the domain's highest port {limit}")
            if not 0 <= chn.notify_vcpu_id < len(domain.vcpus):
                findings.append(f"{where} notifies vCPU {chn.notify_vcpu_id}, which does not exist")
            elif chn.state == ECS.VIRQ and _virq_holder(domain, chn).virq_to_evtchn[chn.virq] != port:
                findings.append(f"{where}: VIRQ {chn.virq} is not mapped to it by virq_to_evtchn")
            if chn.state == ECS.INTERDOMAIN:
                remote = hv.domains.get(chn.remote_domid)
                peer = remote.evtchn[chn.remote_port] if remote and port_is_valid(remote, chn.remote_port) else None
                if peer is None or (peer.state, peer.remote_domid, peer.remote_port) != (ECS.INTERDOMAIN, d, port):
                    findings.append(f"{where} is bound to dom{chn.remote_domid} port {chn.remote_port}, which is not bound back")
        for vcpu in domain.vcpus:
            for virq, port in enumerate(vcpu.virq_to_evtchn):
                chn = table[port] if port_is_valid(domain, port) else None
                if port and (chn is None or chn.state != ECS.VIRQ or chn.virq != virq or _virq_holder(domain, chn) is not vcpu):
                    findings.append(f"dom{d} vCPU {vcpu.vcpu_id}: virq_to_evtchn[{virq}] names port {port}, which is not that VIRQ's port")
            polling = vcpu.vcpu_id in domain.poll_mask
            if polling != bool(vcpu.poll_evtchn) or (polling and not vcpu.blocked):
                findings.append(f"dom{d} vCPU {vcpu.vcpu_id}: poll_evtchn {vcpu.poll_evtchn}, in poll mask {polling}, blocked {vcpu.blocked}")
        if domain.evtchn_fifo is not None:
            findings += evtchn_fifo.audit(hv, domain)
    return findings
