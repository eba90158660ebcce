"""The Hypercalls service: the Session stream and its unary mirrors, one code path for both.

Every call, whether a unary RPC, one call of a Session message or (inside the core) a
multicall entry, goes through `convert.CALLS`: request -> core op and arguments -> core
result -> response. `execute` runs one such call for the authenticated vCPU, filling its
response message in place (the unary RPC's, or the Session's CallResult's), or returns the
google.rpc.Status it failed with; a unary RPC fails with that status, a Session puts it in
the call's CallResult and carries on.
"""

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2

from hypervisor.core import VcpuNotRunning, XenError
from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc

from . import convert
from .auth import Tokens
from .errors import BadRequest, PeerGone, abort, abort_with, status_of
from .vcpus import Later, Runtime, Stream, VcpuSlot

# A call's outcome: False (done), True (done, but a memory access that faulted, which
# stop_on_error treats as a failure too), or the status it failed with.
Outcome = bool | status_pb2.Status


class HypercallsServicer(hypercalls_pb2_grpc.HypercallsServicer):
    """Authenticates the vCPU, converts, and hands the call to the runtime; nothing else.

    The unary methods (MmuUpdate, ..., Echo) are added below from the service descriptor, one
    per Call case, all running `_unary`.
    """

    def __init__(self, runtime: Runtime, tokens: Tokens):
        self.runtime = runtime
        self.tokens = tokens

    def _caller(self, context: grpc.aio.ServicerContext) -> VcpuSlot:
        domid, vcpu_id = self.tokens.guest(context.invocation_metadata(), self.runtime.hv.domains)
        return self.runtime.slot(domid, vcpu_id)

    def execute(self, slot: VcpuSlot, case: str, request: Message, path: str, out: Message) -> Outcome:
        """Run one call of `slot`'s vCPU into `out`, its case's response message (filled in
        place); `path` prefixes field names in BadRequest. Later if the call has to wait."""
        op = convert.CALLS[case]
        try:
            args = op.args(request, path, self.runtime)
            if op.name is None:
                result = None
            else:
                result = self.runtime.call(slot, op.name, args)
                if isinstance(result, Later):
                    return Later(self._finish(op, result, args, out))
        except (XenError, VcpuNotRunning, BadRequest) as exc:
            return status_of(exc, op.name or case)
        convert.fill(op, out, result, args)
        return convert.faulted(result)

    async def _finish(self, op: convert.Op, later: Later, args: dict, out: Message) -> Outcome:
        """`execute` for a call that had to wait."""
        try:
            result = await later
        except (XenError, VcpuNotRunning) as exc:
            return status_of(exc, op.name)
        convert.fill(op, out, result, args)
        return convert.faulted(result)

    async def _unary(self, case: str, request: Message, context: grpc.aio.ServicerContext) -> Message:
        try:
            slot = self._caller(context)
            response = _RESPONSE[case]()
            with self.runtime.guard(slot.domid):
                async with slot.lock:
                    outcome = self.execute(slot, case, request, "", response)
                    if isinstance(outcome, Later):
                        outcome = await outcome
            if slot.stream is not None:
                slot.stream.attention.set()  # the call may have made an upcall deliverable
        except Exception as exc:  # noqa: BLE001 - errors.status_of is the one mapping, INTERNAL included
            await abort(context, exc, case)
        if isinstance(outcome, status_pb2.Status):
            await abort_with(context, outcome)
        return response

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        try:
            slot = self._caller(context)
            with self.runtime.guard(slot.domid):
                stream = self.runtime.attach(slot, context)
                try:
                    await self._serve(stream, context)
                finally:
                    self.runtime.detach(stream)
                    await stream.close()
        except PeerGone:  # the vCPU's process died while its answer was being sent
            return
        except Exception as exc:  # noqa: BLE001 - as in _unary
            await abort(context, exc, "session")

    async def _serve(self, stream: Stream, context: grpc.aio.ServicerContext) -> None:
        """Messages one at a time, in arrival order; each answer goes out before the next read.
        A call that is over at once (most are) costs no coroutine of its own."""
        slot = stream.slot
        while (request := await context.read()) is not grpc.aio.EOF:
            if request.request_id == 0:
                raise BadRequest("request_id", "0 is reserved for server pushes; number requests from 1")
            response = hypercalls_pb2.SessionResponse(request_id=request.request_id)
            gate = self.runtime.gate  # a controlled run: the message is a step (schedule.py)
            stepped = gate is not None and await gate.turn(slot, killable=True)
            if not 1 <= len(request.calls) <= convert.MAX_SESSION_CALLS:
                bad = BadRequest("calls", f"{len(request.calls)} calls; 1 to {convert.MAX_SESSION_CALLS} per message")
                response.status.CopyFrom(status_of(bad, "session"))
            else:
                await slot.lock.acquire()  # not `async with`: two coroutines fewer a message
                try:
                    for i, call in enumerate(request.calls):
                        result = response.results.add()
                        case = call.WhichOneof("call")
                        if case is None:
                            outcome = status_of(BadRequest(f"calls[{i}].call", "no call set"), "session")
                        else:
                            outcome = self.execute(slot, case, getattr(call, case), f"calls[{i}].{case}.", getattr(result, case))
                            if isinstance(outcome, Later):
                                outcome = await outcome
                        if isinstance(outcome, status_pb2.Status):
                            result.status.CopyFrom(outcome)
                        if outcome is not False and request.stop_on_error:
                            break
                finally:
                    slot.lock.release()
                self.runtime.end_orphan(stream.task)  # its process died during it: no answer, the Session ends
            await stream.write(response)
            if stepped:  # a message that raises ends its Session, whose detach ends the step
                gate.done(slot)


def _unary_method(case: str):
    async def method(self: HypercallsServicer, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return await self._unary(case, request, context)

    return method


_RESPONSE = {f.name: message_factory.GetMessageClass(f.message_type) for f in hypercalls_pb2.CallResult.DESCRIPTOR.oneofs_by_name["result"].fields if f.name != "status"}
_CASE_OF_REQUEST = {f.message_type.full_name: f.name for f in hypercalls_pb2.Call.DESCRIPTOR.oneofs_by_name["call"].fields}
for _method in hypercalls_pb2.DESCRIPTOR.services_by_name["Hypercalls"].methods:
    if not _method.client_streaming:
        setattr(HypercallsServicer, _method.name, _unary_method(_CASE_OF_REQUEST[_method.input_type.full_name]))
