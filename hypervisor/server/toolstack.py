"""The Toolstack service: domain lifecycle through the core's toolstack ops, and read-only
views of the model (domains, vCPUs, frames, ports, audit, statistics), plus trace control.

Mutations (create, destroy, pause, unpause) go through `Hypervisor.toolstack`, so they are
traced and counted like hypercalls; views read the model directly and change nothing. Every
method checks the admin token first (`auth.Tokens.admin`).
"""

import asyncio
import re
from collections.abc import Callable
from functools import partial

import grpc

from hypervisor.core import SimulatorBug, audit
from hypervisor.core.abi import (
    BITS_PER_EVTCHN_WORD,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    SHARED_INFO_VCPU_INFO,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    Errno,
)
from hypervisor.core.domain import Domain
from hypervisor.core.evtchn import ECS, status as evtchn_status
from xensim.v1 import toolstack_pb2, toolstack_pb2_grpc

from . import convert
from .auth import Tokens
from .errors import BadRequest, PeerGone, Refused, abort, write
from .tracing import Tracing
from .vcpus import Runtime


def _admin(op: str) -> Callable:
    """A Toolstack method: the admin check, then `body(self, request)`; whatever it raises
    becomes the call's status (`op` names it in ErrorInfo and the log)."""

    def wrap(body: Callable) -> Callable:
        async def method(self: "ToolstackServicer", request, context: grpc.aio.ServicerContext):
            try:
                self.tokens.admin(context.invocation_metadata())
                return body(self, request)
            except Exception as exc:  # noqa: BLE001 - errors.status_of is the one mapping
                await abort(context, exc, op)

        return method

    return wrap


