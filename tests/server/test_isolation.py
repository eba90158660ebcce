"""Domain B attacks domain A through every interface: nothing of A changes, nobody gets in.

One table, ATTACKS. Each row names the attack, the RPC that B makes (with B's own credentials
unless the row gives others), the request (built from the live machine: A's frames and ports,
B's own tables) and the outcome: Xen's errno, the gRPC code of a refused call, "ok", or
"fault" (a page-fault result); a Session or Multicall row gives one outcome per call, and
`expect32` the outcome when B is a 32-bit PAE guest where that differs (docs/pv32.md). A and B
are each 64-bit or 32-bit (a mixed machine). Each
row runs against a fresh B, and A's Audit, DomainInfo, VcpuInfo (cr3s, TLB), FrameInfo of
every frame A owns, EventChannelStatus of its ports and the contents of its frames must be the
same after the attack as before it. `test_every_interface_has_a_row` fails when an RPC, a Call
case, an event-channel, vCPU or sched op, or an mmuext command has no row.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hypervisor.core.abi import HYPERVISOR_COMPAT_VIRT_START, HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, L4_SLOT_LINEAR, RO_MPT_VIRT_START, Errno
from hypervisor.server.errors import XEN_CODES
from tests.support.server import start_server
from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import RW, US, A, D, P, WireGuest

pytestmark = pytest.mark.timeout(120)

DOMID_SELF, DOMID_IO, DOMID_XEN = 0x7FF0, 0x7FF1, 0x7FF2
TABLE = P | RW | US | A | D
SECRET = 0x5EC2E7
VIRQ_TIMER, VIRQ_CONSOLE = 0, 2
UVMF_TLB_FLUSH, UVMF_ALL = 1, 4
ROGUE_L2_SLOT = 8  # an empty slot of B's direct-map L2: va PAGE_OFFSET + 16 MiB
C = common_pb2
# Xen's range, L4 slots 256..271 (xen/arch/x86/include/asm/config.h): its first page, the
# linear map over B's boot L3 (present all the way down), and its last word.
XEN_VA = HYPERVISOR_VIRT_START
XEN_LINEAR_VA = 0xFFFF000000000000 | L4_SLOT_LINEAR << 39 | 272 << 30
XEN_LAST_VA = HYPERVISOR_VIRT_END - 8


@dataclass
class Victim:
    """Domain A and what an attacker would go for: a secret page, a pinned L1 that maps it, a
    page mapped nowhere but A's direct map, ports in every state, and the FIFO ABI's control block
    and event-array page (docs/xen.md section 24)."""

    guest: WireGuest
    secret_pfn: int
    secret: int
    l1_pfn: int
    l1: int
    plain: int
    ports: dict[str, int]
    frame_runs: list[tuple[int, int]]
    fifo: dict[str, int]  # A's FIFO frames: "control" (vCPU 0's control block) and "array"

    @property
    def domid(self) -> int:
        return self.guest.domid

    @property
    def l4(self) -> int:
        return self.guest.start_info.pt_base_mfn

    @property
    def shared_info(self) -> int:
        return self.guest.start_info.shared_info >> 12

    def state(self) -> tuple:
        """Everything B must not be able to change (VcpuInfo before the reads, which refill
        A's TLB with the entries it already holds)."""
        g = self.guest
        return (
            g.toolstack("Audit", t.AuditRequest()),
            g.toolstack("DomainInfo", t.DomainInfoRequest(domid=g.domid)),
            g.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=g.domid)),
            g.toolstack("EventChannelStatus", t.EventChannelStatusRequest(domid=g.domid)),
            g.frames(self.frame_runs),
            g.call("Read", m.ReadRequest(va=g.direct_va(self.secret_pfn), length=4096)),
            g.call("Read", m.ReadRequest(va=g.direct_va(self.l1_pfn), length=4096)),
        )


def _evtchn(guest: WireGuest, **op) -> int:
    return guest.call("EventChannelOp", h.EventChannelOpRequest(**op)).port


def build_victim(server, address_size: int = 64) -> Victim:
    """A with 3 vCPUs (B has 2), 64-bit or 32-bit PAE, and C, a third domain A shares a channel with."""
    a, c = WireGuest(server, nr_pages=512, nr_vcpus=3, address_size=address_size), WireGuest(server, nr_pages=64, nr_vcpus=1)
    secret_pfn, secret = a.alloc()
    a.call("Store", m.StoreRequest(va=a.direct_va(secret_pfn), size=8, value=SECRET))
    l1_pfn, l1 = a.pinned_table(1, {0: secret << 12 | P | A})
    _, plain = a.alloc()
    ports = {
        "ipi": _evtchn(a, bind_ipi=h.EvtchnBindIpi(vcpu=0)),
        "virq": _evtchn(a, bind_virq=h.EvtchnBindVirq(virq=VIRQ_TIMER, vcpu=0)),
        "offered_to_c": _evtchn(a, alloc_unbound=h.EvtchnAllocUnbound(remote_dom=c.domid)),
        "loopback": _evtchn(a, alloc_unbound=h.EvtchnAllocUnbound()),
    }
    c_port = _evtchn(c, alloc_unbound=h.EvtchnAllocUnbound(remote_dom=a.domid))
    ports["interdomain"] = _evtchn(a, bind_interdomain=h.EvtchnBindInterdomain(remote_dom=c.domid, remote_port=c_port))
    a.call("EventChannelOp", h.EventChannelOpRequest(send=h.EvtchnSend(port=ports["ipi"])))  # pending: an unmask would deliver it
    fifo = {"control": a.alloc()[1], "array": a.alloc()[1]}
    a.call("EventChannelOp", h.EventChannelOpRequest(init_control=h.EvtchnInitControl(control_gfn=fifo["control"], vcpu=0)))
    a.call("EventChannelOp", h.EventChannelOpRequest(expand_array=h.EvtchnExpandArray(array_gfn=fifo["array"])))  # the IPI is linked now
    for vcpu in range(3):  # as Linux at boot: no periodic VIRQ_TIMER to change A between two looks
        a.call("VcpuOp", h.VcpuOpRequest(vcpuid=vcpu, stop_periodic_timer=h.VcpuStopPeriodicTimer()))
    victim = Victim(a, secret_pfn, secret, l1_pfn, l1, plain, ports, a.frame_runs(), fifo)
    victim.state()  # its reads fill A's TLB once; from now on they only hit
    return victim


# -- building requests: B's side ----------------------------------------------------------------


def pte(mfn: int, flags: int = P | A) -> int:
    return mfn << 12 | flags


def own_pfn(b: WireGuest) -> int:
    """B's first free pfn: a plain page, mapped writable in B's direct map."""
    return b.start_info.first_free_pfn


def own_entry(b: WireGuest) -> int:
    """Machine address of the entry of B's (validated) direct-map L1 that maps its own pfn."""
    l1, slot = b.direct_l1(own_pfn(b))
    return (l1 << 12) + 8 * slot


