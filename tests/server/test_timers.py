"""Xen's system time on the Session, and the timers that take absolute deadlines in it:
SCHEDOP_poll's timeout, set_timer_op, and VCPUOP_set/stop_singleshot_timer (one timer with
set_timer_op's, raising VIRQ_TIMER; EINVAL when aimed at another vCPU); and the periodic timer
every vCPU starts with (VCPUOP_set/stop_periodic_timer)."""

import time

import grpc
import pytest

from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, error_info, field_violation, status_of
from .test_session import evtchn, sched

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000
VIRQ_TIMER = 0


@pytest.fixture
def vcpu0(vcpu0):
    """vCPU 0's Session, once it has been started."""
    assert vcpu0.push().HasField("started")
    return vcpu0


def exchange(session: SessionClient, *calls: h.Call) -> h.SessionResponse:
    session.send(1, *calls)
    return session.answer()


def singleshot(vcpuid: int, deadline: int) -> h.Call:
    return h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=vcpuid, set_singleshot_timer=h.VcpuSetSingleshotTimer(timeout_abs_ns=deadline)))


def periodic(vcpuid: int, period_ns: int = 0) -> h.Call:
    """VCPUOP_set_periodic_timer, or with no period VCPUOP_stop_periodic_timer."""
    if period_ns:
        return h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=vcpuid, set_periodic_timer=h.VcpuSetPeriodicTimer(period_ns=period_ns)))
    return h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=vcpuid, stop_periodic_timer=h.VcpuStopPeriodicTimer()))


def bind_timer(session: SessionClient, ticking: bool = False) -> tuple[int, int]:
    """VIRQ_TIMER bound on vCPU 0: (its port, Xen's system time of the answer). Unless
    `ticking`, the periodic timer is stopped first, as Linux does, so only the timers a test
    arms raise it."""
    answer = exchange(session, *([] if ticking else [periodic(0)]), evtchn(bind_virq=h.EvtchnBindVirq(virq=VIRQ_TIMER, vcpu=0)))
    return answer.results[-1].event_channel_op.port, answer.system_time_ns


def test_every_session_message_carries_xens_system_time(guest):
    session = SessionClient(guest.hc, guest.md(0))
    started = session.push()  # a push
    first = exchange(session, h.Call(echo=h.EchoRequest()))  # an answer
    time.sleep(0.2)
    second = exchange(session, h.Call(echo=h.EchoRequest()))
    session.close()
    assert 0 < started.system_time_ns <= first.system_time_ns
    assert second.system_time_ns - first.system_time_ns >= 200 * MS


def test_a_poll_whose_absolute_deadline_has_passed_returns_at_once(guest, vcpu0):
    port, now = bind_timer(vcpu0)  # never pending: only the timeout can end the poll
    began = time.monotonic()
    answer = exchange(vcpu0, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now - 1)))
    assert not answer.results[0].HasField("status") and time.monotonic() - began < 0.5


def test_a_poll_wakes_at_its_absolute_deadline_not_before(guest, vcpu0):
    port, now = bind_timer(vcpu0)
    answer = exchange(vcpu0, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now + 300 * MS)))
    assert not answer.results[0].HasField("status")
    assert now + 300 * MS <= answer.system_time_ns < now + 3_000 * MS


def test_the_relative_forms_kept_for_grpcurl(guest, vcpu0):
    port, now = bind_timer(vcpu0)
    answer = exchange(vcpu0, sched(poll=h.SchedPoll(ports=[port], timeout_ns_relative=200 * MS)))
    assert now + 200 * MS <= answer.system_time_ns
    with pytest.raises(grpc.RpcError) as caught:  # one or the other
        guest.call("SetTimerOp", h.SetTimerOpRequest(timeout_ns=answer.system_time_ns, timeout_ns_relative=1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(status_of(caught.value)).field == "timeout_ns_relative"


def test_set_timer_op_with_a_past_deadline_fires_at_once(guest, vcpu0):
    port, now = bind_timer(vcpu0)
    began = time.monotonic()
    exchange(vcpu0, h.Call(set_timer_op=h.SetTimerOpRequest(timeout_ns=now - 1)), sched(block=h.SchedBlock()))
    assert list(vcpu0.push().upcall.pending_ports) == [port] and time.monotonic() - began < 0.5


def test_the_singleshot_timer_fires_virq_timer_at_its_deadline(guest, vcpu0):
    port, now = bind_timer(vcpu0)
    vcpu0.send(1, singleshot(0, now + 200 * MS), sched(block=h.SchedBlock()))  # block enables events
    upcall = vcpu0.push(timeout=10)
    assert list(upcall.upcall.pending_ports) == [port] and upcall.system_time_ns >= now + 200 * MS
    woken = vcpu0.answer()
    assert [r.WhichOneof("result") for r in woken.results] == ["vcpu_op", "sched_op"]


def test_stop_singleshot_timer_stops_it(guest, vcpu0):
    port, now = bind_timer(vcpu0)
    stop = h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=0, stop_singleshot_timer=h.VcpuStopSingleshotTimer()))
    answer = exchange(vcpu0, singleshot(0, now + 100 * MS), stop, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now + 500 * MS)))
    assert answer.system_time_ns >= now + 500 * MS  # the poll timed out: the timer never fired
    assert not vcpu0.pushes


