"""One vCPU's Session stream to the hypervisor, driven from trio through one helper thread.

grpcio cannot run under trio (grpc/grpc#25050). The stream is grpcio's own single-threaded
call, the one under its unary-stream calls (`segregated_call` of the channel's cygrpc core,
with a completion queue of its own): trio starts each send itself (grpc core takes one
message at a time, so the rest wait in a short backlog that the helper starts as each send
completes), and one helper thread waits on the call's completion queue and hands each answer
to trio with `TrioToken.run_sync_soon`, which wakes the task waiting on that request id or
queues a push. A round trip so wakes two threads (the helper and trio) where the sync stub's
bidi stream wakes four (its request-consumer and channel-spin threads, a reader of ours, and
trio), and its CPU per message is about 1.4-1.6 times a bare grpcio client's against 1.8-2.1
times for that bridge (benchmarks/guest_transport.py, which measures the other bridges too). The price
is grpcio's private `grpc._cython.cygrpc` layer, which tests/guest/test_transport.py checks
on the installed grpcio. Every other piece of the guest stays in trio.
"""

import itertools
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import trio
from grpc import _common
from grpc._cython import cygrpc

from xensim.v1 import hypercalls_pb2

# Half-close and cancel both reach the server within a round trip; a helper that outlives
# this is wedged inside grpc and is cancelled (then abandoned: it is a daemon thread).
CLOSE_TIMEOUT = 5.0
# A response of 1024 block reads is just over grpc's default 4 MiB limit.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)
SESSION = f"/{hypercalls_pb2.DESCRIPTOR.services_by_name['Hypercalls'].full_name}/Session".encode()
_HALF_CLOSE = None


