"""An echo load process: `python -m xensim.bench.echo_load ADDRESS TOKEN VCPU SECONDS`.

Sends Echo calls one message at a time on vCPU VCPU's Session through the guest's own stack
(guestlib's trio client and bridge) for SECONDS and prints how many it made: the transport
floor that a stress run's message rate is compared with, measured with as many processes.
"""

import sys
import time

import trio

from guestlib import connect


async def echo_for(address: str, token: str, vcpu: int, seconds: float) -> int:
    count = 0
    async with connect(address, token, vcpu) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await client.echo(b"x" * 64)
            count += 1
    return count


if __name__ == "__main__":
    address, token, vcpu, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    print(trio.run(echo_for, address, token, vcpu, seconds), flush=True)
