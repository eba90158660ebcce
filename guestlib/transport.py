"""One vCPU's Session stream to the hypervisor, driven from trio through one helper thread.

grpcio cannot run under trio (grpc/grpc#25050), so a thread of ours carries the stream's
completions to trio with `TrioToken.run_sync_soon`, which wakes the task waiting on that request
id or queues a push; every other piece of the guest stays in trio (docs/transport.md section 4).

Two ways to drive the stream, the faster chosen at import (docs/transport.md section 6):
- `_SegregatedStream`: grpcio's single-threaded "segregated call" (the machinery under its own
  blocking calls): trio starts each send on the call itself, and our one thread waits on the
  call's own completion queue. Two thread wake-ups per round trip. It is reached through
  grpcio's private `grpc._cython.cygrpc` layer, so it is used only when that layer has exactly
  the shape written against (`SEGREGATED`); grpcio is pinned to the tested range and
  tests/guest/test_transport.py fails if the pinned grpcio does not take this path.
- `_BridgedStream`: the public sync-stub bidi stream: grpc's consumer thread drains a queue of
  requests, grpc's channel thread completes them, our reader thread iterates the responses.
  Four wake-ups per round trip; the fallback when the private layer has changed.
"""

import inspect
import itertools
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import grpc
import trio

from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc

# Half-close and cancel both reach the server within a round trip; a reader that outlives this
# is wedged inside grpc and is cancelled (then abandoned: it is a daemon thread).
CLOSE_TIMEOUT = 5.0
# A response of 1024 block reads is just over grpc's default 4 MiB limit.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)
SESSION_METHOD = b"/xensim.v1.Hypercalls/Session"
_HALF_CLOSE = object()
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

# The private grpcio API `_SegregatedStream` is written against, signature by signature.
_SEGREGATED_SHAPE = {
    "Channel.segregated_call": "(self, flags, method, host, deadline, metadata, credentials, operationses_and_tags, context=None, registered_call_handle=None)",
    "SegregatedCall.operate": "(self, operations, tag)",
    "SegregatedCall.next_event": "(self)",
    "SegregatedCall.cancel": "(self, code, details)",
}
_SEGREGATED_NAMES = (
    "SendInitialMetadataOperation", "SendMessageOperation", "SendCloseFromClientOperation",
    "ReceiveInitialMetadataOperation", "ReceiveMessageOperation", "ReceiveStatusOnClientOperation",
    "PropagationConstants", "OperationType", "StatusCode",
)  # fmt: skip


def _segregated_api():
    """grpcio's cygrpc module if its segregated call has exactly the shape used here, else None."""
    try:
        from grpc._cython import cygrpc

        for name, signature in _SEGREGATED_SHAPE.items():
            owner, method = name.split(".")
            if str(inspect.signature(getattr(getattr(cygrpc, owner), method))) != signature:
                return None
        kinds = cygrpc.OperationType
        if not all(hasattr(cygrpc, name) for name in _SEGREGATED_NAMES) or not all(
            hasattr(kinds, kind) for kind in ("receive_message", "receive_status_on_client", "send_message", "send_close_from_client")
        ):
            return None
        cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS  # noqa: B018 (the check is that it exists)
        return cygrpc
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


_CYGRPC = _segregated_api()
SEGREGATED = _CYGRPC is not None


