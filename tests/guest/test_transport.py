"""guestlib's Session transport: which way it drives grpcio, and that both ways behave alike.

The pinned grpcio (pyproject.toml) must take grpcio's segregated call (docs/transport.md section 6):
if a grpcio release changes the private layer it uses, the first test fails here, loudly, instead
of every guest silently falling back to the slower public bridge.
"""

import grpc
import pytest
import trio

from guestlib import SessionClosed, Toolstack, connect, transport

from .domain import TIMEOUT, boot

STREAMS = pytest.mark.parametrize("segregated", [True, False], ids=["segregated", "bridge"])


def use(monkeypatch, segregated: bool) -> type:
    """Make every Session opened from now on take this stream; returns its class."""
    monkeypatch.setattr(transport, "SEGREGATED", transport.SEGREGATED and segregated)
    return transport._SegregatedStream if segregated else transport._BridgedStream


def test_the_pinned_grpcio_takes_the_segregated_call():
    assert transport.SEGREGATED, f"grpcio {grpc.__version__} changed the private segregated call guestlib/transport.py uses: re-measure and re-pin"


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.setitem(transport._SEGREGATED_SHAPE, "SegregatedCall.operate", "(self, operations, tag, flags)"),
        lambda m: m.setitem(transport._SEGREGATED_SHAPE, "SegregatedCall.no_such_method", "(self)"),
        lambda m: m.setattr(transport, "_SEGREGATED_NAMES", (*transport._SEGREGATED_NAMES, "NoSuchOperation")),
    ],
    ids=["signature", "method", "name"],
)
def test_a_private_layer_of_another_shape_is_not_used(monkeypatch, change):
    assert transport._segregated_api() is not None
    change(monkeypatch)
    assert transport._segregated_api() is None


@STREAMS
async def test_concurrent_messages_are_each_answered_on_either_stream(server, monkeypatch, segregated):
    stream = use(monkeypatch, segregated)
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            assert type(guest.xen.session._stream) is stream
            guest.sent.clear()
            answers = []

            async def flush():
                answers.append(await guest.xen.tlb_flush_local())

            async with trio.open_nursery() as nursery:  # sends overlap: the segregated stream queues them
                for _ in range(40):
                    nursery.start_soon(flush)
            assert answers == [1] * 40  # one MMUEXT op done each
            assert len({m.response.request_id for m in guest.sent.messages}) == len(guest.sent.messages) == 40


@STREAMS
async def test_destroying_the_domain_ends_either_stream_aborted(server, monkeypatch, segregated):
    use(monkeypatch, segregated)
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=256)
            async with connect(server.address, created.token, 0) as xen:
                await xen.wait_started()
                await xl.destroy_domain(created.domid)
                with pytest.raises(SessionClosed, match="ABORTED") as caught:
                    await xen.tlb_flush_local()
                assert caught.value.code == grpc.StatusCode.ABORTED
            assert await xl.audit() == []


@STREAMS
async def test_an_unreachable_hypervisor_ends_either_stream_unavailable(monkeypatch, segregated):
    use(monkeypatch, segregated)
    with trio.fail_after(TIMEOUT):
        async with connect("127.0.0.1:1", "no-token", 0) as xen:
            with pytest.raises(SessionClosed, match="UNAVAILABLE") as caught:
                await xen.tlb_flush_local()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@STREAMS
async def test_closing_with_an_answer_owed_cancels_either_stream_at_once(server, monkeypatch, segregated):
    use(monkeypatch, segregated)
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=256)
            async with connect(server.address, created.token, 0) as xen:
                await xen.wait_started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(xen.sched_block)  # answered only when an event is pending: never, here
                    while not (await xl.vcpu_info(created.domid, 0))[0].blocked:  # a barrier, not a race
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
                closing = trio.current_time()
            assert trio.current_time() - closing < transport.CLOSE_TIMEOUT  # cancelled, not waited out
            assert await xl.audit() == []
            await xl.destroy_domain(created.domid)
