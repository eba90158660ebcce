"""The gate of a controlled run over the wire (hypervisor/server/schedule.py, docs/schedule.md):
virtual time, sleeping calls, and calls the gate does not hold."""

import time

import pytest

from tests.support.server import start_server
from xensim.v1 import hypercalls_pb2 as h

from .helpers import SessionClient, WireGuest
from .test_session import evtchn, sched

pytestmark = pytest.mark.timeout(60)

S = 1_000_000_000
ECHO = h.Call(echo=h.EchoRequest())


def test_a_poll_sleeps_in_virtual_time_and_its_message_goes_on_as_a_step():
    """An hour of Xen system time passes at once when every vCPU sleeps; the rest of the
    poll's message runs as a step, and the clock then reads the deadline plus a step."""
    with start_server("--schedule", "random:1") as server:
        guest = WireGuest(server, nr_vcpus=1)
        session = SessionClient(guest.hc, guest.md(0))
        assert session.push().HasField("started")
        session.send(1, evtchn(bind_virq=h.EvtchnBindVirq(virq=0, vcpu=0)))
        bound = session.answer()
        port, now = bound.results[0].event_channel_op.port, bound.system_time_ns
        began = time.monotonic()
        session.send(2, sched(poll=h.SchedPoll(ports=[port], timeout_ns=now + 3600 * S)), ECHO)
        answer = session.answer()
        assert time.monotonic() - began < 5 and len(answer.results) == 2
        assert answer.system_time_ns == now + 3600 * S + 100_000  # the deadline, then the step of the echo's rest


def test_a_unary_call_that_sleeps_leaves_the_gate_free():
    """A unary call is no step; once its poll has slept, the vCPU's Session messages still run
    (the gate was left holding a step nobody would end)."""
    with start_server("--schedule", "pct:2") as server:
        guest = WireGuest(server, nr_vcpus=1)
        port = guest.call("EventChannelOp", h.EventChannelOpRequest(bind_virq=h.EvtchnBindVirq(virq=0, vcpu=0))).port
        guest.call("SchedOp", h.SchedOpRequest(poll=h.SchedPoll(ports=[port], timeout_ns_relative=10 * S)))
        session = SessionClient(guest.hc, guest.md(0))
        assert session.push().HasField("started")
        session.send(1, ECHO)
        assert session.answer(timeout=10).system_time_ns >= 10 * S