class ToolstackServicer(toolstack_pb2_grpc.ToolstackServicer):
    def __init__(self, runtime: Runtime, tokens: Tokens, tracing: Tracing):
        self.runtime = runtime
        self.hv = runtime.hv
        self.tokens = tokens
        self.tracing = tracing

    # -- lifecycle ------------------------------------------------------------------------------

    @_admin("create_domain")
    def CreateDomain(self, request):
        args = {"nr_pages": request.nr_pages, "nr_vcpus": request.nr_vcpus, "name": request.name, "highmem_pages": request.highmem_pages}
        if request.max_evtchn_port:  # 0 = libxl's default, which is the core's
            args["max_evtchn_port"] = request.max_evtchn_port
        created = self.hv.toolstack("create_domain", **args)
        token = self.tokens.issue(created["domid"], created["instance"])
        return toolstack_pb2.CreateDomainResponse(domid=created["domid"], token=token, start_info=convert.start_info(created["start_info"]))

    @_admin("destroy_domain")
    def DestroyDomain(self, request):
        """The domain is dead to its callers before the core tears it down (its token refused,
        its calls and Sessions ended with ABORTED), and the core's teardown always completes
        (Hypervisor.destroy_domain), so nothing is left half done. A bug the teardown found
        fails the call with INTERNAL, logged and counted, after the domain is gone."""
        domain = self.hv.domains.get(request.domid)
        if domain is not None:  # else the core answers ESRCH
            self.tokens.revoke(domain.instance)
            self.runtime.forget_domain(request.domid)
        destroyed = self.hv.toolstack("destroy_domain", domid=request.domid)
        self.runtime.drain()
        if "bug" in destroyed:
            raise SimulatorBug(destroyed["bug"])
        return toolstack_pb2.DestroyDomainResponse(freed_frames=destroyed["freed_frames"])

    @_admin("pause_domain")
    def PauseDomain(self, request):
        self.hv.toolstack("pause_domain", domid=request.domid)
        self.runtime.pause(request.domid)
        return toolstack_pb2.PauseDomainResponse()

    @_admin("unpause_domain")
    def UnpauseDomain(self, request):
        self.hv.toolstack("unpause_domain", domid=request.domid)
        self.runtime.unpause(request.domid)
        return toolstack_pb2.UnpauseDomainResponse()

    # -- views ----------------------------------------------------------------------------------

    @_admin("list_domains")
    def ListDomains(self, request):
        return toolstack_pb2.ListDomainsResponse(domains=[self._domain(self.hv.domains[d]) for d in sorted(self.hv.domains)])

    @_admin("domain_info")
    def DomainInfo(self, request):
        return toolstack_pb2.DomainInfoResponse(domain=self._domain(self.hv.domain(request.domid)))

    def _domain(self, domain: Domain) -> toolstack_pb2.Domain:
        record = toolstack_pb2.Domain(
            domid=domain.domid,
            name=domain.name,
            nr_pages=domain.nr_pages,
            tot_pages=self.hv.tot_pages(domain.domid),
            nr_lowmem_pages=domain.nr_lowmem_pages,
            nr_vcpus=len(domain.vcpus),
            online_vcpus=sum(not v.down for v in domain.vcpus),
            max_evtchn_port=domain.max_evtchn_port,
            shared_info_mfn=domain.shared_info_mfn,
            paused=domain.paused,
        )
        if domain.shutdown_code is not None:
            record.shutdown_reason = domain.shutdown_code + 1
        return record

    @_admin("vcpu_info")
    def VcpuInfo(self, request):
        domain = self.hv.domain(request.domid)
        vcpus = [self.hv.vcpu(request.domid, request.vcpu)] if request.HasField("vcpu") else domain.vcpus
        shared = self.hv.memory.read(domain.shared_info_mfn, 0, SHARED_INFO_VCPU_INFO + len(domain.vcpus) * VCPU_INFO_SIZE)
        records = []
        for vcpu in vcpus:
            info = SHARED_INFO_VCPU_INFO + vcpu.vcpu_id * VCPU_INFO_SIZE
            records.append(
                toolstack_pb2.Vcpu(
                    vcpu_id=vcpu.vcpu_id,
                    initialised=vcpu.initialised,
                    online=not vcpu.down,
                    blocked=vcpu.blocked,
                    kernel_cr3_mfn=vcpu.guest_table,
                    user_cr3_mfn=vcpu.guest_table_user,
                    upcall_pending=bool(shared[info + VCPU_INFO_UPCALL_PENDING]),
                    upcall_mask=bool(shared[info + VCPU_INFO_UPCALL_MASK]),
                    stale_tlb_hits=vcpu.stale_tlb_hits,
                    tlb_entries=len(vcpu.tlb),
                    session_open=self.runtime.session_open(request.domid, vcpu.vcpu_id),
                )
            )
        return toolstack_pb2.VcpuInfoResponse(vcpus=records)

    @_admin("frame_info")
    def FrameInfo(self, request):
        count = request.count or 1
        if count > convert.MAX_FRAME_INFO:
            raise BadRequest("count", f"{count} frames; at most {convert.MAX_FRAME_INFO}")
        return toolstack_pb2.FrameInfoResponse(frames=[convert.frame(self.hv.frame_info(mfn)) for mfn in range(request.mfn, request.mfn + count)])

    @_admin("event_channel_status")
    def EventChannelStatus(self, request):
        domain = self.hv.domain(request.domid)
        words = self.hv.memory.entries(domain.shared_info_mfn)
        ports = []
        for port, chn in enumerate(domain.evtchn):
            if chn.state in (ECS.FREE, ECS.RESERVED):
                continue
            word, bit = divmod(port, BITS_PER_EVTCHN_WORD)
            ports.append(
                toolstack_pb2.EventChannelPort(
                    port=port,
                    status=convert.evtchn_status(evtchn_status(self.hv, domain.vcpus[0], port)),
                    pending=bool(words.item(SHARED_INFO_EVTCHN_PENDING // 8 + word) >> bit & 1),
                    masked=bool(words.item(SHARED_INFO_EVTCHN_MASK // 8 + word) >> bit & 1),
                )
            )
        return toolstack_pb2.EventChannelStatusResponse(ports=ports)

    @_admin("audit")
    def Audit(self, request):
        findings = audit(self.hv)
        if request.HasField("domid"):
            self.hv.domain(request.domid)  # ESRCH
            mentions = re.compile(rf"\bdom{request.domid}\b")
            findings = [f for f in findings if mentions.search(f)]
        return toolstack_pb2.AuditResponse(findings=[toolstack_pb2.AuditFinding(message=f) for f in findings])

    @_admin("stats")
    def Stats(self, request):
        counts = sorted((op, 0 if outcome in ("ok", "bug") else int(Errno[outcome]), outcome == "bug", n) for (op, outcome), n in self.hv.stats.items())
        return toolstack_pb2.StatsResponse(
            counts=[toolstack_pb2.OpCount(op=op, errno=errno, simulator_bug=bug, count=n) for op, errno, bug, n in counts],
            trace_error=self.tracing.write_error,
        )

    # -- trace ----------------------------------------------------------------------------------

    @_admin("start_trace")
    def StartTrace(self, request):
        self.tracing.start_file(request.path)
        return toolstack_pb2.StartTraceResponse()

    @_admin("stop_trace")
    def StopTrace(self, request):
        lines, write_error = self.tracing.stop_file()
        return toolstack_pb2.StopTraceResponse(lines=lines, write_error=write_error)

    async def StreamTrace(self, request, context: grpc.aio.ServicerContext):
        try:
            self.tokens.admin(context.invocation_metadata())
            with self.runtime.guard(None):
                reader = self.tracing.subscribe(partial(self.runtime.end_task, asyncio.current_task()))
                try:
                    while True:
                        await write(context, toolstack_pb2.TraceLine(line=await reader.next()), "StreamTrace")
                finally:
                    self.tracing.unsubscribe(reader)
        except PeerGone:  # the subscriber went away while a line was being sent
            return
        except Exception as exc:  # noqa: BLE001 - as in _admin
            await abort(context, exc, "stream_trace")

    # -- sessions -------------------------------------------------------------------------------

    @_admin("detach_session")
    def DetachSession(self, request):
        self.hv.vcpu(request.domid, request.vcpu)  # ESRCH, ENOENT
        ending = Refused(grpc.StatusCode.ABORTED, f"dom{request.domid} vCPU {request.vcpu}'s Session was detached by the toolstack (DetachSession)")
        return toolstack_pb2.DetachSessionResponse(detached=self.runtime.end_session(request.domid, request.vcpu, ending))
