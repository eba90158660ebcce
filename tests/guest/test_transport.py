"""The Session bridge between trio and grpcio: how many threads a round trip wakes."""

import threading

import pytest
import trio

from guestlib import connect

pytestmark = pytest.mark.timeout(60)


def test_a_session_adds_one_thread_to_the_vcpu_process(server):
    """Every thread a round trip passes through costs a wake-up, tens of microseconds of CPU
    here: the Session must use grpcio's single-threaded call, with one helper thread of its
    own, not the sync stub's bidi stream (a request-consumer and a channel-spin thread of
    grpc's, and a reader of ours)."""
    domain = server.create_domain(nr_pages=2048, nr_vcpus=1)

    async def threads_while_open() -> list[str]:
        before = set(threading.enumerate())
        async with connect(server.address, domain.token, 0) as client:
            await client.wait_started()
            for _ in range(3):
                await client.tlb_flush_local()
            return sorted(t.name for t in set(threading.enumerate()) - before)

    assert trio.run(threads_while_open) == ["xensim-vcpu0-reader"]