def own_l2(b: WireGuest) -> int:
    """B's direct-map L2 (the builder's layout: L4, L3, then the L2; PV32: the L3, then the L2)."""
    return b.mfn(((b.start_info.pt_base - b.start_info.page_offset) >> 12) + (1 if b.pv32 else 2))


def secret_va_in_b(a: Victim, b: WireGuest) -> int:
    """Where A keeps its secret, as a va of B's own memory: the same va when A and B have the
    same address size (it maps a page of B's that nothing wrote), else in B's direct map past
    B's first free pfn by as much, since B's space has no direct map where A's is."""
    va = a.guest.direct_va(a.secret_pfn)
    return va if a.guest.pv32 == b.pv32 else b.direct_va(own_pfn(b) + a.secret_pfn)


def beyond(b: WireGuest) -> int:
    """A kernel va past B's memory: no page of B's direct map, so nothing to reach there."""
    return b.direct_va(2048)


def mmu(*reqs: tuple[int, int], foreigndom: int | None = None) -> h.MmuUpdateRequest:
    return h.MmuUpdateRequest(reqs=[h.MmuUpdate(ptr=p, val=v) for p, v in reqs], foreigndom=foreigndom)


def ext(cmd: int, arg1: int = 0, arg2: int = 0, foreigndom: int | None = None) -> h.MmuextOpRequest:
    return h.MmuextOpRequest(ops=[h.MmuextOp(cmd=cmd, arg1=arg1, arg2=arg2)], foreigndom=foreigndom)


def uvm(va: int, val: int, flags: int = 0, otherdomain: int | None = None) -> h.UpdateVaMappingRequest:
    return h.UpdateVaMappingRequest(va=va, val=val, flags=flags, otherdomain=otherdomain)


def evtchn(**op) -> h.EventChannelOpRequest:
    return h.EventChannelOpRequest(**op)


def vcpu_op(vcpuid: int, **op) -> h.VcpuOpRequest:
    return h.VcpuOpRequest(vcpuid=vcpuid, **op)


def init_context(kernel: int, user: int = 0) -> h.VcpuInitialise:
    return h.VcpuInitialise(context=h.VcpuGuestContext(flags=4, kernel_cr3_mfn=kernel, user_cr3_mfn=user))


def sched(**op) -> h.SchedOpRequest:
    return h.SchedOpRequest(**op)


def call(request: Message) -> h.Call:
    """A request as a Session call (or, with `entry`, a multicall entry)."""
    return h.Call(**{CASE_OF_REQUEST[request.DESCRIPTOR.full_name]: request})


def entry(request: Message) -> h.MulticallEntry:
    return h.MulticallEntry(**{CASE_OF_REQUEST[request.DESCRIPTOR.full_name]: request})


def session(*calls: Message) -> h.SessionRequest:
    return h.SessionRequest(request_id=1, calls=[call(c) for c in calls])


def rogue_table(a: Victim, b: WireGuest) -> h.SessionRequest:
    """B writes a page table of its own whose entries point at A's secret and A's L1 (plain
    stores into B's own page), then tries to make it live and to reach A through it."""
    pfn, rogue = b.alloc()
    va = b.start_info.page_offset + (ROGUE_L2_SLOT << 21)
    return session(
        m.StoreRequest(va=b.direct_va(pfn), size=8, value=pte(a.secret, P | RW | US | A | D)),
        m.StoreRequest(va=b.direct_va(pfn) + 8, size=8, value=pte(a.l1, P | RW | US | A | D)),
        uvm(b.direct_va(pfn), pte(rogue, P | A | D), flags=2),  # read-only, so it may become a table
        mmu(((own_l2(b) << 12) + 8 * ROGUE_L2_SLOT, pte(rogue, TABLE))),
        ext(C.MMUEXT_CMD_PIN_L1_TABLE, rogue),
        m.LoadRequest(va=va, size=8),
        m.StoreRequest(va=va, size=8, value=1),
        m.AtomicRequest(op=m.ATOMIC_OP_XCHG, va=va, size=8, operand=1),
        m.ReadRequest(va=va, length=64),
        m.WriteRequest(va=va + 4096, data=b"\xff" * 8),
    )


def chain_in_xen_slot(base: str):
    """The issue's attack: B writes an L3 -> L2 -> L1 chain of its own plain pages whose L1
    maps A's secret and A's live L4 writable, puts the L3 in slot 256 of another plain page,
    makes that page read-only, has it validated as an L4 (PIN_L4 then NEW_USER_BASEPTR, or an
    unpinned NEW_BASEPTR / NEW_USER_BASEPTR) and reaches through Xen's range. Xen clobbers the
    slot (init_xen_l4_slots): every access faults, but for reads of the read-only M2P that a
    kernel base maps there (chain_outcome)."""

    def request(a: Victim, b: WireGuest) -> h.SessionRequest:
        (_, l1), (_, l2), (_, l3), (l4_pfn, l4) = (b.alloc() for _ in range(4))
        user = base != "NEW_BASEPTR"
        load_base = ext(C.MMUEXT_CMD_NEW_BASEPTR if not user else C.MMUEXT_CMD_NEW_USER_BASEPTR, l4)
        return session(
            mmu((l1 << 12, pte(a.secret, P | RW | US | A | D)), ((l1 << 12) + 8, pte(a.l4, P | RW | US | A | D)), (l2 << 12, pte(l1, TABLE)), (l3 << 12, pte(l2, TABLE)), ((l4 << 12) + 8 * 256, pte(l3, TABLE))),
            uvm(b.direct_va(l4_pfn), pte(l4, P | A | D), flags=2),
            *([ext(C.MMUEXT_CMD_PIN_L4_TABLE, l4)] if base == "PIN_L4" else []),
            load_base,
            m.LoadRequest(va=XEN_VA, size=8, user_mode=user),
            m.StoreRequest(va=XEN_VA, size=8, value=0, user_mode=user),
            m.StoreRequest(va=XEN_VA + 4096 + 8 * 272, size=8, value=0, user_mode=user),  # A's L4, slot 272
            m.AtomicRequest(op=m.ATOMIC_OP_XCHG, va=XEN_VA, size=8, operand=0, user_mode=user),
            m.ReadRequest(va=XEN_VA, length=64, user_mode=user),
            m.WriteRequest(va=XEN_VA + 4096, data=bytes(8), user_mode=user),
        )

    return request


def chain_outcome(base: str) -> tuple[str, ...]:
    """Under a kernel base slot 256 maps Xen's read-only M2P (docs/xen.md section 22): the load
    and the read get M2P entries, not the chain; the rest fault."""
    accesses = ("ok", "fault", "fault", "fault", "ok", "fault") if base == "NEW_BASEPTR" else ("fault",) * 6
    return ("ok",) * (4 if base == "PIN_L4" else 3) + accesses


def chain_outcome32(base: str) -> tuple[str, ...]:
    """For a 32-bit B (docs/pv32.md sections 2 and 3): its PIN_L4 is ignored, the page is no PAE
    L3 (slot 3 empty) for NEW_BASEPTR, a compat guest has no user base, and Xen's range is no
    32-bit address."""
    return ("ok",) * (3 if base == "PIN_L4" else 2) + ("EINVAL",) * 7


