"""One vCPU's Session stream to the hypervisor, driven from trio through a small thread bridge.

grpcio cannot run under trio (grpc/grpc#25050), so the stream is a sync-stub bidi call: trio
puts each request on a SimpleQueue (never blocks), grpc's own consumer thread pulls it through
the request iterator, and one reader thread of ours iterates the responses and hands each to
trio with `TrioToken.run_sync_soon`, which wakes the task waiting on that request id or queues
a push. This was the cheapest sound bridge measured here (docs/transport.md section 2.1, case 6c
and docs/transport.md section 4); every other piece of the guest stays in trio.
"""

import itertools
import math
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import trio

from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc

# Half-close and cancel both reach the server within a round trip; a reader that outlives this
# is wedged inside grpc and is cancelled (then abandoned: it is a daemon thread).
CLOSE_TIMEOUT = 5.0
# A response of 1024 block reads is just over grpc's default 4 MiB limit.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", -1),)
_HALF_CLOSE = object()


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

    def __init__(self, stub: hypercalls_pb2_grpc.HypercallsStub, metadata, name: str):
        self._token = trio.lowlevel.current_trio_token()
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed: SessionClosed | None = None
        self.system_time_ns = 0
        self._reader_done = trio.Event()
        # Pushes are bounded by the protocol, not by this buffer: the hypervisor masks upcalls
        # until the guest unmasks, and a vCPU is started at most once per VCPUOP_up.
        self._upcalls_in, self.upcalls = trio.open_memory_channel[hypercalls_pb2.Upcall](math.inf)
        self._started_in, self.started = trio.open_memory_channel[hypercalls_pb2.VcpuStarted](math.inf)
        self._call = stub.Session(iter(self._requests.get, _HALF_CLOSE), metadata=metadata)
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
        self._requests.put(hypercalls_pb2.SessionRequest(request_id=request_id, calls=calls, stop_on_error=stop_on_error))
        await waiter.event.wait()
        if waiter.response is None:
            raise SessionClosed(str(self._closed), self._closed.code)
        return waiter.response

    # -- the reader thread and its hand-offs to trio ------------------------------------------

    def _read(self) -> None:
        """Reader thread: hand every response to trio, then how the stream ended."""
        try:
            for response in self._call:
                self._token.run_sync_soon(self._deliver, response)
            end = SessionClosed("the hypervisor ended the Session stream")
        except grpc.RpcError as e:
            end = SessionClosed(f"Session stream failed: {e.code().name}: {e.details()}", e.code())
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
                self._call.cancel()
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
        self._requests.put(_HALF_CLOSE)
        with trio.CancelScope(shield=True):
            if not self._waiters:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()
            if not self._reader_done.is_set():
                self._call.cancel()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._reader_done.wait()


@asynccontextmanager
async def open_session(target: str, token: str, vcpu: int) -> AsyncIterator[Session]:
    """Open vCPU `vcpu`'s Session with the hypervisor at `target` (`host:port`), authenticated
    by the domain's `token`; closes the stream and its channel on exit. Must run inside trio,
    in a process that has not forked since it created any gRPC object."""
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        metadata = (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))
        session = Session(hypercalls_pb2_grpc.HypercallsStub(channel), metadata, name=f"xensim-vcpu{vcpu}-reader")
        try:
            yield session
        finally:
            await session._close()
    finally:
        channel.close()