class SessionClosed(Exception):
    """The Session stream has ended; every call waiting on it, and every later one, fails so.

    `code` is the gRPC status the stream ended with (ABORTED when the domain was destroyed,
    UNAVAILABLE when the hypervisor is unreachable), or None when it ended cleanly.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self):
        self.event = trio.Event()
        self.response: hypercalls_pb2.SessionResponse | None = None


class Session:
    """A vCPU's open Session: `exchange` sends one message of calls and waits for its answer;
    server pushes arrive on `upcalls` (Upcall) and `started` (VcpuStarted); `system_time_ns`
    is Xen's system time as of the latest message from the hypervisor.

    Several trio tasks may exchange at once (each request has its own id); the hypervisor runs
    messages in arrival order. Use `open_session` to get one.
    """

    def __init__(self, channel: grpc.Channel, metadata, name: str):
        self._token = trio.lowlevel.current_trio_token()
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._closed: SessionClosed | None = None
        self.system_time_ns = 0
        self._reader_done = trio.Event()
        # Pushes are bounded by the protocol, not by this buffer: the hypervisor masks upcalls
        # until the guest unmasks, and a vCPU is started at most once per VCPUOP_up.
        self._upcalls_in, self.upcalls = trio.open_memory_channel[hypercalls_pb2.Upcall](math.inf)
        self._started_in, self.started = trio.open_memory_channel[hypercalls_pb2.VcpuStarted](math.inf)
        self._lock = threading.Lock()  # guards the send in flight and the backlog
        self._sending = False
        self._backlog: list[bytes | None] = []
        opening = (
            (cygrpc.SendInitialMetadataOperation(metadata, 0),),
            (cygrpc.ReceiveStatusOnClientOperation(0),),
            (cygrpc.ReceiveInitialMetadataOperation(0),),
        )
        self._call = channel._channel.segregated_call(
            cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS, SESSION, None, None, metadata, None, tuple((ops, None) for ops in opening), None, None
        )
        self._receiving = self._call.operate((cygrpc.ReceiveMessageOperation(0),), None)
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    async def exchange(self, calls, stop_on_error: bool = False) -> hypercalls_pb2.SessionResponse:
        """Send `calls` (at most 1024 `Call`s) as one SessionRequest and return its response.

        If the waiting task is cancelled the calls still run (a hypercall cannot be un-sent);
        the answer is dropped when it arrives.
        """
        if self._closed is not None:
            raise SessionClosed(str(self._closed), self._closed.code)
        request_id = next(self._ids)
        waiter = self._waiters[request_id] = _Waiter()
        self._send(hypercalls_pb2.SessionRequest(request_id=request_id, calls=calls, stop_on_error=stop_on_error).SerializeToString())
        await waiter.event.wait()
        if waiter.response is None:
            raise SessionClosed(str(self._closed), self._closed.code)
        return waiter.response

    def _send(self, data: bytes | None) -> None:
        """Start sending `data` (None: half-close) now, or after the send in flight."""
        with self._lock:
            if self._sending:
                self._backlog.append(data)
                return
            self._sending = True
        self._start(data)

    def _start(self, data: bytes | None) -> None:
        operation = cygrpc.SendCloseFromClientOperation(0) if data is _HALF_CLOSE else cygrpc.SendMessageOperation(data, 0)
        self._call.operate((operation,), None)  # refused once the call has ended: nothing to do

    def _cancel(self) -> None:
        code = grpc.StatusCode.CANCELLED
        self._call.cancel(_common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[code], "the guest cancelled its Session")

    # -- the helper thread and its hand-offs to trio ------------------------------------------

    def _read(self) -> None:
        """Helper thread: run the call's completion queue until the stream's status has come
        and no receive is left outstanding; hand every answer to trio, then how it ended."""
        end = None
        while end is None or self._receiving:
            event = self._call.next_event()
            for operation in event.batch_operations:
                kind = operation.type()
                if kind == cygrpc.OperationType.receive_message:
                    self._receiving = False
                    data = operation.message()
                    if data is not None:
                        self._token.run_sync_soon(self._deliver, hypercalls_pb2.SessionResponse.FromString(data))
                        self._receiving = self._call.operate((cygrpc.ReceiveMessageOperation(0),), None)
                elif kind in (cygrpc.OperationType.send_message, cygrpc.OperationType.send_close_from_client):
                    with self._lock:
                        more = self._sending = bool(self._backlog)
                        data = self._backlog.pop(0) if more else None
                    if more:
                        self._start(data)
                elif kind == cygrpc.OperationType.receive_status_on_client:
                    end = _ended(operation)
        self._token.run_sync_soon(self._finish, end)

    def _deliver(self, response: hypercalls_pb2.SessionResponse) -> None:
        if self._closed is not None:  # after a protocol violation: the rest is noise
            return
        self.system_time_ns = max(self.system_time_ns, response.system_time_ns)
        push = response.WhichOneof("push")
        if push == "upcall":
            self._upcalls_in.send_nowait(response.upcall)
        elif push == "started":
            self._started_in.send_nowait(response.started)
        else:
            waiter = self._waiters.pop(response.request_id, None)
            if waiter is None:
                self._finish(SessionClosed(f"protocol violation: an answer to request {response.request_id}, which was never sent"))
                self._cancel()
                return
            waiter.response = response
            waiter.event.set()

    def _finish(self, end: SessionClosed) -> None:
        """The stream is over: fail every waiter and end the push channels."""
        if self._closed is None:
            self._closed = end
        for waiter in self._waiters.values():
            waiter.event.set()
        self._waiters.clear()
        self._upcalls_in.close()
        self._started_in.close()
        self._reader_done.set()

    async def _close(self) -> None:
        """Half-close and let the hypervisor end the stream; cancel it at once if answers are
        still owed to cancelled tasks (a blocked SCHEDOP_block may never answer), or if the
        graceful end takes longer than CLOSE_TIMEOUT."""
        self._send(_HALF_CLOSE)
        with trio.CancelScope(shield=True):
            if not self._waiters:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()
            if not self._reader_done.is_set():
                self._cancel()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()


def _ended(status) -> SessionClosed:
    """How the stream ended, from its ReceiveStatusOnClient operation."""
    code = _common.CYGRPC_STATUS_CODE_TO_STATUS_CODE.get(status.code(), grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.OK:
        return SessionClosed("the hypervisor ended the Session stream")
    return SessionClosed(f"Session stream failed: {code.name}: {status.details()}", code)


@asynccontextmanager
async def open_session(target: str, token: str, vcpu: int) -> AsyncIterator[Session]:
    """Open vCPU `vcpu`'s Session with the hypervisor at `target` (`host:port`), authenticated
    by the domain's `token`; closes the stream and its channel on exit. Must run inside trio,
    in a process that has not forked since it created any gRPC object."""
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        metadata = (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))
        session = Session(channel, metadata, name=f"xensim-vcpu{vcpu}-reader")
        try:
            yield session
        finally:
            await session._close()
    finally:
        channel.close()