class SessionClosed(Exception):
    """The Session stream has ended; every call waiting on it, and every later one, fails so.

    `code` is the gRPC status the stream ended with (ABORTED when the domain was destroyed,
    UNAVAILABLE when the hypervisor is unreachable), or None when it ended cleanly.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def _ended(code: grpc.StatusCode, details: str | None) -> SessionClosed:
    if code is grpc.StatusCode.OK:
        return SessionClosed("the hypervisor ended the Session stream")
    return SessionClosed(f"Session stream failed: {code.name}: {details}", code)


class _BridgedStream:
    """The public sync-stub bidi stream with a reader thread (module docstring)."""

    def __init__(self, channel: grpc.Channel, metadata, name: str, deliver: Callable, finish: Callable):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = hypercalls_pb2_grpc.HypercallsStub(channel).Session(iter(self._requests.get, _HALF_CLOSE), metadata=metadata)
        self._deliver, self._finish = deliver, finish
        threading.Thread(target=self._read, name=name, daemon=True).start()

    def send(self, request: hypercalls_pb2.SessionRequest) -> None:
        self._requests.put(request)

    def half_close(self) -> None:
        self._requests.put(_HALF_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._deliver(response)
            end = _ended(grpc.StatusCode.OK, None)
        except grpc.RpcError as e:
            end = _ended(e.code(), e.details())
        self._finish(end)


class _SegregatedStream:
    """grpcio's segregated call, one thread on its completion queue (module docstring).

    grpc core allows one send in flight per call: a send started while one is in flight waits in
    `_backlog` and the thread starts it when the previous one completes. The call's completion
    queue is destroyed by grpcio once no batch is due, so `_due` counts the batches started
    (under `_lock`, with each start) and the thread stops polling when it reaches 0.
    """

    def __init__(self, channel: grpc.Channel, metadata, name: str, deliver: Callable, finish: Callable):
        c = _CYGRPC
        self._deliver, self._finish = deliver, finish
        batches = (c.SendInitialMetadataOperation(metadata, 0),), (c.ReceiveInitialMetadataOperation(0),), (c.ReceiveStatusOnClientOperation(0),)
        self._call = channel._channel.segregated_call(
            c.PropagationConstants.GRPC_PROPAGATE_DEFAULTS, SESSION_METHOD, None, None, metadata, None, tuple((ops, None) for ops in batches)
        )
        self._lock = threading.Lock()
        self._due = len(batches)
        self._sending = False
        self._backlog: list = []
        self._operate((c.ReceiveMessageOperation(0),))
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _operate(self, operations: tuple) -> None:
        with self._lock:
            self._due += self._call.operate(operations, None)  # False once the call is over

    def _send_operation(self, request):
        if request is _HALF_CLOSE:
            return _CYGRPC.SendCloseFromClientOperation(0)
        return _CYGRPC.SendMessageOperation(request.SerializeToString(), 0)

    def send(self, request) -> None:
        with self._lock:
            if self._sending:
                self._backlog.append(request)
                return
            self._sending = True
        self._operate((self._send_operation(request),))

    def half_close(self) -> None:
        self.send(_HALF_CLOSE)

    def cancel(self) -> None:
        self._call.cancel(_CYGRPC.StatusCode.cancelled, "cancelled by the guest")

    def _run(self) -> None:
        kinds = _CYGRPC.OperationType
        end = SessionClosed("the hypervisor ended the Session stream")
        try:
            while self._due:
                event = self._call.next_event()
                with self._lock:
                    self._due -= 1
                for op in event.batch_operations:
                    kind = op.type()
                    if kind == kinds.receive_message:
                        data = op.message()
                        if data is not None:  # the next receive is started before trio wakes to send
                            self._operate((_CYGRPC.ReceiveMessageOperation(0),))
                            self._deliver(hypercalls_pb2.SessionResponse.FromString(data))
                    elif kind == kinds.receive_status_on_client:
                        end = _ended(_STATUS_CODES[op.code()], op.details())
                    elif kind in (kinds.send_message, kinds.send_close_from_client):
                        with self._lock:
                            self._sending = bool(self._backlog)
                            request = self._backlog.pop(0) if self._sending else None
                        if request is not None:
                            self._operate((self._send_operation(request),))
        except Exception as e:  # grpcio's internals failed us: end the Session, never hang it
            self._finish(SessionClosed(f"Session stream failed: the guest's transport broke: {e!r}", grpc.StatusCode.INTERNAL))
            self.cancel()
            raise
        self._finish(end)


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self):
        self.event = trio.Event()
        self.response: hypercalls_pb2.SessionResponse | None = None


class Session:
    """A vCPU's open Session: `exchange` sends one message of calls and waits for its answer;
    server pushes arrive on `upcalls` (Upcall) and `started` (VcpuStarted); `system_time_ns`
    is Xen's system time as of the latest message from the hypervisor. `segregated=False`
    takes the public bridge even where grpcio's segregated call is usable.

    Several trio tasks may exchange at once (each request has its own id); the hypervisor runs
    messages in arrival order. Use `open_session` to get one.
    """

    def __init__(self, channel: grpc.Channel, metadata, name: str, segregated: bool = True):
        token = trio.lowlevel.current_trio_token()
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._closed: SessionClosed | None = None
        self.system_time_ns = 0
        self._reader_done = trio.Event()
        # Pushes are bounded by the protocol, not by this buffer: the hypervisor masks upcalls
        # until the guest unmasks, and a vCPU is started at most once per VCPUOP_up.
        self._upcalls_in, self.upcalls = trio.open_memory_channel[hypercalls_pb2.Upcall](math.inf)
        self._started_in, self.started = trio.open_memory_channel[hypercalls_pb2.VcpuStarted](math.inf)
        segregated = segregated and SEGREGATED and isinstance(getattr(channel, "_channel", None), _CYGRPC.Channel)
        stream = _SegregatedStream if segregated else _BridgedStream
        self._stream = stream(channel, metadata, name, partial(token.run_sync_soon, self._deliver), partial(token.run_sync_soon, self._finish))

    async def exchange(self, calls, stop_on_error: bool = False) -> hypercalls_pb2.SessionResponse:
        """Send `calls` (at most 1024 `Call`s) as one SessionRequest and return its response.

        If the waiting task is cancelled the calls still run (a hypercall cannot be un-sent);
        the answer is dropped when it arrives.
        """
        if self._closed is not None:
            raise SessionClosed(str(self._closed), self._closed.code)
        request_id = next(self._ids)
        waiter = self._waiters[request_id] = _Waiter()
        self._stream.send(hypercalls_pb2.SessionRequest(request_id=request_id, calls=calls, stop_on_error=stop_on_error))
        await waiter.event.wait()
        if waiter.response is None:
            raise SessionClosed(str(self._closed), self._closed.code)
        return waiter.response

    # -- what the stream's thread hands to trio -----------------------------------------------

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
                self._stream.cancel()
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
        self._stream.half_close()
        with trio.CancelScope(shield=True):
            if not self._waiters:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()
            if not self._reader_done.is_set():
                self._stream.cancel()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()


@asynccontextmanager
async def open_session(target: str, token: str, vcpu: int, segregated: bool = True) -> AsyncIterator[Session]:
    """Open vCPU `vcpu`'s Session with the hypervisor at `target` (`host:port`), authenticated
    by the domain's `token`; closes the stream and its channel on exit. Must run inside trio,
    in a process that has not forked since it created any gRPC object. The stream is grpcio's
    segregated call where `SEGREGATED` allows it, unless `segregated` is False: then the public bridge."""
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        metadata = (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))
        session = Session(channel, metadata, name=f"xensim-vcpu{vcpu}-stream", segregated=segregated)
        try:
            yield session
        finally:
            await session._close()
    finally:
        channel.close()