def flushes_naming_absent_vcpus(a: Victim, b: WireGuest) -> h.SessionRequest:
    """Bitmaps naming all 64 vCPUs (B has 2; A's are not B's to flush)."""
    mask_va = b.direct_va(b.alloc()[0])
    return session(
        m.StoreRequest(va=mask_va, size=8, value=(1 << 64) - 1),
        ext(C.MMUEXT_CMD_TLB_FLUSH_MULTI, 0, mask_va),
        ext(C.MMUEXT_CMD_INVLPG_MULTI, a.guest.direct_va(a.secret_pfn), mask_va),
        uvm(b.direct_va(own_pfn(b)), pte(b.mfn(own_pfn(b)), P | RW | A | D), flags=UVMF_TLB_FLUSH | mask_va),
    )


def fifo_on_a_frames(a: Victim, b: WireGuest) -> h.SessionRequest:
    """B switches to FIFO on a page of its own, then offers A's FIFO frames as event-array
    pages: map_guest_page takes only the caller's frames."""
    return session(
        evtchn(init_control=h.EvtchnInitControl(control_gfn=b.alloc()[1], vcpu=0)),
        evtchn(expand_array=h.EvtchnExpandArray(array_gfn=a.fifo["array"])),
        evtchn(expand_array=h.EvtchnExpandArray(array_gfn=a.fifo["control"])),
        evtchn(set_priority=h.EvtchnSetPriority(port=a.ports["ipi"], priority=0)),
        evtchn(reset=h.EvtchnReset(dom=DOMID_SELF)),
    )


def block_on_own_ipi(a: Victim, b: WireGuest) -> h.SessionRequest:
    """B's port 1 is A's IPI port's number too: B's send and block touch B's only."""
    return session(evtchn(bind_ipi=h.EvtchnBindIpi(vcpu=0)), evtchn(send=h.EvtchnSend(port=1)), sched(block=h.SchedBlock()))


# -- credentials --------------------------------------------------------------------------------


def as_b(a: Victim, b: WireGuest):
    return b.md(0)


def b_as_admin(a: Victim, b: WireGuest):
    return (("authorization", f"Bearer {b.token}"),)


def b_naming_a_only_vcpu(a: Victim, b: WireGuest):
    return b.md(2)


def a_token_altered(a: Victim, b: WireGuest):
    token = a.guest.token
    return (("authorization", f"Bearer {token[:-1]}{'A' if token[-1] != 'A' else 'B'}"), ("x-xen-vcpu", "0"))


def b_then_a_token(a: Victim, b: WireGuest):
    return (("authorization", f"Bearer {b.token}"), ("authorization", f"Bearer {a.guest.token}"), ("x-xen-vcpu", "0"))


def no_token(a: Victim, b: WireGuest):
    return (("x-xen-vcpu", "0"),)


def memop(**op) -> h.MemoryOpRequest:
    return h.MemoryOpRequest(**op)


def reservation(extents: list[int], **fields) -> h.XenMemoryReservation:
    return h.XenMemoryReservation(extent_start=extents, nr_extents=len(extents), **fields)


# -- the table ----------------------------------------------------------------------------------

Outcome = str | tuple[str, ...]


@dataclass(frozen=True)
class Attack:
    name: str
    rpc: str
    request: Callable[[Victim, WireGuest], Message]
    expect: Outcome
    creds: Callable[[Victim, WireGuest], Any] = as_b
    returns: Callable[[Victim, WireGuest], Message] | None = None  # the response, when "ok" must say more
    expect32: Outcome | None = None  # the outcome when B is a 32-bit PAE guest, if it differs


def _toolstack_rows() -> list[Attack]:
    """Every Toolstack RPC with B's token as the admin's: PERMISSION_DENIED."""
    requests = {
        "CreateDomain": lambda a, b: t.CreateDomainRequest(nr_pages=64, nr_vcpus=1),
        "DestroyDomain": lambda a, b: t.DestroyDomainRequest(domid=a.domid),
        "ListDomains": lambda a, b: t.ListDomainsRequest(),
        "DomainInfo": lambda a, b: t.DomainInfoRequest(domid=a.domid),
        "PauseDomain": lambda a, b: t.PauseDomainRequest(domid=a.domid),
        "UnpauseDomain": lambda a, b: t.UnpauseDomainRequest(domid=a.domid),
        "VcpuInfo": lambda a, b: t.VcpuInfoRequest(domid=a.domid),
        "FrameInfo": lambda a, b: t.FrameInfoRequest(mfn=a.secret),
        "EventChannelStatus": lambda a, b: t.EventChannelStatusRequest(domid=a.domid),
        "Audit": lambda a, b: t.AuditRequest(domid=a.domid),
        "Stats": lambda a, b: t.StatsRequest(),
        "StartTrace": lambda a, b: t.StartTraceRequest(path=os.devnull),
        "StopTrace": lambda a, b: t.StopTraceRequest(),
        "StreamTrace": lambda a, b: t.StreamTraceRequest(),
        "DetachSession": lambda a, b: t.DetachSessionRequest(domid=a.domid, vcpu=0),
        "HostInfo": lambda a, b: t.HostInfoRequest(),
        "DumpPagetable": lambda a, b: t.DumpPagetableRequest(mfn=a.l1, tree=True),
        "ReverseMap": lambda a, b: t.ReverseMapRequest(mfn=a.secret),
        "DumpP2M": lambda a, b: t.DumpP2MRequest(domid=a.domid),
        "DumpM2P": lambda a, b: t.DumpM2PRequest(domid=a.domid),
        "DomainSummary": lambda a, b: t.DomainSummaryRequest(domid=a.domid),
        "DomainStats": lambda a, b: t.DomainStatsRequest(domid=a.domid),
    }
    return [Attack(f"toolstack {rpc} with B's token", rpc, build, "PERMISSION_DENIED", b_as_admin) for rpc, build in requests.items()]


