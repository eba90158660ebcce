"""A vCPU process for the fault tests, to be SIGKILLed at a chosen point:

    python -m tests.server.vcpu_process ADDRESS TOKEN VCPU MESSAGE DEPTH COUNT

It opens the vCPU's Session (guestlib, trio), waits for VcpuStarted, then sends MESSAGE (a
SessionRequest's calls, serialized and hex-encoded) COUNT times (0: until killed) with DEPTH
messages in flight, failing on any error status. It prints JSON lines on stdout: `running` once
the first answer is in (or, when the message sleeps in SCHEDOP_block or poll, `sleeping` just
before it is sent), and `done` with the number of messages at the end.
"""

import json
import sys

import trio

from guestlib import connect
from xensim.v1 import hypercalls_pb2


def say(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def sleeps(calls) -> bool:
    return any(call.HasField("sched_op") and call.sched_op.WhichOneof("op") in ("block", "poll") for call in calls)


async def main(address: str, token: str, vcpu: int, calls, depth: int, count: int) -> None:
    sent, answered = 0, 0
    async with connect(address, token, vcpu) as client:
        await client.wait_started()

        async def worker() -> None:
            nonlocal sent, answered
            while not count or sent < count:
                sent += 1
                response = await client.session.exchange(calls)
                failed = [r.status for r in response.results if r.HasField("status")]
                if response.HasField("status") or failed:
                    raise RuntimeError(f"a message failed: {response.status or failed[0]}")
                answered += 1
                if answered == 1 and not sleeps(calls):
                    say("running")

        if sleeps(calls):
            say("sleeping")
        async with trio.open_nursery() as nursery:
            for _ in range(depth):
                nursery.start_soon(worker)
    say("done", messages=answered)


if __name__ == "__main__":
    address, token, vcpu, message, depth, count = sys.argv[1:]
    request = hypercalls_pb2.SessionRequest.FromString(bytes.fromhex(message))
    trio.run(main, address, token, int(vcpu), list(request.calls), int(depth), int(count))
