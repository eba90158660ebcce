"""The server's services in this test's process, for tests that must reach into the core.

Most server tests run `python -m hypervisor serve` (tests/support/server.py), where nothing
but the wire reaches the model. A test of what the server does when the core finds a bug of
its own (which no guest can cause, so no wire call can either) needs to break the model first:
`embedded_server()` runs the same servicers over loopback on an asyncio loop in a thread, and
`core(fn)` runs `fn(hv)` on that loop, between two calls, as the hypervisor lock requires.
"""

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

from hypervisor.core import Hypervisor
from hypervisor.server.auth import Tokens
from hypervisor.server.errors import Refused
from hypervisor.server.hypercalls import HypercallsServicer
from hypervisor.server.toolstack import ToolstackServicer
from hypervisor.server.tracing import Tracing
from hypervisor.server.vcpus import Runtime
from xensim.v1 import hypercalls_pb2_grpc, toolstack_pb2_grpc

from .server import TEST_FRAMES, ServerClient

T = TypeVar("T")
TIMEOUT = 10.0


class EmbeddedServer(ServerClient):
    """A server without an admin token whose core the test can reach through `core`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, frames: int):
        self.loop = loop
        self.hv, self.runtime, self.server, port = self._run(self._start(frames))
        super().__init__(f"127.0.0.1:{port}")

    async def _start(self, frames: int):
        hv = Hypervisor(nr_frames=frames)
        runtime = Runtime(hv)
        tokens = Tokens(None)
        server = grpc.aio.server()
        hypercalls_pb2_grpc.add_HypercallsServicer_to_server(HypercallsServicer(runtime, tokens), server)
        toolstack_pb2_grpc.add_ToolstackServicer_to_server(ToolstackServicer(runtime, tokens, Tracing(hv)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return hv, runtime, server, port

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def core(self, fn: Callable[[Hypervisor], T]) -> T:
        """`fn(hv)` on the server's loop, where no call is half-way through the core."""

        async def call() -> T:
            return fn(self.hv)

        return self._run(call())

    def stop(self) -> None:
        self.close_channels()

        async def stop() -> None:
            self.runtime.end_all(Refused(grpc.StatusCode.UNAVAILABLE, "server shutting down"))
            await self.server.stop(1)

        self._run(stop())


@contextmanager
def embedded_server(frames: int = TEST_FRAMES) -> Iterator[EmbeddedServer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="embedded-server", daemon=True)
    thread.start()
    try:
        server = EmbeddedServer(loop, frames)
        try:
            yield server
        finally:
            server.stop()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