ATTACKS = [
    # mmu_update: map A's frames, write A's tables, name A as an owner (docs/xen.md sections 4, 19)
    Attack("mmu_update maps A's secret read-only in B's L1", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret))), "EBUSY"),
    Attack("mmu_update maps A's secret writable in B's L1", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret, P | RW | A | D))), "EBUSY"),
    Attack("mmu_update maps A's pinned L1 writable", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.l1, P | RW | A | D))), "EBUSY"),
    Attack("mmu_update maps A's shared-info frame writable", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.shared_info, P | RW | A | D))), "EBUSY"),
    Attack("mmu_update maps a Xen-heap frame", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(0))), "EBUSY"),
    Attack("MMU_PT_UPDATE_PRESERVE_AD maps A's secret", "MmuUpdate", lambda a, b: mmu((own_entry(b) | 2, pte(a.secret))), "EBUSY"),
    Attack("mmu_update writes an entry of A's pinned L1", "MmuUpdate", lambda a, b: mmu((a.l1 << 12, pte(a.plain))), "EINVAL"),
    Attack("mmu_update writes A's secret page as plain memory", "MmuUpdate", lambda a, b: mmu((a.secret << 12, 0)), "EINVAL"),
    Attack("mmu_update after a good entry stops at A's frame", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(b.mfn(own_pfn(b)), P | RW | A | D)), (own_entry(b), pte(a.secret))), "EBUSY"),
    Attack("mmu_update with A as data owner (foreigndom)", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret)), foreigndom=a.domid), "EPERM"),
    Attack("mmu_update with A as pagetable owner writes A's L1", "MmuUpdate", lambda a, b: mmu((a.l1 << 12, pte(a.plain)), foreigndom=(a.domid + 1) << 16 | DOMID_SELF), "EPERM"),
    Attack("mmu_update with B's own numeric domid as foreigndom", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret)), foreigndom=b.domid), "ESRCH"),
    Attack("mmu_update with DOMID_IO as data owner maps A's secret", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret)), foreigndom=DOMID_IO), "EBUSY"),
    Attack("mmu_update with DOMID_XEN as data owner", "MmuUpdate", lambda a, b: mmu((own_entry(b), pte(a.secret)), foreigndom=DOMID_XEN), "EPERM"),
    Attack("mmu_update with an unknown pagetable owner", "MmuUpdate", lambda a, b: mmu((a.l1 << 12, 0), foreigndom=0xFFFF0000 | DOMID_SELF), "ESRCH"),
    Attack("MMU_MACHPHYS_UPDATE of A's frame", "MmuUpdate", lambda a, b: mmu((a.secret << 12 | 1, 0)), "EINVAL"),
    Attack("MMU_MACHPHYS_UPDATE with A as data owner", "MmuUpdate", lambda a, b: mmu((a.secret << 12 | 1, 0), foreigndom=a.domid), "EPERM"),
    Attack("MMU_MACHPHYS_UPDATE with A as pagetable owner", "MmuUpdate", lambda a, b: mmu((a.secret << 12 | 1, 0), foreigndom=(a.domid + 1) << 16 | DOMID_SELF), "EPERM"),
    # update_va_mapping (docs/xen.md section 6)
    Attack("update_va_mapping maps A's secret read-only", "UpdateVaMapping", lambda a, b: uvm(b.direct_va(own_pfn(b)), pte(a.secret)), "EBUSY"),
    Attack("update_va_mapping maps A's pinned L1 writable, flushing all", "UpdateVaMapping", lambda a, b: uvm(b.direct_va(own_pfn(b)), pte(a.l1, P | RW | A | D), UVMF_TLB_FLUSH | UVMF_ALL), "EBUSY"),
    Attack("update_va_mapping_otherdomain names A", "UpdateVaMapping", lambda a, b: uvm(b.direct_va(own_pfn(b)), pte(a.secret), otherdomain=a.domid), "EPERM"),
    Attack("update_va_mapping_otherdomain names B by number", "UpdateVaMapping", lambda a, b: uvm(b.direct_va(own_pfn(b)), pte(a.secret), otherdomain=b.domid), "ESRCH"),
    Attack("update_va_mapping_otherdomain DOMID_SELF maps A's secret", "UpdateVaMapping", lambda a, b: uvm(b.direct_va(own_pfn(b)), pte(a.secret), otherdomain=DOMID_SELF), "EBUSY"),
    # mmuext_op on A's frames, and flushes that must stay within B (docs/xen.md sections 5, 8, 10)
    Attack("PIN_L1_TABLE of A's secret", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_PIN_L1_TABLE, a.secret), "EINVAL"),
    Attack("PIN_L2_TABLE of A's plain page", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_PIN_L2_TABLE, a.plain), "EINVAL"),
    Attack("PIN_L3_TABLE of A's plain page", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_PIN_L3_TABLE, a.plain), "EINVAL"),
    # a 32-bit pg_owner's PIN_L4 is ignored before any check (do_mmuext_op; docs/pv32.md section 3)
    Attack("PIN_L4_TABLE of A's boot L4", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_PIN_L4_TABLE, a.l4), "EINVAL", expect32="ok"),
    Attack("PIN_L1_TABLE with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_PIN_L1_TABLE, a.plain, foreigndom=a.domid), "EPERM"),
    Attack("UNPIN_TABLE of A's boot L4", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4), "EINVAL"),
    Attack("UNPIN_TABLE of A's L1 with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l1, foreigndom=a.domid), "EPERM"),
    Attack("UNPIN_TABLE of A's L1 with B's own numeric domid", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l1, foreigndom=b.domid), "ESRCH"),
    Attack("UNPIN_TABLE of A's L1 with DOMID_IO", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l1, foreigndom=DOMID_IO), "EINVAL"),
    Attack("UNPIN_TABLE of A's L1 with DOMID_XEN", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l1, foreigndom=DOMID_XEN), "EINVAL"),
    Attack("UNPIN_TABLE of A's L4 after a good op", "MmuextOp", lambda a, b: h.MmuextOpRequest(ops=[h.MmuextOp(cmd=C.MMUEXT_CMD_TLB_FLUSH_LOCAL), h.MmuextOp(cmd=C.MMUEXT_CMD_UNPIN_TABLE, arg1=a.l4)]), "EINVAL"),
    Attack("NEW_BASEPTR to A's L4", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_NEW_BASEPTR, a.l4), "EINVAL"),
    Attack("NEW_BASEPTR with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_NEW_BASEPTR, a.l4, foreigndom=a.domid), "EPERM"),
    Attack("NEW_USER_BASEPTR to A's L4", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_NEW_USER_BASEPTR, a.l4), "EINVAL"),
    Attack("CLEAR_PAGE of A's secret", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_CLEAR_PAGE, a.secret), "EINVAL"),
    Attack("CLEAR_PAGE of A's secret with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_CLEAR_PAGE, a.secret, foreigndom=a.domid), "EPERM"),
    Attack("COPY_PAGE of A's secret into B's page", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_COPY_PAGE, b.mfn(own_pfn(b)), a.secret), "EINVAL"),
    Attack("COPY_PAGE of B's page over A's secret", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_COPY_PAGE, a.secret, b.mfn(own_pfn(b))), "EINVAL"),
    Attack("TLB_FLUSH_LOCAL with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_TLB_FLUSH_LOCAL, foreigndom=a.domid), "EPERM"),
    Attack("INVLPG_LOCAL of A's secret va flushes B only", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_INVLPG_LOCAL, a.guest.direct_va(a.secret_pfn)), "ok"),
    Attack("TLB_FLUSH_MULTI with an unreadable bitmap", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_TLB_FLUSH_MULTI, 0, beyond(b)), "EINVAL"),
    Attack("INVLPG_MULTI with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_INVLPG_MULTI, 0, beyond(b), foreigndom=a.domid), "EPERM"),
    Attack("TLB_FLUSH_ALL flushes B's vCPUs only", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_TLB_FLUSH_ALL), "ok"),
    Attack("INVLPG_ALL of A's secret va flushes B's vCPUs only", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_INVLPG_ALL, a.guest.direct_va(a.secret_pfn)), "ok"),
    Attack("FLUSH_CACHE", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_FLUSH_CACHE), "EACCES"),
    Attack("FLUSH_CACHE_GLOBAL", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_FLUSH_CACHE_GLOBAL), "EACCES"),
    Attack("SET_LDT with A as foreigndom", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_SET_LDT, b.direct_va(own_pfn(b)), 1, foreigndom=a.domid), "EPERM"),
    Attack("MARK_SUPER of A's secret", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_MARK_SUPER, a.secret), "EOPNOTSUPP"),
    Attack("UNMARK_SUPER of A's secret", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNMARK_SUPER, a.secret), "EOPNOTSUPP"),
    # event channels: A's ports are not B's (docs/xen.md section 16.3)
    Attack("bind_interdomain to A's port offered to C", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["offered_to_c"])), "EINVAL"),
    Attack("bind_interdomain to A's loopback port", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["loopback"])), "EINVAL"),
    Attack("bind_interdomain to A's IPI port", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["ipi"])), "EINVAL"),
    Attack("bind_interdomain to A's VIRQ port", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["virq"])), "EINVAL"),
    Attack("bind_interdomain to A's port bound to C", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["interdomain"])), "EINVAL"),
    Attack("bind_interdomain to a port beyond A's table", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=4000)), "EINVAL"),
    Attack("bind_interdomain to A's port number as DOMID_SELF", "EventChannelOp", lambda a, b: evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_port=a.ports["offered_to_c"])), "EINVAL"),
    Attack("send on A's IPI port number", "EventChannelOp", lambda a, b: evtchn(send=h.EvtchnSend(port=a.ports["ipi"])), "EINVAL"),
    Attack("close A's interdomain port number", "EventChannelOp", lambda a, b: evtchn(close=h.EvtchnClose(port=a.ports["interdomain"])), "EINVAL"),
    Attack("unmask A's pending IPI port number", "EventChannelOp", lambda a, b: evtchn(unmask=h.EvtchnUnmask(port=a.ports["ipi"])), "ok"),
    Attack("unmask a port beyond B's table", "EventChannelOp", lambda a, b: evtchn(unmask=h.EvtchnUnmask(port=4000)), "EINVAL"),
    Attack("bind_vcpu of A's port number", "EventChannelOp", lambda a, b: evtchn(bind_vcpu=h.EvtchnBindVcpu(port=a.ports["offered_to_c"], vcpu=1)), "EINVAL"),
    Attack("status of A's port", "EventChannelOp", lambda a, b: evtchn(status=h.EvtchnStatus(dom=a.domid, port=a.ports["interdomain"])), "EPERM"),
    # Xen checks the port before XSM, so B learns only that A's table is smaller (as in Xen).
    Attack("status of a port beyond A's table", "EventChannelOp", lambda a, b: evtchn(status=h.EvtchnStatus(dom=a.domid, port=4000)), "EINVAL"),
    Attack("status of an unknown domain's port", "EventChannelOp", lambda a, b: evtchn(status=h.EvtchnStatus(dom=0x7FEF, port=1)), "ESRCH"),
    Attack("alloc_unbound in A's table", "EventChannelOp", lambda a, b: evtchn(alloc_unbound=h.EvtchnAllocUnbound(dom=a.domid, remote_dom=b.domid)), "EPERM"),
    Attack("bind_ipi to a vCPU only A has", "EventChannelOp", lambda a, b: evtchn(bind_ipi=h.EvtchnBindIpi(vcpu=2)), "ENOENT"),
    Attack("bind_virq VIRQ_TIMER on a vCPU only A has", "EventChannelOp", lambda a, b: evtchn(bind_virq=h.EvtchnBindVirq(virq=VIRQ_TIMER, vcpu=2)), "ENOENT"),
    Attack("bind_virq of a global VIRQ", "EventChannelOp", lambda a, b: evtchn(bind_virq=h.EvtchnBindVirq(virq=VIRQ_CONSOLE, vcpu=0)), "EBUSY"),
    Attack("reset of A's ports", "EventChannelOp", lambda a, b: evtchn(reset=h.EvtchnReset(dom=a.domid)), "EPERM"),
    Attack("bind_pirq of a physical IRQ", "EventChannelOp", lambda a, b: evtchn(bind_pirq=h.EvtchnBindPirq(pirq=1)), "EPERM"),
    Attack("an EVTCHNOP number Xen does not know", "EventChannelOp", lambda a, b: evtchn(cmd=99), "ENOSYS"),
    # FIFO ABI: A's control block and event array are A's frames (docs/xen.md section 24.2)
    Attack("init_control on A's control-block frame", "EventChannelOp", lambda a, b: evtchn(init_control=h.EvtchnInitControl(control_gfn=a.fifo["control"], vcpu=0)), "EINVAL"),
    Attack("init_control on A's event-array frame", "EventChannelOp", lambda a, b: evtchn(init_control=h.EvtchnInitControl(control_gfn=a.fifo["array"], vcpu=1)), "EINVAL"),
    Attack("init_control for a vCPU only A has", "EventChannelOp", lambda a, b: evtchn(init_control=h.EvtchnInitControl(control_gfn=a.fifo["control"], vcpu=2)), "ENOENT"),
    Attack("expand_array with A's event-array frame, B on 2-level", "EventChannelOp", lambda a, b: evtchn(expand_array=h.EvtchnExpandArray(array_gfn=a.fifo["array"])), "EOPNOTSUPP"),
    Attack("set_priority of A's port number, B on 2-level", "EventChannelOp", lambda a, b: evtchn(set_priority=h.EvtchnSetPriority(port=a.ports["ipi"], priority=0)), "ENOSYS"),
    Attack("FIFO on B's page, then A's frames as B's event array", "Session", fifo_on_a_frames, ("ok", "EINVAL", "EINVAL", "ok", "ok")),
    # VCPUOP: B names vCPUs by id in its own domain only (docs/xen.md section 14)
    Attack("VCPUOP_initialise of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, initialise=init_context(b.start_info.pt_base_mfn)), "ENOENT"),
    Attack("VCPUOP_up of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, up=h.VcpuUp()), "ENOENT"),
    Attack("VCPUOP_down of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, down=h.VcpuDown()), "ENOENT"),
    Attack("VCPUOP_is_up of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, is_up=h.VcpuIsUp()), "ENOENT"),
    Attack("VCPUOP_initialise on A's L4", "VcpuOp", lambda a, b: vcpu_op(1, initialise=init_context(a.l4)), "EINVAL"),
    # a compat guest's context has no user base (arch_set_info_guest; docs/pv32.md section 2)
    Attack("VCPUOP_initialise with A's L4 as user pagetable", "VcpuOp", lambda a, b: vcpu_op(1, initialise=init_context(b.start_info.pt_base_mfn, a.l4)), "EINVAL", expect32="ok"),
    Attack("VCPUOP_down of B's last vCPU shuts B down, not A", "VcpuOp", lambda a, b: vcpu_op(0, down=h.VcpuDown()), "ok"),
    Attack("a VCPUOP number Xen does not know, on a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, cmd=99), "ENOENT"),
    Attack("VCPUOP_set_singleshot_timer of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, set_singleshot_timer=h.VcpuSetSingleshotTimer(timeout_abs_ns=1)), "ENOENT"),
    Attack("VCPUOP_set_singleshot_timer fires on B only", "VcpuOp", lambda a, b: vcpu_op(0, set_singleshot_timer=h.VcpuSetSingleshotTimer(timeout_abs_ns=1)), "ok"),
    Attack("VCPUOP_stop_singleshot_timer of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, stop_singleshot_timer=h.VcpuStopSingleshotTimer()), "ENOENT"),
    Attack("VCPUOP_set_periodic_timer of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, set_periodic_timer=h.VcpuSetPeriodicTimer(period_ns=10**6)), "ENOENT"),
    Attack("VCPUOP_set_periodic_timer ticks on B only", "VcpuOp", lambda a, b: vcpu_op(1, set_periodic_timer=h.VcpuSetPeriodicTimer(period_ns=10**6)), "ok"),
    Attack("VCPUOP_stop_periodic_timer of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, stop_periodic_timer=h.VcpuStopPeriodicTimer()), "ENOENT"),
    Attack("VCPUOP_get_runstate_info of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, get_runstate_info=h.VcpuGetRunstateInfo()), "ENOENT"),
    Attack("VCPUOP_register_runstate_memory_area of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, register_runstate_memory_area=h.VcpuRegisterRunstateMemoryArea(addr=beyond(b))), "ENOENT"),
    Attack("VCPUOP_register_runstate_memory_area in Xen's range", "VcpuOp", lambda a, b: vcpu_op(0, register_runstate_memory_area=h.VcpuRegisterRunstateMemoryArea(addr=XEN_VA)), "EFAULT"),
    Attack("VCPUOP_register_runstate_memory_area where B maps nothing: its copies fault", "VcpuOp", lambda a, b: vcpu_op(0, register_runstate_memory_area=h.VcpuRegisterRunstateMemoryArea(addr=beyond(b))), "ok"),
    Attack("VCPUOP_register_vcpu_info of a vCPU only A has", "VcpuOp", lambda a, b: vcpu_op(2, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=b.mfn(own_pfn(b)))), "ENOENT"),
    Attack("VCPUOP_register_vcpu_info on A's secret page", "VcpuOp", lambda a, b: vcpu_op(0, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=a.secret)), "EINVAL"),
    Attack("VCPUOP_register_vcpu_info on A's shared info", "VcpuOp", lambda a, b: vcpu_op(1, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=a.shared_info, offset=64)), "EINVAL"),
    Attack("VCPUOP_register_vcpu_info on A's pinned L1", "VcpuOp", lambda a, b: vcpu_op(0, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=a.l1)), "EINVAL"),
    # SCHEDOP, timers, version, echo
    Attack("poll A's port numbers", "SchedOp", lambda a, b: sched(poll=h.SchedPoll(ports=[a.ports["ipi"], a.ports["virq"]], timeout_ns=1)), "EINVAL"),
    Attack("shutdown shuts B down, not A", "SchedOp", lambda a, b: sched(shutdown=h.SchedShutdown(reason=C.SHUTDOWN_REASON_CRASH)), "ok"),
    Attack("yield", "SchedOp", lambda a, b: sched(sched_yield=h.SchedYield()), "ok"),
    Attack("a SCHEDOP number Xen does not know", "SchedOp", lambda a, b: sched(cmd=99), "ENOSYS"),
    Attack("set_timer_op fires on B only", "SetTimerOp", lambda a, b: h.SetTimerOpRequest(timeout_ns=1), "ok"),
    Attack("xen_version", "XenVersion", lambda a, b: h.XenVersionRequest(), "ok"),
    Attack("vm_assist sets B's own assist, A's stay", "VmAssist", lambda a, b: h.VmAssistRequest(cmd=0, type=3), "ok"),
    Attack("a VMASST type no PV domain may set", "VmAssist", lambda a, b: h.VmAssistRequest(cmd=0, type=6), "EINVAL"),
    Attack("echo", "Echo", lambda a, b: h.EchoRequest(payload=b"x"), "ok"),
    # memory: B's address space holds B's frames only (memory.proto)
    Attack("load at A's secret va reads B's own page", "Load", lambda a, b: m.LoadRequest(va=secret_va_in_b(a, b), size=8), "ok", returns=lambda a, b: m.LoadResponse(value=0)),
    Attack("read at A's secret va reads B's own page", "Read", lambda a, b: m.ReadRequest(va=secret_va_in_b(a, b), length=8), "ok", returns=lambda a, b: m.ReadResponse(data=bytes(8))),
    Attack("load past B's memory", "Load", lambda a, b: m.LoadRequest(va=beyond(b), size=8), "fault"),
    Attack("store past B's memory", "Store", lambda a, b: m.StoreRequest(va=beyond(b), size=8, value=1), "fault"),
    Attack("atomic past B's memory", "Atomic", lambda a, b: m.AtomicRequest(op=m.ATOMIC_OP_FETCH_ADD, va=beyond(b), size=8, operand=1), "fault"),
    Attack("write past B's memory", "Write", lambda a, b: m.WriteRequest(va=beyond(b), data=b"x"), "fault"),
    # Xen's range: Xen's entries there (L4 slots 256..271) lack USER or are empty (init_xen_l4_slots);
    # a 32-bit B cannot name it (no 32-bit address: EINVAL)
    Attack("load in Xen's range past the read-only M2P", "Load", lambda a, b: m.LoadRequest(va=XEN_VA + (1 << 38), size=8), "fault", expect32="EINVAL"),
    Attack("user-mode load in Xen's range", "Load", lambda a, b: m.LoadRequest(va=XEN_LAST_VA, size=8, user_mode=True), "fault", expect32="EINVAL"),
    Attack("load through Xen's linear map", "Load", lambda a, b: m.LoadRequest(va=XEN_LINEAR_VA, size=8), "fault", expect32="EINVAL"),
    Attack("store through Xen's linear map", "Store", lambda a, b: m.StoreRequest(va=XEN_LINEAR_VA, size=8, value=0), "fault", expect32="EINVAL"),
    Attack("atomic in Xen's range", "Atomic", lambda a, b: m.AtomicRequest(op=m.ATOMIC_OP_FETCH_OR, va=XEN_LINEAR_VA, size=8, operand=1), "fault", expect32="EINVAL"),
    Attack("read in Xen's range", "Read", lambda a, b: m.ReadRequest(va=XEN_LINEAR_VA, length=4096), "fault", expect32="EINVAL"),
    Attack("write in Xen's range", "Write", lambda a, b: m.WriteRequest(va=XEN_VA, data=b"x"), "fault", expect32="EINVAL"),
    Attack("update_va_mapping in Xen's range", "UpdateVaMapping", lambda a, b: uvm(XEN_LINEAR_VA, pte(a.secret)), "EINVAL"),
    Attack("TLB_FLUSH_MULTI with a bitmap in Xen's range", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_TLB_FLUSH_MULTI, 0, XEN_LINEAR_VA), "EINVAL"),
    *(Attack(f"a chain left in Xen's slot 256 before {base}", "Session", chain_in_xen_slot(base), chain_outcome(base), expect32=chain_outcome32(base)) for base in ("PIN_L4", "NEW_BASEPTR", "NEW_USER_BASEPTR")),
    # memory_op: give back, take for, exchange and read A's reservation (docs/xen.md section 23)
    Attack("decrease_reservation of A's secret frame", "MemoryOp", lambda a, b: memop(decrease_reservation=reservation([a.secret])), "ok", returns=lambda a, b: h.MemoryOpResponse(
        extent_start=[a.secret], stopped=f"ENXIO: extent 0 frame 0: mfn {a.secret:#x} is owned by dom{a.domid}, not dom{b.domid} (get_page)")),
    Attack("decrease_reservation naming A", "MemoryOp", lambda a, b: memop(decrease_reservation=reservation([a.plain], domid=a.domid)), "ok", returns=lambda a, b: h.MemoryOpResponse(
        extent_start=[a.plain], stopped=f"dom{b.domid} may not adjust the reservation of dom{a.domid} (xsm_memory_adjust_reservation)")),
    Attack("increase_reservation for A", "MemoryOp", lambda a, b: memop(increase_reservation=reservation([0], domid=a.domid)), "ok", returns=lambda a, b: h.MemoryOpResponse(
        extent_start=[0], stopped=f"dom{b.domid} may not adjust the reservation of dom{a.domid} (xsm_memory_adjust_reservation)")),
    Attack("populate_physmap for A", "MemoryOp", lambda a, b: memop(populate_physmap=reservation([a.secret_pfn], domid=a.domid)), "ok", returns=lambda a, b: h.MemoryOpResponse(
        extent_start=[a.secret_pfn], stopped=f"dom{b.domid} may not adjust the reservation of dom{a.domid} (xsm_memory_adjust_reservation)")),
    Attack("exchange of A's frame", "MemoryOp", lambda a, b: memop(exchange=h.XenMemoryExchange(input=reservation([a.plain]), output=reservation([0]))), "EINVAL"),
    Attack("exchange naming A", "MemoryOp", lambda a, b: memop(exchange=h.XenMemoryExchange(input=reservation([a.plain], domid=a.domid), output=reservation([0], domid=a.domid))), "EPERM"),
    Attack("current_reservation of A", "MemoryOp", lambda a, b: memop(current_reservation=h.XenMemoryDomain(domid=a.domid)), "EPERM"),
    Attack("maximum_reservation of A", "MemoryOp", lambda a, b: memop(maximum_reservation=h.XenMemoryDomain(domid=a.domid)), "EPERM"),
    Attack("maximum_ram_page", "MemoryOp", lambda a, b: memop(maximum_ram_page=h.XenMaximumRamPage()), "ok"),
    Attack("memory_op add_to_physmap (7)", "MemoryOp", lambda a, b: memop(cmd=7), "ENOSYS"),
    Attack("B reads A's frame's entry in the read-only M2P (Xen's M2P is global)", "Load", lambda a, b: m.LoadRequest(va=RO_MPT_VIRT_START + 8 * a.secret, size=8), "ok",
           returns=lambda a, b: m.LoadResponse(value=a.secret_pfn), expect32="EINVAL"),
    Attack("B writes A's frame's entry in the read-only M2P", "Store", lambda a, b: m.StoreRequest(va=RO_MPT_VIRT_START + 8 * a.secret, size=8, value=1), "fault", expect32="EINVAL"),
    # a 32-bit B's compat M2P, in its hole (docs/pv32.md section 2): readable by its kernel only
    Attack("B reads A's frame's entry in the compat M2P", "Load", lambda a, b: m.LoadRequest(va=HYPERVISOR_COMPAT_VIRT_START + 4 * a.secret, size=4), "fault",
           returns=lambda a, b: m.LoadResponse(value=a.secret_pfn), expect32="ok"),
    Attack("B writes A's frame's entry in the compat M2P", "Store", lambda a, b: m.StoreRequest(va=HYPERVISOR_COMPAT_VIRT_START + 4 * a.secret, size=4, value=1), "fault"),
    Attack("B's user mode reads the compat M2P", "Load", lambda a, b: m.LoadRequest(va=HYPERVISOR_COMPAT_VIRT_START + 4 * a.secret, size=4, user_mode=True), "fault"),
    # several at once: a Session message, a multicall
    Attack("loads and stores through B's own tables that point at A's frames", "Session", rogue_table, ("ok", "ok", "ok", "EBUSY", "EBUSY", "fault", "fault", "fault", "fault", "fault")),
    Attack("TLB_FLUSH_MULTI, INVLPG_MULTI and UVMF bitmaps naming absent vCPUs", "Session", flushes_naming_absent_vcpus, ("ok", "ok", "ok", "ok")),
    Attack("block on B's IPI that has A's port number", "Session", block_on_own_ipi, ("ok", "ok", "ok")),
    Attack(
        "a multicall of attacks",
        "Multicall",
        lambda a, b: h.MulticallRequest(
            entries=[
                entry(mmu((own_entry(b), pte(a.secret, P | RW | A | D)))),
                entry(ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4)),
                entry(uvm(b.direct_va(own_pfn(b)), pte(a.secret))),
                entry(evtchn(bind_interdomain=h.EvtchnBindInterdomain(remote_dom=a.domid, remote_port=a.ports["offered_to_c"]))),
                entry(vcpu_op(2, up=h.VcpuUp())),
                entry(sched(poll=h.SchedPoll(ports=[a.ports["ipi"]]))),
                entry(h.SetTimerOpRequest(timeout_ns=1)),
                entry(h.XenVersionRequest()),
            ]
        ),
        ("EBUSY", "EINVAL", "EBUSY", "EINVAL", "ENOENT", "EINVAL", "ok", "ok"),
    ),
    Attack(
        "a multicall inside a multicall: refused in that entry only (do_multicall)",
        "Multicall",
        lambda a, b: h.MulticallRequest(
            entries=[
                h.MulticallEntry(multicall=h.MulticallRequest(entries=[entry(ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4))])),
                entry(ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4)),
            ]
        ),
        ("EINVAL", "EINVAL"),
    ),
    # credentials (hypercalls.proto: the caller is the token's domain, the id one of its vCPUs)
    Attack("B's token naming a vCPU only A has", "XenVersion", lambda a, b: h.XenVersionRequest(), "INVALID_ARGUMENT", b_naming_a_only_vcpu),
    Attack("a Session with B's token naming a vCPU only A has", "Session", lambda a, b: session(h.XenVersionRequest()), "INVALID_ARGUMENT", b_naming_a_only_vcpu),
    Attack("A's token with one character changed", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4), "UNAUTHENTICATED", a_token_altered),
    Attack("a Session with A's token altered", "Session", lambda a, b: session(ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4)), "UNAUTHENTICATED", a_token_altered),
    Attack("B's token then A's token: the call is B's", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4), "EINVAL", b_then_a_token),
    Attack("no token, vCPU 0", "MmuextOp", lambda a, b: ext(C.MMUEXT_CMD_UNPIN_TABLE, a.l4), "UNAUTHENTICATED", no_token),
    *_toolstack_rows(),
]

