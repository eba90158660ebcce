"""The Toolstack service: domain lifecycle through the core's toolstack ops, and read-only
views of the model (domains, vCPUs, frames, ports, audit, statistics), plus trace control.

Mutations (create, destroy, pause, unpause) go through `Hypervisor.toolstack`, so they are
traced and counted like hypercalls; views read the model directly and change nothing. Every
method checks the admin token first (`auth.Tokens.admin`).
"""

import asyncio
import logging
from collections.abc import Callable
from functools import partial

import grpc

from hypervisor.core import SimulatorBug, XenError, audit, audit_domain, views
from hypervisor.core.abi import Errno
from hypervisor.core.domain import Domain
from xensim.v1 import common_pb2, toolstack_pb2, toolstack_pb2_grpc

from . import convert
from .auth import Tokens
from .errors import BadRequest, PeerGone, Refused, abort, write
from .tracing import Tracing
from .vcpus import Runtime

log = logging.getLogger("xensim.server")
# Toolstack ops that change the machine, logged at INFO with their request; views at DEBUG.
_LOGGED = frozenset({"create_domain", "destroy_domain", "pause_domain", "unpause_domain", "start_trace", "stop_trace"})


def _admin(op: str) -> Callable:
    """A Toolstack method: the admin check, then `body(self, request)`; whatever it raises
    becomes the call's status (`op` names it in ErrorInfo and the log). A refused call is
    logged at WARNING (a bug of the simulator is logged by `abort`), a change at INFO."""

    def wrap(body: Callable) -> Callable:
        async def method(self: "ToolstackServicer", request, context: grpc.aio.ServicerContext):
            try:
                self.tokens.admin(context.invocation_metadata())
                response = body(self, request)
                level = logging.INFO if op in _LOGGED else logging.DEBUG
                if log.isEnabledFor(level):  # a view's response can be large: describe it only when logged
                    log.log(level, "Toolstack %s(%s): %s", op, _brief(request), _brief(response))
                return response
            except Exception as exc:  # noqa: BLE001 - errors.status_of is the one mapping
                if isinstance(exc, (XenError, Refused, BadRequest)):
                    log.warning("Toolstack %s from %s refused: %s", op, context.peer(), exc)
                await abort(context, exc, op)

        return method

    return wrap


# The Domain message's fields that views.domain_info gives as they are.
_DOMAIN_FIELDS = ("domid", "name", "nr_pages", "tot_pages", "nr_lowmem_pages", "nr_vcpus", "online_vcpus", "max_evtchn_port", "shared_info_mfn", "paused", "address_size")


