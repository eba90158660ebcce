"""A guest driven over the wire, as a test writes it: a domain created through the Toolstack,
its frames found through its own P2M list, and tables built with the Hypercalls RPCs; plus a
blocking Session client and decoders for the error details.
"""

import queue
import threading

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from xensim.v1 import common_pb2, hypercalls_pb2, memory_pb2, toolstack_pb2

P, RW, US, A, D = 0x1, 0x2, 0x4, 0x20, 0x40
VGCF_in_kernel = 4
PIN = {1: common_pb2.MMUEXT_CMD_PIN_L1_TABLE, 4: common_pb2.MMUEXT_CMD_PIN_L4_TABLE}


class WireGuest:
    """One domain of a running server, called as vCPU `vcpu` with its own token."""

    def __init__(self, server, nr_pages: int = 2048, nr_vcpus: int = 2, **kw):
        self.server = server
        created = server.create_domain(nr_pages=nr_pages, nr_vcpus=nr_vcpus, **kw)
        self.domid, self.token, self.start_info = created.domid, created.token, created.start_info
        self.hc = server.hypercalls()
        self.ts = server.toolstack()
        self.next_pfn = self.start_info.first_free_pfn
        # A 32-bit PAE guest's P2M holds u32 mfns, and its boot tables are the L3, one L2,
        # then the L1s (docs/pv32.md section 4).
        self.pv32 = self.start_info.magic == "xen-3.0-x86_32p"
        self.p2m_entry = 4 if self.pv32 else 8

    def md(self, vcpu: int = 0):
        return self.server.guest_metadata(self.token, vcpu)

    def call(self, rpc: str, request, vcpu: int = 0):
        return getattr(self.hc, rpc)(request, metadata=self.md(vcpu), timeout=10)

    def toolstack(self, rpc: str, request):
        return getattr(self.ts, rpc)(request, metadata=self.server.toolstack_metadata(), timeout=10)

    def bring_up(self, vcpu: int) -> None:
        """Start a secondary vCPU from vCPU 0, as Linux's cpu_up does: VCPUOP_initialise in
        kernel mode on the boot page table, then VCPUOP_up. Only a running vCPU makes calls."""
        context = hypercalls_pb2.VcpuGuestContext(flags=VGCF_in_kernel, kernel_cr3_mfn=self.start_info.pt_base_mfn)
        self.call("VcpuOp", hypercalls_pb2.VcpuOpRequest(vcpuid=vcpu, initialise=hypercalls_pb2.VcpuInitialise(context=context)))
        self.call("VcpuOp", hypercalls_pb2.VcpuOpRequest(vcpuid=vcpu, up=hypercalls_pb2.VcpuUp()))

    # -- memory, found the way a guest finds it ---------------------------------------------------

    def mfn(self, pfn: int) -> int:
        """The P2M list entry for pfn, read through the kernel's mapping of it."""
        return self.call("Load", memory_pb2.LoadRequest(va=self.start_info.mfn_list + self.p2m_entry * pfn, size=self.p2m_entry)).value

    def alloc(self) -> tuple[int, int]:
        pfn = self.next_pfn
        self.next_pfn += 1
        return pfn, self.mfn(pfn)

    def direct_va(self, pfn: int) -> int:
        return self.start_info.page_offset + (pfn << 12)

    def direct_l1(self, pfn: int) -> tuple[int, int]:
        """(mfn of the boot L1 that maps pfn in the direct map, slot): the builder lays out
        the L4, one L3, the L2s, then the L1s (common.proto StartInfo)."""
        nr_l1 = -(-self.start_info.nr_lowmem_pages // 512)
        pt_base_pfn = (self.start_info.pt_base - self.start_info.page_offset) >> 12
        return self.mfn(pt_base_pfn + (1 if self.pv32 else 2) + -(-nr_l1 // 512) + pfn // 512), pfn % 512

    def frame(self, mfn: int) -> toolstack_pb2.Frame:
        return self.toolstack("FrameInfo", toolstack_pb2.FrameInfoRequest(mfn=mfn)).frames[0]

    def frame_runs(self, vcpu: int = 0) -> list[tuple[int, int]]:
        """Every frame the domain owns (its P2M, read through its direct map, and its shared-info
        frame) as (first mfn, count) runs, for FrameInfo."""
        entry = self.p2m_entry
        size, base = entry * self.start_info.nr_pages, self.start_info.mfn_list
        p2m = b"".join(self.call("Read", memory_pb2.ReadRequest(va=base + at, length=min(4096, size - at)), vcpu).data for at in range(0, size, 4096))
        mfns = sorted([int.from_bytes(p2m[i : i + entry], "little") for i in range(0, len(p2m), entry)] + [self.start_info.shared_info >> 12])
        runs: list[list[int]] = []
        for mfn in mfns:
            if runs and mfn == runs[-1][0] + runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([mfn, 1])
        return [(first, count) for first, count in runs]

    def frames(self, runs: list[tuple[int, int]]) -> list[toolstack_pb2.FrameInfoResponse]:
        return [self.toolstack("FrameInfo", toolstack_pb2.FrameInfoRequest(mfn=first, count=count)) for first, count in runs]

    # -- hypercalls -------------------------------------------------------------------------------

    def mmu_update(self, *reqs: tuple[int, int], vcpu: int = 0):
        return self.call("MmuUpdate", hypercalls_pb2.MmuUpdateRequest(reqs=[hypercalls_pb2.MmuUpdate(ptr=p, val=v) for p, v in reqs]), vcpu)

    def mmuext(self, *ops: tuple, vcpu: int = 0):
        return self.call("MmuextOp", hypercalls_pb2.MmuextOpRequest(ops=[hypercalls_pb2.MmuextOp(cmd=c, arg1=a1) for c, a1 in ops]), vcpu)

    def make_readonly(self, pfn: int, mfn: int, vcpu: int = 0) -> None:
        """Drop the direct map's write access to pfn, as a guest does before pinning it."""
        request = hypercalls_pb2.UpdateVaMappingRequest(va=self.direct_va(pfn), val=(mfn << 12) | P | A | D, flags=2)
        self.call("UpdateVaMapping", request, vcpu)

    def pinned_table(self, level: int, entries: dict[int, int] | None = None) -> tuple[int, int]:
        """A fresh page written as a table while still plain memory (MmuUpdate), made
        read-only in the direct map, then pinned at `level`. Returns (pfn, mfn)."""
        pfn, mfn = self.alloc()
        if entries:
            self.mmu_update(*(((mfn << 12) + 8 * i, value) for i, value in entries.items()))
        self.make_readonly(pfn, mfn)
        self.mmuext((PIN[level], mfn))
        return pfn, mfn


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status in {error}"
    return status


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info), detail
    return info


def field_violation(status: status_pb2.Status) -> error_details_pb2.BadRequest.FieldViolation:
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad), detail
    (violation,) = bad.field_violations
    return violation


class SessionClient:
    """A vCPU's Session driven from a test: `send` a message, `next` the next message that
    arrives (answer or push), `answer` the next answer (collecting pushes on the way). The
    stream's end is None (clean) or the RpcError it ended with."""

    def __init__(self, stub, metadata):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._arrived: queue.Queue = queue.Queue()
        self.call = stub.Session(iter(self._requests.get, None), metadata=metadata)
        self.pushes: list[hypercalls_pb2.SessionResponse] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._arrived.put(response)
        except grpc.RpcError as e:
            self._arrived.put(e)
        else:
            self._arrived.put(None)

    def send(self, request_id: int, *calls: hypercalls_pb2.Call, stop_on_error: bool = False) -> None:
        self._requests.put(hypercalls_pb2.SessionRequest(request_id=request_id, calls=calls, stop_on_error=stop_on_error))

    def next(self, timeout: float = 10):
        return self._arrived.get(timeout=timeout)

    def answer(self, timeout: float = 10) -> hypercalls_pb2.SessionResponse:
        while True:
            message = self.next(timeout)
            assert isinstance(message, hypercalls_pb2.SessionResponse), message
            if message.request_id:
                return message
            self.pushes.append(message)

    def push(self, timeout: float = 10) -> hypercalls_pb2.SessionResponse:
        if self.pushes:
            return self.pushes.pop(0)
        message = self.next(timeout)
        assert isinstance(message, hypercalls_pb2.SessionResponse) and message.request_id == 0, message
        return message

    def end(self, timeout: float = 10):
        """Wait for the stream's end, skipping messages; returns None or the RpcError."""
        while True:
            message = self.next(timeout)
            if not isinstance(message, hypercalls_pb2.SessionResponse):
                return message

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