# -- running a row --------------------------------------------------------------------------------

HYPERCALLS = h.DESCRIPTOR.services_by_name["Hypercalls"]
TOOLSTACK = t.DESCRIPTOR.services_by_name["Toolstack"]
CASE_OF_REQUEST = {f.message_type.full_name: f.name for f in h.Call.DESCRIPTOR.oneofs_by_name["call"].fields}


def status_outcome(status) -> str:
    """A google.rpc.Status as an outcome: Xen's errno (whose gRPC code must be the one
    common.proto gives it), else the code's name."""
    info = error_details_pb2.ErrorInfo()
    if any(detail.Unpack(info) for detail in status.details) and info.domain == "xen":
        assert status.code == XEN_CODES[Errno[info.reason]], status
        return info.reason
    return next(code for code in grpc.StatusCode if code.value[0] == status.code).name


def result_outcome(result: h.CallResult) -> Outcome:
    if result.HasField("status"):
        return status_outcome(result.status)
    return response_outcome(getattr(result, result.WhichOneof("result")))


def response_outcome(response: Message) -> Outcome:
    if isinstance(response, h.MulticallResponse):
        return tuple(result_outcome(r) for r in response.results)
    faulted = "fault" in response.DESCRIPTOR.fields_by_name and response.HasField("fault")
    return "fault" if faulted else "ok"