def _brief(message) -> str:
    """A message on one line for the log: scalars, the length of lists, {...} for messages,
    and never the domain token a CreateDomain returns."""

    def value(field, v) -> str:
        if field.is_repeated:
            return f"[{len(v)}]"
        return "{...}" if field.type == field.TYPE_MESSAGE else str(v)

    return ", ".join(f"{f.name}={value(f, v)}" for f, v in message.ListFields() if f.name != "token")


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
        if request.address_size:  # 0 = 64, the core's default
            args["address_size"] = request.address_size
        created = self.hv.toolstack("create_domain", **args)
        token = self.tokens.issue(created["domid"], created["instance"])
        start_info = convert.start_info(created["start_info"], self.hv.domains[created["domid"]].address_size)
        return toolstack_pb2.CreateDomainResponse(domid=created["domid"], token=token, start_info=start_info)

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
        info = views.domain_info(self.hv, domain)
        record = toolstack_pb2.Domain(
            **{name: info[name] for name in _DOMAIN_FIELDS}, state=toolstack_pb2.DomainState.Value(f"DOMAIN_STATE_{info['state'].upper()}")
        )
        if info["shutdown_code"] is not None:
            record.shutdown_reason = info["shutdown_code"] + 1
        return record

    @_admin("vcpu_info")
    def VcpuInfo(self, request):
        domain = self.hv.domain(request.domid)
        vcpus = [self.hv.vcpu(request.domid, request.vcpu)] if request.HasField("vcpu") else domain.vcpus
        records = []
        for vcpu in vcpus:
            info = views.vcpu_info(self.hv, domain, vcpu)
            records.append(
                toolstack_pb2.Vcpu(
                    vcpu_id=info["vcpu"],
                    initialised=info["initialised"],
                    online=info["online"],
                    blocked=info["blocked"],
                    kernel_cr3_mfn=info["cr3"],
                    user_cr3_mfn=info["user_cr3"],
                    upcall_pending=info["upcall_pending"],
                    upcall_mask=info["upcall_mask"],
                    stale_tlb_hits=info["stale_tlb_hits"],
                    tlb_entries=info["tlb_entries"],
                    session_open=self.runtime.session_open(request.domid, vcpu.vcpu_id),
                    periodic_period_ns=info["periodic_period_ns"],
                    vcpu_info_mfn=info["vcpu_info_mfn"],
                    vcpu_info_offset=info["vcpu_info_offset"],
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
        ports = views.evtchn_ports(self.hv, self.hv.domain(request.domid))
        return toolstack_pb2.EventChannelStatusResponse(
            ports=[toolstack_pb2.EventChannelPort(**{**p, "status": convert.evtchn_status(p["status"])}) for p in ports]
        )

    @_admin("audit")
    def Audit(self, request):
        findings = audit_domain(self.hv, request.domid) if request.HasField("domid") else audit(self.hv)  # ESRCH
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

    # -- inspection (xl info, xen-mfndump, debug keys) ------------------------------------------

    @_admin("host_info")
    def HostInfo(self, request):
        file, streams = self.tracing.state()
        gate = self.runtime.gate
        schedule = "free" if gate is None else str(gate.spec)
        return toolstack_pb2.HostInfoResponse(**views.host_info(self.hv), uptime_ns=self.runtime.now_ns(), trace_file=file, trace_streams=streams, schedule=schedule)

    @_admin("dump_pagetable")
    def DumpPagetable(self, request):
        tables = views.pagetable_tree(self.hv, request.mfn) if request.tree else [views.pagetable(self.hv, request.mfn)]
        return toolstack_pb2.DumpPagetableResponse(tables=[convert.pagetable(t) for t in tables])

    @_admin("reverse_map")
    def ReverseMap(self, request):
        found = views.reverse_map(self.hv, request.mfn)
        return toolstack_pb2.ReverseMapResponse(
            frame=convert.frame(found["frame"]),
            entries=[toolstack_pb2.PagetableReference(**e) for e in found["entries"]],
            bases=[toolstack_pb2.BasePointer(**b) for b in found["bases"]],
        )

    @_admin("dump_p2m")
    def DumpP2M(self, request):
        return toolstack_pb2.DumpP2MResponse(mfns=views.p2m(self.hv, self.hv.domain(request.domid)))

    @_admin("dump_m2p")
    def DumpM2P(self, request):
        domid = None
        if request.HasField("domid"):
            domid = self.hv.domain(request.domid).domid  # ESRCH
        entries = views.m2p(self.hv, domid)
        return toolstack_pb2.DumpM2PResponse(entries=[toolstack_pb2.M2PEntry(mfn=m, owner=o, pfn=p) for m, o, p in entries])

    @_admin("domain_summary")
    def DomainSummary(self, request):
        summary = views.domain_summary(self.hv, self.hv.domain(request.domid))
        by_type = [toolstack_pb2.TypeCount(type=common_pb2.PageType.Value(f"PAGE_TYPE_{t}"), count=n) for t, n in summary.pop("by_type").items()]
        return toolstack_pb2.DomainSummaryResponse(**summary, by_type=by_type)

    @_admin("domain_stats")
    def DomainStats(self, request):
        counts = views.domain_stats(self.hv, request.domid if request.HasField("domid") else None)
        counts = [(d, op, 0 if outcome == "ok" else int(Errno[outcome]), n) for d, op, outcome, n in counts]
        return toolstack_pb2.DomainStatsResponse(counts=[toolstack_pb2.DomainOpCount(domid=d, op=op, errno=e, count=n) for d, op, e, n in counts])
