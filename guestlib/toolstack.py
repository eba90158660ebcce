"""A small async client of the Toolstack service (the admin's `xl`), for tests and tools.

Toolstack calls are rare and off the hot path, so each is a unary call on the sync stub run in
a trio worker thread (docs/transport.md section 2.1: fine for tooling, ~2x a stream message). Errors are the
same exceptions as a guest's: XenError for a Xen errno, CallRejected otherwise.
"""

import functools

import grpc
import trio
from google.rpc import status_pb2

from xensim.v1 import common_pb2, toolstack_pb2, toolstack_pb2_grpc

from .hypercalls import CallRejected, status_error

CALL_TIMEOUT = 30.0


class Toolstack:
    """`async with Toolstack(target, admin_token) as xl:` then `await xl.create_domain(...)`.
    Without an admin token (a server run with --insecure-no-admin-token) calls carry none."""

    def __init__(self, target: str, admin_token: str | None = None):
        self._channel = grpc.insecure_channel(target)
        self._stub = toolstack_pb2_grpc.ToolstackStub(self._channel)
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()

    async def __aenter__(self) -> "Toolstack":
        return self

    async def __aexit__(self, *exc) -> None:
        self._channel.close()

    async def _call(self, method: str, request):
        rpc = functools.partial(getattr(self._stub, method), request, metadata=self._metadata, timeout=CALL_TIMEOUT)
        try:
            return await trio.to_thread.run_sync(rpc)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None

    async def create_domain(self, nr_pages: int, nr_vcpus: int = 1, name: str = "", highmem_pages: int = 0, max_evtchn_port: int = 0, address_size: int = 64):
        """Build a domain (address_size 32: a PAE guest on the compat ABI); the
        CreateDomainResponse has domid, token and start_info."""
        request = toolstack_pb2.CreateDomainRequest(
            nr_pages=nr_pages, nr_vcpus=nr_vcpus, name=name, highmem_pages=highmem_pages, max_evtchn_port=max_evtchn_port, address_size=address_size
        )
        return await self._call("CreateDomain", request)

    async def destroy_domain(self, domid: int) -> int:
        """Destroy a domain; the number of frames it freed."""
        return (await self._call("DestroyDomain", toolstack_pb2.DestroyDomainRequest(domid=domid))).freed_frames

    async def host_info(self) -> toolstack_pb2.HostInfoResponse:
        return await self._call("HostInfo", toolstack_pb2.HostInfoRequest())

    async def list_domains(self) -> list[toolstack_pb2.Domain]:
        return list((await self._call("ListDomains", toolstack_pb2.ListDomainsRequest())).domains)

    async def domain_info(self, domid: int) -> toolstack_pb2.Domain:
        return (await self._call("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=domid))).domain

    async def vcpu_info(self, domid: int, vcpu: int | None = None) -> list[toolstack_pb2.Vcpu]:
        return list((await self._call("VcpuInfo", toolstack_pb2.VcpuInfoRequest(domid=domid, vcpu=vcpu))).vcpus)

    async def frame_info(self, mfn: int, count: int = 1) -> list[toolstack_pb2.Frame]:
        return list((await self._call("FrameInfo", toolstack_pb2.FrameInfoRequest(mfn=mfn, count=count))).frames)

    async def event_channel_status(self, domid: int) -> list[toolstack_pb2.EventChannelPort]:
        return list((await self._call("EventChannelStatus", toolstack_pb2.EventChannelStatusRequest(domid=domid))).ports)

    async def audit(self, domid: int | None = None) -> list[str]:
        """Every inconsistency the hypervisor finds in its own bookkeeping; [] when healthy."""
        return [f.message for f in (await self._call("Audit", toolstack_pb2.AuditRequest(domid=domid))).findings]

    async def domain_summary(self, domid: int) -> toolstack_pb2.DomainSummaryResponse:
        """Debug key 'q' condensed: the domain's frames by type, its pagetables, validated and pinned."""
        return await self._call("DomainSummary", toolstack_pb2.DomainSummaryRequest(domid=domid))

    async def detach_session(self, domid: int, vcpu: int) -> bool:
        """End the vCPU's Session so another process can claim the vCPU; False if it had none."""
        return (await self._call("DetachSession", toolstack_pb2.DetachSessionRequest(domid=domid, vcpu=vcpu))).detached

    async def stats(self) -> dict[tuple[str, str], int]:
        """{(op, errno name, "ok", or "bug" for a bug of the simulator): count} since the
        hypervisor started."""
        counts = (await self._call("Stats", toolstack_pb2.StatsRequest())).counts
        return {(c.op, _outcome(c)): c.count for c in counts}


def _outcome(count: toolstack_pb2.OpCount) -> str:
    if count.simulator_bug:
        return "bug"
    return common_pb2.XenErrno.Name(count.errno).removeprefix("XEN_ERRNO_") if count.errno else "ok"


def _rpc_error(e: grpc.RpcError) -> Exception:
    """A failed unary call's exception: the google.rpc.Status in its trailers, decoded as for
    a Session call, or CallRejected with its code when it has none."""
    for key, value in e.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_error(status_pb2.Status.FromString(value))
    return CallRejected(e.code(), e.details() or "")
