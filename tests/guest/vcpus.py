"""vCPU worker processes for end-to-end tests: both ends of a line-per-command pipe.

Each vCPU is its own OS process (`python -m tests.guest.vcpus ADDRESS TOKEN VCPU`) holding its
own Session, as the design asks; the test is the guest kernel's brain and tells each vCPU what
to do next over stdin, one JSON command per line, and reads one JSON reply per command. That
makes every cross-vCPU interleaving explicit: a step starts only when the test says so.

Commands: {"call": method, "args", "kwargs"} runs a HypercallClient method; {"submit":
[[method, args, kwargs], ...], "stop_on_error"} runs Ops in one message; {"do": step, ...} runs
one of the worker's steps below. A reply is {"value": ...} or {"error": ...}; a XenError
crosses the pipe with its errno, message, index and done and is raised again in the test.
"""

import json
import os
import sys

import trio
from google.protobuf import json_format
from google.protobuf.message import Message

from guestlib import CallRejected, EventChannels, PageFault, SessionClosed, XenError, connect, ops
from guestlib.hypercalls import Pending
from guestlib.xen import Errno
from xensim.launch import AsyncChild, opened, python_command


class Lines:
    """Newline-delimited JSON over a pair of trio byte streams."""

    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream):
        self._receive, self._send, self._buffer = receive, send, b""

    async def read(self):
        while b"\n" not in self._buffer:
            chunk = await self._receive.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def write(self, obj) -> None:
        await self._send.send_all(json.dumps(obj).encode() + b"\n")


# -- the worker (child) side -----------------------------------------------------------------


def encode(value):
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, PageFault):
        return {"fault": {"address": value.address, "error_code": value.error_code, "detail": value.detail}}
    if isinstance(value, list):
        return [outcome(item) if isinstance(item, Pending) else encode(item) for item in value]
    return value


def outcome(pending: Pending) -> dict:
    error = pending.exception()
    return encode_error(error) if error else {"value": encode(pending.result())}


def encode_error(error: Exception) -> dict:
    if isinstance(error, XenError):
        return {"error": "XenError", "errno": error.errno.name, "message": error.message, "index": error.index, "done": error.done, "hypercall": error.hypercall}
    return {"error": type(error).__name__, "message": str(error), "code": getattr(getattr(error, "code", None), "name", None)}


class Worker:
    """One vCPU's process: its client, and the steps a test can ask of it."""

    def __init__(self, xen, nursery: trio.Nursery, vcpu: int):
        self.xen, self.nursery, self.vcpu = xen, nursery, vcpu
        self.events: EventChannels | None = None
        self.handled: list[int] = []

    async def handle(self, command: dict):
        if "call" in command:
            return await getattr(self.xen, command["call"])(*command.get("args", ()), **command.get("kwargs", {}))
        if "submit" in command:
            calls = [getattr(ops, name)(*args, **kwargs) for name, args, kwargs in command["submit"]]
            return await self.xen.submit(calls, stop_on_error=command.get("stop_on_error", False))
        return await getattr(self, f"do_{command['do']}")(**command.get("kwargs", {}))

    async def do_wait_started(self):
        return await self.xen.wait_started()

    async def do_events(self, shared_info_va: int):
        """Start the upcall task and take events (EventChannels.run, local_irq_enable)."""
        self.events = EventChannels(self.xen, shared_info_va, self.vcpu)
        self.nursery.start_soon(self.events.run)
        await self.events.local_irq_enable()

    async def do_bind_ack(self, port: int, ack_va: int):
        """Handle port by adding 1 to the u64 at ack_va, sent with the upcall's unmask."""

        async def ack(port, tail):
            self.handled.append(port)
            tail.atomic("fetch_add", ack_va, 1)

        self.events.bind(port, ack)

    async def do_handled(self):
        return self.handled

    async def do_wait_value(self, va: int, value: int, interval: float = 0.001):
        """Load va until it holds value (a spin-wait on guest memory, as an IPI sender's)."""
        while (current := await self.xen.load(va)) != value:
            if isinstance(current, PageFault):
                raise RuntimeError(f"wait_value: {current}")
            await trio.sleep(interval)
        return current


async def worker_main(address: str, token: str, vcpu: int) -> None:
    pipe = Lines(trio.lowlevel.FdStream(os.dup(0)), trio.lowlevel.FdStream(os.dup(1)))
    async with connect(address, token, vcpu) as xen, trio.open_nursery() as nursery:
        worker = Worker(xen, nursery, vcpu)
        while (command := await pipe.read()) is not None:
            try:
                reply = {"value": encode(await worker.handle(command))}
            except (XenError, CallRejected, SessionClosed, RuntimeError) as e:
                reply = encode_error(e)
            await pipe.write(reply)
        nursery.cancel_scope.cancel()


# -- the test (parent) side ------------------------------------------------------------------


def decode_error(reply: dict) -> Exception:
    if reply["error"] == "XenError":
        return XenError(Errno[reply["errno"]], reply["message"], reply["index"], reply["done"], reply["hypercall"])
    return (SessionClosed if reply["error"] == "SessionClosed" else RuntimeError)(f"{reply['error']}: {reply['message']} (code {reply['code']})")


class VcpuProcess:
    """The test's handle on one vCPU worker process."""

    def __init__(self, process: AsyncChild, vcpu: int):
        self.process, self.vcpu = process, vcpu
        self._pipe = Lines(process.stdout, process.stdin)

    async def send(self, **command) -> None:
        await self._pipe.write(command)

    async def reply(self):
        """The next reply's value; raises what the worker caught (XenError, SessionClosed)."""
        reply = await self._pipe.read()
        if reply is None:
            raise RuntimeError(f"vCPU {self.vcpu}'s process exited (status {self.process.returncode}): {self.process.log()[-2000:]}")
        if "error" in reply:
            raise decode_error(reply)
        return reply["value"]

    async def call(self, method: str, *args, **kwargs):
        await self.send(call=method, args=args, kwargs=kwargs)
        return await self.reply()

    async def submit(self, calls, stop_on_error: bool = False) -> list[dict]:
        """Ops as (method, *args) tuples, in one message; one {"value"} or {"error"} each."""
        await self.send(submit=[(name, args, {}) for name, *args in calls], stop_on_error=stop_on_error)
        return await self.reply()

    async def do(self, step: str, **kwargs):
        await self.send(do=step, kwargs=kwargs)
        return await self.reply()

    async def close(self) -> None:
        """End its stdin; the worker closes its Session and exits."""
        await self.process.stdin.aclose()
        with trio.fail_after(10):
            await self.process.wait()
        assert self.process.returncode == 0, f"vCPU {self.vcpu}'s process exited with {self.process.returncode}: {self.process.log()[-2000:]}"


async def _run(command: list[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with opened(command, stdin=True) as process:
        task_status.started(process)
        await process.wait()


async def spawn_vcpu(nursery: trio.Nursery, address: str, token: str, vcpu: int) -> VcpuProcess:
    """Start vCPU `vcpu`'s process in nursery (killed if the nursery is cancelled)."""
    process = await nursery.start(_run, python_command("tests.guest.vcpus", address, token, str(vcpu)))
    return VcpuProcess(process, vcpu)


if __name__ == "__main__":
    trio.run(worker_main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