def error_outcome(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    return status_outcome(status) if status is not None else error.code().name


def attempt(server, attack: Attack, victim: Victim, b: WireGuest) -> tuple[Outcome, Message | None]:
    """Run the row's RPC as its credentials say: its outcome, and the response if any."""
    request, metadata = attack.request(victim, b), attack.creds(victim, b)
    channel = server.channel()
    try:
        if attack.rpc == "Session":
            responses = server.hypercalls(channel).Session(iter([request]), metadata=metadata, timeout=10)
            answer = next(r for r in responses if r.request_id)
            return tuple(result_outcome(r) for r in answer.results), answer
        if attack.rpc in TOOLSTACK.methods_by_name:
            method = getattr(server.toolstack(channel), attack.rpc)
            response = method(request, metadata=metadata, timeout=10)
            if TOOLSTACK.methods_by_name[attack.rpc].server_streaming:
                response = next(response)
            return "ok", response
        response = getattr(server.hypercalls(channel), attack.rpc)(request, metadata=metadata, timeout=10)
        return response_outcome(response), response
    except grpc.RpcError as error:
        return error_outcome(error), None


@pytest.fixture(scope="module", params=[64, 32], ids=["victim64", "victim32"])
def world(request):
    """The machine and A: a 64-bit A, and a 32-bit PAE one on a mixed machine (docs/pv32.md)."""
    with start_server() as server:
        yield server, build_victim(server, request.param)


@pytest.fixture(params=[64, 32], ids=["b64", "b32"])
def attacker(world, request):
    """A fresh B (2 vCPUs) per row, destroyed after it; the machine's audit stays clean."""
    server, _ = world
    b = WireGuest(server, nr_pages=512, nr_vcpus=2, address_size=request.param)
    yield b
    b.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=b.domid))
    assert not b.toolstack("Audit", t.AuditRequest()).findings


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_fails_as_xen_says_and_leaves_a_unchanged(world, attacker, attack):
    server, victim = world
    before = victim.state()
    assert not before[0].findings, before[0]
    outcome, response = attempt(server, attack, victim, attacker)
    expect = attack.expect32 if attacker.pv32 and attack.expect32 is not None else attack.expect
    assert outcome == expect, attack.name
    if attack.returns is not None and outcome == "ok":
        assert response == attack.returns(victim, attacker)
    assert victim.state() == before, f"{attack.name} changed domain A"


