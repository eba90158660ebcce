"""A stand-in for a Session, for unit tests of guestlib's own logic (no server, no thread).

It answers each message in order like the hypervisor does: flat guest memory for loads,
stores, atomics and block accesses (unmapped addresses fault), canned answers or Xen errors
for hypercalls, stop_on_error, and a log of every message, so tests can count round trips.
"""

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from guestlib.xen import Errno
from xensim.v1 import hypercalls_pb2, memory_pb2

FAILED_PRECONDITION = 9


def xen_status(errno: Errno, message: str, hypercall: str, index: int | None = None, done: int | None = None) -> status_pb2.Status:
    """The google.rpc.Status the contract puts on a call Xen refused (common.proto)."""
    metadata = {"errno": str(errno.value), "hypercall": hypercall}
    if index is not None:
        metadata.update(index=str(index), done=str(done))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=errno.name, domain="xen", metadata=metadata))
    return status_pb2.Status(code=FAILED_PRECONDITION, message=f"{errno.name} ({errno.value}): {message}", details=[detail])


def _failed(result: hypercalls_pb2.CallResult) -> bool:
    """What stops a stop_on_error message: an error status or a page fault."""
    if result.HasField("status"):
        return True
    return any(field.name == "fault" for field, _ in getattr(result, result.WhichOneof("result")).ListFields())


class FakeSession:
    """`mapped` is the set of page-aligned VAs that translate; `answers[kind](request)` returns
    the response message or a Status (default: an empty response)."""

    def __init__(self, mapped=(), answers=None):
        self.mapped = set(mapped)
        self.memory: dict[int, int] = {}  # byte address -> byte
        self.answers = answers or {}
        self.messages: list[list[hypercalls_pb2.Call]] = []

    async def exchange(self, calls, stop_on_error=False) -> hypercalls_pb2.SessionResponse:
        calls = list(calls)
        self.messages.append(calls)
        results = []
        for call in calls:
            result = self.run(call)
            results.append(result)
            if stop_on_error and _failed(result):
                break
        return hypercalls_pb2.SessionResponse(request_id=len(self.messages), results=results)

    def run(self, call: hypercalls_pb2.Call) -> hypercalls_pb2.CallResult:
        kind = call.WhichOneof("call")
        request = getattr(call, kind)
        if kind == "multicall":
            entries = (hypercalls_pb2.Call(**{e.WhichOneof("call"): getattr(e, e.WhichOneof("call"))}) for e in request.entries)
            return hypercalls_pb2.CallResult(multicall={"results": [self.run(entry) for entry in entries]})
        memory = getattr(self, f"_{kind}", None)
        answer = memory(request) if memory else self.answers.get(kind, lambda r: None)(request)
        if isinstance(answer, status_pb2.Status):
            return hypercalls_pb2.CallResult(status=answer)
        return hypercalls_pb2.CallResult(**{kind: answer if answer is not None else {}})

    # -- flat memory ----------------------------------------------------------------------------

    def peek(self, va: int, size: int = 8) -> int:
        return int.from_bytes(bytes(self.memory.get(va + i, 0) for i in range(size)), "little")

    def poke(self, va: int, value: int, size: int = 8) -> None:
        for i, byte in enumerate(value.to_bytes(size, "little")):
            self.memory[va + i] = byte

    def _fault(self, va: int, write: bool):
        if va & ~0xFFF not in self.mapped:
            return {"address": va, "error_code": 2 if write else 0, "detail": "not mapped"}
        return None

    def _load(self, r):
        fault = self._fault(r.va, False)
        return memory_pb2.LoadResponse(fault=fault) if fault else memory_pb2.LoadResponse(value=self.peek(r.va, r.size))

    def _store(self, r):
        fault = self._fault(r.va, True)
        if not fault:
            self.poke(r.va, r.value, r.size)
        return memory_pb2.StoreResponse(fault=fault)

    def _atomic(self, r):
        fault = self._fault(r.va, True)
        if fault:
            return memory_pb2.AtomicResponse(fault=fault)
        old = self.peek(r.va, r.size)
        new = {
            memory_pb2.ATOMIC_OP_XCHG: r.operand,
            memory_pb2.ATOMIC_OP_FETCH_AND: old & r.operand,
            memory_pb2.ATOMIC_OP_FETCH_OR: old | r.operand,
            memory_pb2.ATOMIC_OP_FETCH_ADD: (old + r.operand) % (1 << 8 * r.size),
            memory_pb2.ATOMIC_OP_CMPXCHG: r.operand if old == r.expected else old,
        }[r.op]
        self.poke(r.va, new, r.size)
        return memory_pb2.AtomicResponse(old=old)

    def _read(self, r):
        fault = self._fault(r.va, False)
        data = bytes(self.memory.get(r.va + i, 0) for i in range(r.length))
        return memory_pb2.ReadResponse(fault=fault) if fault else memory_pb2.ReadResponse(data=data)

    def _write(self, r):
        fault = self._fault(r.va, True)
        if not fault:
            for i, byte in enumerate(r.data):
                self.memory[r.va + i] = byte
        return memory_pb2.WriteResponse(fault=fault)

    def _echo(self, r):
        return hypercalls_pb2.EchoResponse(payload=r.payload)