@pytest.mark.parametrize("op", ["set_singleshot_timer", "stop_singleshot_timer"])
def test_singleshot_ops_aimed_at_another_vcpu_are_einval(guest, vcpu0, op):
    request = h.VcpuOpRequest(vcpuid=1, **{op: h.VcpuSetSingleshotTimer(timeout_abs_ns=1) if op == "set_singleshot_timer" else h.VcpuStopSingleshotTimer()})
    with pytest.raises(grpc.RpcError) as caught:
        guest.call("VcpuOp", request)
    info = error_info(status_of(caught.value))
    assert (caught.value.code(), info.reason, info.metadata["hypercall"]) == (grpc.StatusCode.FAILED_PRECONDITION, "EINVAL", "vcpu_op")
    assert "a vCPU sets only its own timer" in caught.value.details()


@pytest.fixture
def vcpu1(guest):
    """vCPU 1's Session, brought up and started: it polls vCPU 0's timer port while vCPU 0
    runs (a blocked vCPU does not tick: Xen stops its periodic timer when it is switched out)."""
    guest.bring_up(1)
    session = SessionClient(guest.hc, guest.md(1))
    assert session.push().HasField("started")
    yield session
    session.close()


def next_tick(guest, poller: SessionClient, port: int, now: int) -> tuple[h.SessionResponse, int]:
    """Poll vCPU 0's timer port from `poller` until a tick (or 2 s); then vCPU 0 closes it and
    binds VIRQ_TIMER again, which clears the pending bit: (the poll's answer, the new port)."""
    polled = exchange(poller, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now + 2_000 * MS)))
    guest.call("EventChannelOp", h.EventChannelOpRequest(close=h.EvtchnClose(port=port)))
    rebound = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_virq=h.EvtchnBindVirq(virq=VIRQ_TIMER, vcpu=0)))
    return polled, rebound.port


def test_every_vcpu_gets_virq_timer_every_10ms_until_it_stops_the_periodic_timer(guest, vcpu0, vcpu1):
    port, now = bind_timer(vcpu0, ticking=True)
    first, port = next_tick(guest, vcpu1, port, now)
    second, port = next_tick(guest, vcpu1, port, first.system_time_ns)
    assert first.system_time_ns < now + 1_000 * MS and second.system_time_ns - first.system_time_ns < 1_000 * MS
    exchange(vcpu0, periodic(0))
    stopped, _ = next_tick(guest, vcpu1, port, second.system_time_ns - 1_700 * MS)
    assert stopped.system_time_ns >= second.system_time_ns + 300 * MS  # the poll timed out: no tick


def test_set_periodic_timer_sets_the_beat_and_below_1ms_is_einval(guest, vcpu0, vcpu1):
    port, now = bind_timer(vcpu0)
    exchange(vcpu0, periodic(0, 300 * MS))
    first, port = next_tick(guest, vcpu1, port, now)  # a period after the last tick (at creation)
    second, _ = next_tick(guest, vcpu1, port, first.system_time_ns)
    assert 250 * MS <= second.system_time_ns - first.system_time_ns < 1_000 * MS
    with pytest.raises(grpc.RpcError) as caught:
        guest.call("VcpuOp", periodic(1, MS - 1).vcpu_op)
    assert error_info(status_of(caught.value)).reason == "EINVAL"


def advance_time_runs(guest) -> int:
    counts = guest.toolstack("Stats", t.StatsRequest()).counts
    return sum(c.count for c in counts if c.op == "advance_time")


def test_a_guest_that_never_takes_its_ticks_costs_the_server_no_wakeups(guest, vcpu0, vcpu1):
    """Its port stays pending, so each further tick is no news: the timer parks until the
    domain calls again, instead of waking the server 100 times a second."""
    port, now = bind_timer(vcpu0, ticking=True)
    exchange(vcpu1, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now + 2_000 * MS)))  # the first tick: pending for good
    time.sleep(0.05)
    before = advance_time_runs(guest)
    time.sleep(0.5)
    assert advance_time_runs(guest) - before < 10  # 50 if each tick woke the server