def test_the_victim_was_worth_attacking(world):
    """The rows would prove little if A's secret, pinned L1 and ports were not really there."""
    _, victim = world
    a = victim.guest
    assert a.call("Load", m.LoadRequest(va=a.direct_va(victim.secret_pfn), size=8)).value == SECRET
    assert a.frame(victim.l1).pinned and a.frame(victim.l4).pinned
    ports = {p.port: p for p in a.toolstack("EventChannelStatus", t.EventChannelStatusRequest(domid=a.domid)).ports}
    assert ports[victim.ports["ipi"]].pending
    states = {name: C.EvtchnStat.Name(ports[port].status.state) for name, port in victim.ports.items()}
    assert states == {
        "ipi": "EVTCHN_STAT_IPI",
        "virq": "EVTCHN_STAT_VIRQ",
        "offered_to_c": "EVTCHN_STAT_UNBOUND",
        "loopback": "EVTCHN_STAT_UNBOUND",
        "interdomain": "EVTCHN_STAT_INTERDOMAIN",
    }


# -- coverage: every interface has a row ----------------------------------------------------------


def interfaces() -> set[str]:
    """What the rows must cover: every RPC, Call case, event-channel / vCPU / sched op and
    mmuext command of the contract."""
    names = {m.name for m in HYPERCALLS.methods} | {m.name for m in TOOLSTACK.methods}
    for message in (h.Call, h.EventChannelOpRequest, h.VcpuOpRequest, h.SchedOpRequest, h.MemoryOpRequest):
        names |= {f"{message.DESCRIPTOR.name}.{f.name}" for oneof in message.DESCRIPTOR.oneofs for f in oneof.fields}
    return names | {v.name for v in C.MmuextCmd.DESCRIPTOR.values if v.number}


def covered(rpc: str, request: Message) -> set[str]:
    """What one row exercises: its RPC, the Call case a unary RPC stands for, and every oneof
    case and mmuext command inside its request."""
    names = {rpc}
    if rpc in HYPERCALLS.methods_by_name and rpc != "Session":
        names.add(f"Call.{CASE_OF_REQUEST[request.DESCRIPTOR.full_name]}")
    pending = [request]
    while pending:
        message = pending.pop()
        for oneof in message.DESCRIPTOR.oneofs:
            case = message.WhichOneof(oneof.name)
            if case:
                names.add(f"{message.DESCRIPTOR.name}.{case}")
        if isinstance(message, h.MmuextOp):
            names.add(C.MmuextCmd.Name(message.cmd))
        for descriptor, value in message.ListFields():
            if descriptor.message_type is not None:
                pending.extend(value if descriptor.is_repeated else [value])
    return names


def test_every_interface_has_a_row(world, attacker):
    _, victim = world
    done = set().union(*(covered(a.rpc, a.request(victim, attacker)) for a in ATTACKS))
    assert interfaces() - done == set(), "add an attack row for each of these"
