"""Core event-channel benchmark: EVTCHNOP_send through the core's dispatch, no transport.

Domain A sends over 256 interdomain channels to domain B, whose ports notify its two vCPUs in
turn; after each round B acknowledges as an upcall handler does (clears upcall-pending, the
selectors and the pending words) and the adapter drains the kicks, so every round takes the
full path of docs/xen.md section 16.5 (pending, selector, upcall, kick) and then its coalescing tail.
The same with B on the FIFO ABI (docs/xen.md section 24.3): each send links its port on a
queue of its vCPU (head or the tail's LINK, ready, upcall, kick); B's acknowledgement empties
its event words and control blocks, as consuming the queues leaves them.
"""

import time

from hypervisor.core import Hypervisor
from hypervisor.core.abi import EVTCHN_FIFO_CONTROL_SIZE, SHARED_INFO_EVTCHN_PENDING, VCPU_INFO_SIZE

NR_PORTS = 256
DURATION_S = 0.5
_PENDING_WORDS = slice(SHARED_INFO_EVTCHN_PENDING // 8, SHARED_INFO_EVTCHN_PENDING // 8 + 64)
_VCPU_INFO_WORDS = slice(0, 2 * VCPU_INFO_SIZE // 8)  # vcpu_info[0..1]: upcall bytes, selectors


def _channels(hv: Hypervisor) -> tuple[int, int, list[int]]:
    """(sender domid, receiver domid, the sender's ports)."""
    a, b = (hv.toolstack("create_domain", nr_pages=512, nr_vcpus=2)["domid"] for _ in range(2))
    ports = []
    for i in range(NR_PORTS):
        remote = hv.hypercall(b, 0, "event_channel_op", cmd="alloc_unbound", remote_dom=a)
        hv.hypercall(b, 0, "event_channel_op", cmd="bind_vcpu", port=remote, vcpu=i % 2)
        ports.append(hv.hypercall(a, 0, "event_channel_op", cmd="bind_interdomain", remote_dom=b, remote_port=remote))
    return a, b, ports


def _fifo(hv: Hypervisor, domid: int) -> list:
    """Switch the domain to FIFO (a control block per vCPU, one event-array page); the words
    B's acknowledgement zeroes: the array page and each control block."""
    domain = hv.domains[domid]
    free = domain.start_info["first_free_pfn"]
    control, array = [int(domain.p2m[free]), int(domain.p2m[free + 1])], int(domain.p2m[free + 2])
    for vcpu, mfn in enumerate(control):
        hv.hypercall(domid, 0, "event_channel_op", cmd="init_control", control_gfn=mfn, offset=0, vcpu=vcpu)
    hv.hypercall(domid, 0, "event_channel_op", cmd="expand_array", array_gfn=array)
    return [hv.memory.frame(array), *(hv.memory.frame(mfn)[: EVTCHN_FIFO_CONTROL_SIZE // 8] for mfn in control)]


def bench_send(fifo: bool = False) -> dict:
    hv = Hypervisor(nr_frames=1 << 14)
    a, b, ports = _channels(hv)
    shared = hv.memory.frame(hv.domains[b].shared_info_mfn)
    acked = [shared[_VCPU_INFO_WORDS], *(_fifo(hv, b) if fifo else [shared[_PENDING_WORDS]])]
    hv.take_kicks()  # bind_interdomain set A's new ports pending
    hypercall = hv.hypercall
    sends = rounds = kicks = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < DURATION_S:
        for port in ports:
            hypercall(a, 0, "event_channel_op", cmd="send", port=port)
        for words in acked:
            words[:] = 0
        kicks += len(hv.take_kicks())
        sends += len(ports)
        rounds += 1
    return {
        f"core.evtchn{'_fifo' if fifo else ''}_send_per_s": {
            "value": sends / elapsed,
            "unit": "ops/s",
            "us_per_send": elapsed / sends * 1e6,
            "ports": NR_PORTS,
            "rounds": rounds,
            "kicks_per_round": kicks / rounds,
        }
    }


def run() -> dict:
    return bench_send() | bench_send(fifo=True)
