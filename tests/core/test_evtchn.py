"""Event channels, 2-level ABI: every op and errno row of docs/xen.md sections 16.3 and 19, delivery
through the shared-info bits (16.5), coalescing kicks, ports and buckets (16.2)."""

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hypervisor.core import Hypervisor, XenError, audit
from hypervisor.core.abi import (
    DOMID_SELF,
    NR_VIRQS,
    PAGE_SHIFT,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VIRQ_ARGO,
    VIRQ_CONSOLE,
    VIRQ_DEBUG,
    VIRQ_TIMER,
    Errno,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from hypervisor.core.evtchn import ECS, NR_PIRQS, port_is_pending
from hypervisor.core.sched import BLOCKED
from hypervisor.core.trace import state_digest

from .conftest import fails_with, unchanged
from .conftest import fails_with as fails  # the errno, and nothing changed
from .guest import RW, A, D, Guest, P


def connect(guest, other, remote_vcpu=0):
    """guest's port joined to other's (other offers, guest binds); kicks drained.
    Returns (guest port, other port)."""
    rport = other.evtchn("alloc_unbound", remote_dom=guest.domid)
    if remote_vcpu:
        other.evtchn("bind_vcpu", port=rport, vcpu=remote_vcpu)
    lport = guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)
    guest.clear_pending(lport)
    guest.ack_upcall(0)
    guest.hv.take_kicks()
    return lport, rport


def status(guest, port, **kw):
    return guest.evtchn("status", port=port, **kw)


# -- allocation, validity, buckets (16.2) ---------------------------------------------------


def test_ports_are_allocated_lowest_free_first_from_1(guest):
    assert [guest.evtchn("alloc_unbound") for _ in range(3)] == [1, 2, 3]
    guest.evtchn("close", port=2)
    assert guest.evtchn("alloc_unbound") == 2
    assert guest.evtchn("alloc_unbound") == 4


def test_port_0_is_reserved_and_reports_closed(hv, guest):
    assert status(guest, 0)["state"] == EVTCHNSTAT_closed
    for cmd in ("close", "send", "bind_vcpu"):
        fields = {"port": 0, "vcpu": 0} if cmd == "bind_vcpu" else {"port": 0}
        with fails(hv, Errno.EINVAL):
            guest.evtchn(cmd, **fields)


def test_validity_is_by_allocated_bucket(hv, guest):
    """Port 63 is valid (closed) in the first bucket; 64 is EINVAL until a second bucket
    is allocated by the 64th allocation."""
    assert status(guest, 63) == {"state": EVTCHNSTAT_closed, "vcpu": 0, "remote_dom": 0, "remote_port": 0, "virq": 0}
    for cmd in ("status", "close", "send", "unmask"):
        with fails(hv, Errno.EINVAL, match="port 64 is beyond its allocated ports 0..63"):
            guest.evtchn(cmd, port=64)
    with fails(hv, Errno.EINVAL):
        guest.evtchn("bind_vcpu", port=64, vcpu=0)
    ports = [guest.evtchn("alloc_unbound") for _ in range(64)]
    assert ports[-1] == 64 and len(guest.domain.evtchn) == 128
    assert status(guest, 127)["state"] == EVTCHNSTAT_closed
    with fails(hv, Errno.EINVAL):
        status(guest, 128)


def test_refused_foreign_alloc_leaves_the_other_table_untouched(hv, guest, other):
    """Xen grows the target's table before its XSM check; xensim checks first, so a refused
    foreign caller can neither grow nor probe another domain's port table."""
    for _ in range(63):
        other.evtchn("alloc_unbound")
    with fails(hv, Errno.EPERM):
        guest.evtchn("alloc_unbound", dom=other.domid)
    assert len(other.domain.evtchn) == 64
    assert other.evtchn("alloc_unbound") == 64 and len(other.domain.evtchn) == 128


def test_port_exhaustion_is_enospc_at_the_cap(hv):
    guest = Guest(hv, nr_vcpus=1, max_evtchn_port=100)
    assert [guest.evtchn("alloc_unbound") for _ in range(100)] == list(range(1, 101))
    with fails(hv, Errno.ENOSPC, match="every port up to 100 is in use"):
        guest.evtchn("alloc_unbound")
    with fails(hv, Errno.ENOSPC):
        guest.evtchn("bind_ipi", vcpu=0)
    assert len(guest.domain.evtchn) == 128 and status(guest, 127)["state"] == EVTCHNSTAT_closed
    guest.evtchn("close", port=42)
    assert guest.evtchn("bind_ipi", vcpu=0) == 42


def test_libxl_default_cap_is_1023_ports(hv, guest):
    assert guest.domain.max_evtchn_port == 1023
    ports = [guest.evtchn("alloc_unbound") for _ in range(1023)]
    assert ports[-1] == 1023
    with fails(hv, Errno.ENOSPC):
        guest.evtchn("alloc_unbound")


@pytest.mark.parametrize("cap", [-1, 4096])
def test_cap_outside_the_2_level_abi_is_refused(hv, cap):
    with fails_with(hv, Errno.EINVAL, match="max_evtchn_port"):
        hv.toolstack("create_domain", nr_pages=256, max_evtchn_port=cap)


# -- alloc_unbound, bind_interdomain -------------------------------------------------------


def test_alloc_unbound_offers_the_port_to_remote_dom(guest):
    assert status(guest, guest.evtchn("alloc_unbound", remote_dom=999)) == {
        "state": EVTCHNSTAT_unbound, "vcpu": 0, "remote_dom": 999, "remote_port": 0, "virq": 0}  # not checked
    assert status(guest, guest.evtchn("alloc_unbound"))["remote_dom"] == guest.domid  # DOMID_SELF


def test_alloc_unbound_errors(hv, guest, other):
    with fails(hv, Errno.ESRCH):
        guest.evtchn("alloc_unbound", dom=4242)
    with fails(hv, Errno.EPERM, match=f"dom{guest.domid} may not allocate ports of dom{other.domid}"):
        guest.evtchn("alloc_unbound", dom=other.domid, remote_dom=guest.domid)
    guest.domain.privileged = True
    port = guest.evtchn("alloc_unbound", dom=other.domid, remote_dom=DOMID_SELF)
    assert status(other, port)["remote_dom"] == guest.domid  # DOMID_SELF means the caller


def test_bind_interdomain_joins_both_ends_and_sets_the_new_port_pending(hv, guest, other):
    rport = other.evtchn("alloc_unbound", remote_dom=guest.domid)
    lport = guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)
    assert status(guest, lport) == {"state": EVTCHNSTAT_interdomain, "vcpu": 0, "remote_dom": other.domid, "remote_port": rport, "virq": 0}
    assert status(other, rport) == {"state": EVTCHNSTAT_interdomain, "vcpu": 0, "remote_dom": guest.domid, "remote_port": lport, "virq": 0}
    assert guest.pending(lport) and guest.pending_sel(0) == 1 and guest.upcall_pending(0) == 1
    assert not other.pending(rport)
    assert hv.take_kicks() == [(guest.domid, 0)]


def test_loopback_interdomain_by_domid_self(guest):
    a = guest.evtchn("alloc_unbound")
    b = guest.evtchn("bind_interdomain", remote_dom=DOMID_SELF, remote_port=a)
    assert status(guest, a)["remote_port"] == b and status(guest, b)["remote_port"] == a
    guest.clear_pending(b)
    guest.evtchn("send", port=b)
    assert guest.pending(a) and not guest.pending(b)


def test_bind_interdomain_errors(hv, guest, other):
    offered_to_self = other.evtchn("alloc_unbound")
    with fails(hv, Errno.ESRCH):
        guest.evtchn("bind_interdomain", remote_dom=4242, remote_port=1)
    with fails(hv, Errno.EINVAL, match="beyond"):
        guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=64)
    with fails(hv, Errno.EINVAL, match=f"port 5 is free, not unbound and offered to dom{guest.domid}"):
        guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=5)
    with fails(hv, Errno.EINVAL, match=f"offered to dom{other.domid}"):
        guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=offered_to_self)
    lport, rport = connect(guest, other)
    with fails(hv, Errno.EINVAL, match="is interdomain"):  # already bound
        guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)


def test_bind_interdomain_with_no_local_port_is_enospc(hv, other):
    guest = Guest(hv, nr_vcpus=1, max_evtchn_port=1)
    rport = other.evtchn("alloc_unbound", remote_dom=guest.domid)
    guest.evtchn("alloc_unbound")
    with fails(hv, Errno.ENOSPC):
        guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)


# -- send and delivery (16.5) ---------------------------------------------------------------


def test_send_sets_remote_pending_selector_and_upcall_for_its_notify_vcpu(hv, guest, other):
    lport, rport = connect(guest, other, remote_vcpu=1)
    assert guest.evtchn("send", port=lport) == 0
    word = rport // 64
    assert other.pending(rport) and other.pending_sel(1) == 1 << word and other.upcall_pending(1) == 1
    assert other.pending_sel(0) == 0 and other.upcall_pending(0) == 0 and not guest.pending(lport)
    assert hv.take_kicks() == [(other.domid, 1)]


def test_events_coalesce_at_every_step(hv, guest, other):
    """A second send of a pending port changes nothing; a second port of the same word sets
    only its pending bit; a port of another word sets its selector bit but, upcall-pending
    being set already, kicks nobody."""
    lport, rport = connect(guest, other)
    guest.evtchn("send", port=lport)
    assert hv.take_kicks() == [(other.domid, 0)]
    before = other.hv.memory.read(other.domain.shared_info_mfn, 0, 4096)
    guest.evtchn("send", port=lport)
    assert other.hv.memory.read(other.domain.shared_info_mfn, 0, 4096) == before and hv.take_kicks() == []
    same_word = other.evtchn("bind_ipi", vcpu=0)
    other.evtchn("send", port=same_word)
    assert other.pending(same_word) and other.pending_sel(0) == 1 and hv.take_kicks() == []
    for _ in range(64):
        far = other.evtchn("bind_ipi", vcpu=0)
    other.evtchn("send", port=far)
    assert far // 64 == 1 and other.pending_sel(0) == 0b11 and hv.take_kicks() == []


def test_a_port_still_pending_stops_delivery_at_its_pending_bit(hv, guest):
    """The guest acked the upcall but left the port pending: a new send sets no selector,
    no upcall, and wakes no poller (Xen stops at step 1 of 16.5)."""
    port, a, b = (guest.evtchn("bind_ipi", vcpu=1) for _ in range(3))
    guest.evtchn("send", port=port)
    guest.ack_upcall(1)
    hv.take_kicks()
    assert guest.sched_op("poll", ports=[a, b]) is BLOCKED  # several ports: any new pending wakes it
    with unchanged(hv):
        guest.evtchn("send", port=port, caller=1)
    assert guest.pending_sel(1) == 0 and guest.upcall_pending(1) == 0 and guest.domain.vcpus[0].blocked


def test_masked_port_gets_pending_only_and_unmask_redelivers(hv, guest, other):
    lport, rport = connect(guest, other)
    other.mask(rport)
    guest.evtchn("send", port=lport)
    assert other.pending(rport) and other.masked(rport)
    assert other.pending_sel(0) == 0 and other.upcall_pending(0) == 0 and hv.take_kicks() == []
    assert other.evtchn("unmask", port=rport) == 0
    assert not other.masked(rport) and other.pending_sel(0) == 1 and other.upcall_pending(0) == 1
    assert hv.take_kicks() == [(other.domid, 0)]


def test_unmask_redelivers_only_a_masked_pending_port_with_its_selector_clear(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.evtchn("send", port=port)  # unmasked: delivered
    guest.ack_upcall(1)
    hv.take_kicks()
    guest.evtchn("unmask", port=port)  # mask bit was clear: nothing happens
    assert guest.pending_sel(1) == 0 and guest.upcall_pending(1) == 0
    guest.mask(port)
    guest.evtchn("unmask", port=port)
    assert not guest.masked(port) and guest.pending_sel(1) == 1 and hv.take_kicks() == [(guest.domid, 1)]
    guest.mask(port)
    guest.set_upcall_mask(1, 0)
    guest.evtchn("unmask", port=port)  # selector bit already set: no new upcall
    assert not guest.masked(port) and hv.take_kicks() == []
    guest.mask(port)
    guest.clear_pending(port)
    guest.ack_upcall(1)
    guest.evtchn("unmask", port=port)  # not pending
    assert guest.pending_sel(1) == 0 and guest.upcall_pending(1) == 0


def test_unmask_of_a_free_port_leaves_its_mask_bit(hv, guest):
    guest.mask(5)
    assert guest.evtchn("unmask", port=5) == 0
    assert guest.masked(5)


def test_ipi_sets_its_own_port_for_its_bound_vcpu(hv, guest):
    port = guest.evtchn("bind_ipi", vcpu=1)
    assert status(guest, port) == {"state": EVTCHNSTAT_ipi, "vcpu": 1, "remote_dom": 0, "remote_port": 0, "virq": 0}
    guest.evtchn("send", port=port, caller=0)
    assert guest.pending(port) and guest.upcall_pending(1) == 1 and guest.upcall_pending(0) == 0
    assert hv.take_kicks() == [(guest.domid, 1)]


def test_send_on_an_unbound_port_is_dropped(hv, guest):
    port = guest.evtchn("alloc_unbound")
    with unchanged(hv):
        assert guest.evtchn("send", port=port) == 0
    assert not guest.pending(port)


def test_send_errors(hv, guest):
    virq = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    for port, state in ((5, "free"), (0, "reserved"), (virq, "virq")):
        with fails(hv, Errno.EINVAL, match=f"port {port} is {state}"):
            guest.evtchn("send", port=port)


# -- close ---------------------------------------------------------------------------------


def test_close_of_interdomain_makes_the_peer_unbound_towards_the_closer_and_rebindable(hv, guest, other):
    lport, rport = connect(guest, other)
    other.evtchn("send", port=rport)
    guest.mask(lport)
    assert guest.evtchn("close", port=lport) == 0
    assert status(guest, lport)["state"] == EVTCHNSTAT_closed
    assert not guest.pending(lport) and guest.masked(lport)  # pending cleared, mask kept
    assert status(other, rport) == {"state": EVTCHNSTAT_unbound, "vcpu": 0, "remote_dom": guest.domid, "remote_port": 0, "virq": 0}
    assert other.evtchn("send", port=rport) == 0  # now dropped
    again = guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)
    assert again == lport and status(other, rport)["state"] == EVTCHNSTAT_interdomain


def test_close_resets_notify_vcpu(guest, other):
    lport, _ = connect(guest, other)
    guest.evtchn("bind_vcpu", port=lport, vcpu=1)
    guest.evtchn("close", port=lport)
    assert status(guest, lport)["vcpu"] == 0
    assert status(guest, guest.evtchn("bind_ipi", vcpu=1))["vcpu"] == 1


def test_close_errors(hv, guest):
    for port, match in ((64, "beyond"), (5, "is free"), (0, "is reserved")):
        with fails(hv, Errno.EINVAL, match=match):
            guest.evtchn("close", port=port)


# -- VIRQs (16.4) ---------------------------------------------------------------------------


def test_per_vcpu_virq_binds_once_per_vcpu(hv, guest):
    on1 = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    on0 = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    assert status(guest, on1) == {"state": EVTCHNSTAT_virq, "vcpu": 1, "remote_dom": 0, "remote_port": 0, "virq": VIRQ_TIMER}
    assert [v.virq_to_evtchn[VIRQ_TIMER] for v in guest.domain.vcpus] == [on0, on1]
    with fails(hv, Errno.EEXIST, match="already bound on vCPU 1"):
        guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    guest.evtchn("close", port=on1)
    assert guest.domain.vcpus[1].virq_to_evtchn[VIRQ_TIMER] == 0
    assert guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1) == on1


@pytest.mark.parametrize(
    "virq, vcpu, errno, match",
    [
        (NR_VIRQS, 0, Errno.EINVAL, "not below NR_VIRQS"),
        (-1, 0, Errno.EINVAL, "not below NR_VIRQS"),
        (VIRQ_CONSOLE, 1, Errno.EINVAL, "global and binds on vCPU 0"),
        (VIRQ_ARGO, 1, Errno.EINVAL, "per-domain and binds on vCPU 0"),
        (VIRQ_DEBUG, 2, Errno.ENOENT, "no vCPU 2"),
        (VIRQ_CONSOLE, 0, Errno.EBUSY, "hardware domain"),
        (5, 0, Errno.EBUSY, "hardware domain"),  # unnamed VIRQs are global too
    ],
)
def test_bind_virq_errors(hv, guest, virq, vcpu, errno, match):
    with fails(hv, errno, match=match):
        guest.evtchn("bind_virq", virq=virq, vcpu=vcpu)


def test_per_domain_virq_can_move_and_its_close_clears_vcpu0s_table(guest):
    port = guest.evtchn("bind_virq", virq=VIRQ_ARGO, vcpu=0)
    guest.evtchn("bind_vcpu", port=port, vcpu=1)
    assert status(guest, port)["vcpu"] == 1 and guest.domain.vcpus[0].virq_to_evtchn[VIRQ_ARGO] == port
    guest.evtchn("close", port=port)
    assert guest.domain.vcpus[0].virq_to_evtchn[VIRQ_ARGO] == 0


def test_bind_pirq_is_refused_for_domus(hv, guest):
    with fails(hv, Errno.EPERM, match="physical IRQ 3"):
        guest.evtchn("bind_pirq", pirq=3)


@pytest.mark.parametrize("pirq", [NR_PIRQS, 2**31])
def test_bind_pirq_beyond_the_domains_pirqs_is_einval(hv, guest, pirq):
    """evtchn_bind_pirq checks pirq < d->nr_pirqs before the domain's IRQ permission."""
    with fails(hv, Errno.EINVAL, match=f"pirq {pirq} "):
        guest.evtchn("bind_pirq", pirq=pirq)


# -- bind_ipi, bind_vcpu ---------------------------------------------------------------------


def test_bind_ipi_to_a_missing_vcpu_is_enoent(hv, guest):
    with fails(hv, Errno.ENOENT):
        guest.evtchn("bind_ipi", vcpu=2)


def test_bind_vcpu_moves_later_delivery_but_not_what_is_pending(hv, guest, other):
    lport, rport = connect(guest, other)
    guest.mask(lport)
    other.evtchn("send", port=rport)  # pending, masked, nothing to vCPU 0
    guest.evtchn("bind_vcpu", port=lport, vcpu=1)
    guest.evtchn("unmask", port=lport)  # delivered to the new vCPU
    assert guest.pending_sel(1) == 1 and guest.upcall_pending(1) == 1 and guest.pending_sel(0) == 0
    assert hv.take_kicks() == [(guest.domid, 1)]
    other.evtchn("send", port=other.evtchn("alloc_unbound"))  # unbound: dropped
    guest.clear_pending(lport)
    guest.ack_upcall(1)
    other.evtchn("send", port=rport)
    assert guest.upcall_pending(1) == 1 and guest.upcall_pending(0) == 0


def test_bind_vcpu_on_an_unbound_port_sets_who_the_binding_notifies(guest, other):
    rport = other.evtchn("alloc_unbound", remote_dom=guest.domid)
    other.evtchn("bind_vcpu", port=rport, vcpu=1)
    lport = guest.evtchn("bind_interdomain", remote_dom=other.domid, remote_port=rport)
    guest.evtchn("send", port=lport)
    assert other.upcall_pending(1) == 1 and other.upcall_pending(0) == 0


def test_bind_vcpu_errors(hv, guest):
    ipi = guest.evtchn("bind_ipi", vcpu=0)
    timer = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=0)
    with fails(hv, Errno.ENOENT):  # the vCPU is checked before the port
        guest.evtchn("bind_vcpu", port=64, vcpu=2)
    with fails(hv, Errno.EINVAL, match="beyond"):
        guest.evtchn("bind_vcpu", port=64, vcpu=1)
    for port, match in ((ipi, "is ipi"), (timer, "per-vCPU VIRQ 0"), (9, "is free"), (0, "is reserved")):
        with fails(hv, Errno.EINVAL, match=match):
            guest.evtchn("bind_vcpu", port=port, vcpu=1)


# -- status, reset, unknown ops --------------------------------------------------------------


def test_status_errors_and_privilege(hv, guest, other):
    port = other.evtchn("alloc_unbound")
    with fails(hv, Errno.ESRCH):
        status(guest, 1, dom=4242)
    with fails(hv, Errno.EINVAL):  # the port is checked before the permission
        status(guest, 64, dom=other.domid)
    with fails(hv, Errno.EPERM, match="may not query"):
        status(guest, port, dom=other.domid)
    assert status(guest, port, dom=guest.domid)["state"] == EVTCHNSTAT_closed  # own numeric id
    guest.domain.privileged = True
    assert status(guest, port, dom=other.domid)["state"] == EVTCHNSTAT_unbound


def test_reset_closes_every_port_and_unbinds_peers(hv, guest, other):
    lport, rport = connect(guest, other)
    guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    guest.evtchn("bind_ipi", vcpu=0)
    assert guest.evtchn("reset") == 0
    assert all(c.state == ECS.FREE for c in guest.domain.evtchn[1:]) and guest.domain.evtchn[0].state == ECS.RESERVED
    assert guest.domain.vcpus[1].virq_to_evtchn[VIRQ_TIMER] == 0
    assert status(other, rport)["state"] == EVTCHNSTAT_unbound


def test_reset_of_another_domain_needs_privilege_and_a_paused_target(hv, guest, other):
    other.evtchn("alloc_unbound")
    with fails(hv, Errno.ESRCH):
        guest.evtchn("reset", dom=4242)
    with fails(hv, Errno.EPERM):
        guest.evtchn("reset", dom=other.domid)
    guest.domain.privileged = True
    with fails(hv, Errno.EINVAL, match="neither the caller nor paused"):
        guest.evtchn("reset", dom=other.domid)
    other.domain.paused = True
    guest.evtchn("reset", dom=other.domid)
    assert status(other, 1)["state"] == EVTCHNSTAT_closed


def test_unknown_ops_are_enosys(hv, guest):
    with fails(hv, Errno.ENOSYS):
        guest.evtchn("nonsense")


# -- the adapter's side: upcalls, multicall, destruction, audit -------------------------------


def test_deliver_upcall_masks_and_hints_the_ports_of_that_vcpu(hv, guest):
    assert guest.upcall_mask(0) == guest.upcall_mask(1) == 1  # as Xen's domain builder leaves them
    for vcpu in (0, 1):
        guest.set_upcall_mask(vcpu, 0)  # local_irq_enable
    mine = [guest.evtchn("bind_ipi", vcpu=0) for _ in range(2)]
    theirs = guest.evtchn("bind_ipi", vcpu=1)
    masked = guest.evtchn("bind_ipi", vcpu=0)
    guest.mask(masked)
    for port in (*mine, theirs, masked):
        guest.evtchn("send", port=port)
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=0) == mine
    assert guest.upcall_mask(0) == 1 and guest.upcall_pending(0) == 1
    with unchanged(hv):
        assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=0) is None  # masked now
    assert hv.toolstack("deliver_upcall", domid=guest.domid, vcpu=1) == [theirs]


def test_guest_handles_an_event_with_its_own_loads_and_atomics(hv, guest, other):
    """Linux's upcall over the simulated memory path: shared info mapped at a kernel va (as
    set_fixmap does), then clear upcall-pending, xchg the selector, read and clear the port."""
    lport, rport = connect(guest, other)
    pfn = guest.alloc()[0]
    l1, index = guest.direct_l1(pfn)
    guest.set_entry(l1, index, (guest.domain.shared_info_mfn << PAGE_SHIFT) | P | RW | A | D)
    va = guest.direct_va(pfn)
    other.evtchn("send", port=rport)
    assert guest.call("load", va=va, size=1) == {"value": 1}  # evtchn_upcall_pending
    guest.call("store", va=va, size=1, value=0)
    assert guest.call("atomic", operation="xchg", va=va + VCPU_INFO_PENDING_SEL, size=8, operand=0) == {"old": 1}
    word = va + SHARED_INFO_EVTCHN_PENDING
    assert guest.call("atomic", operation="fetch_and", va=word, size=8, operand=~(1 << lport) & (2**64 - 1)) == {"old": 1 << lport}
    assert not guest.pending(lport) and guest.pending_sel(0) == 0 and guest.upcall_pending(0) == 0
    other.evtchn("send", port=rport)  # the next event is delivered afresh
    assert guest.upcall_pending(0) == 1 and hv.take_kicks()[-1] == (guest.domid, 0)


def test_multicall_carries_event_channel_ops(hv, guest):
    results = guest.call("multicall", calls=[
        {"op": "event_channel_op", "args": {"cmd": "bind_ipi", "vcpu": 1}},
        {"op": "event_channel_op", "args": {"cmd": "send", "port": 1}},
        {"op": "event_channel_op", "args": {"cmd": "close", "port": 7}},
    ])
    assert results[:2] == [{"result": 1}, {"result": 0}]
    assert results[2]["errno"] == "EINVAL" and guest.pending(1)


def test_destroying_a_domain_closes_its_ports_and_unbinds_peers(hv, guest, other):
    lport, rport = connect(guest, other)
    loop = other.evtchn("alloc_unbound", remote_dom=guest.domid)
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert status(other, rport) == {"state": EVTCHNSTAT_unbound, "vcpu": 0, "remote_dom": guest.domid, "remote_port": 0, "virq": 0}
    assert status(other, loop)["state"] == EVTCHNSTAT_unbound
    assert other.evtchn("send", port=rport) == 0


def test_audit_finds_a_broken_port_table(hv, guest, other):
    lport, rport = connect(guest, other)
    timer = guest.evtchn("bind_virq", virq=VIRQ_TIMER, vcpu=1)
    peer = other.domain.evtchn[rport]
    peer.remote_port = 9
    guest.domain.vcpus[0].virq_to_evtchn[VIRQ_TIMER] = timer
    guest.domain.evtchn[lport].notify_vcpu_id = 7
    findings = audit(hv)
    assert any(f"dom{other.domid} port {rport} (interdomain) is bound to dom{guest.domid} port 9" in f for f in findings)
    assert any(f"virq_to_evtchn[{VIRQ_TIMER}] names port {timer}" in f for f in findings)
    assert any("notifies vCPU 7" in f for f in findings)
    peer.remote_port = lport
    guest.domain.vcpus[0].virq_to_evtchn[VIRQ_TIMER] = 0
    guest.domain.evtchn[lport].notify_vcpu_id = 0
    assert audit(hv) == []


def test_port_state_does_not_leak_between_hypervisors():
    """Each Hypervisor has its own port tables and kicks (nothing module-global)."""
    first, second = Hypervisor(nr_frames=1 << 12), Hypervisor(nr_frames=1 << 12)
    a, b = Guest(first, nr_pages=256), Guest(second, nr_pages=256)
    a.evtchn("send", port=a.evtchn("bind_ipi", vcpu=0))
    assert first.take_kicks() == [(a.domid, 0)] and second.take_kicks() == []
    assert b.evtchn("alloc_unbound") == 1


# -- random, partly hostile event-channel and scheduler traffic -------------------------------


WHO, VCPU = st.integers(0, 1), st.integers(0, 1)
DOMS = st.sampled_from(["self", "own", "other", 4242])
PORTS = st.one_of(st.integers(0, 12), st.sampled_from([40, 41, 63, 64]))
FRAMES = st.sampled_from([0, 1, 2, "other", "none"])


class EventStorm(RuleBasedStateMachine):
    """Two domains (caps below one bucket, so no op ever grows a table) issue random event
    channel, block, poll and timer calls and write mask and pending bits as guests do; they
    switch to the FIFO ABI and back (docs/xen.md section 24) on frames of their own or the
    other's, and consume their queues as Linux does. Invariants: audit is clean, a failed
    call changes nothing, and no wake-up is lost (a blocked vCPU has no deliverable upcall; a
    vCPU polling one port does not have it pending)."""

    @initialize()
    def boot(self):
        self.hv = Hypervisor(nr_frames=1 << 12)
        self.guests = [Guest(self.hv, nr_pages=128, max_evtchn_port=40) for _ in range(2)]

    def attempt(self, who, caller, op, **args):
        guest = self.guests[who]
        before = state_digest(self.hv)
        try:
            return self.hv.hypercall(guest.domid, caller, op, **args)
        except XenError as e:
            assert state_digest(self.hv) == before, f"failed {op} {args} changed the model: {e}"

    def evtchn(self, who, caller, cmd, **fields):
        if not self.guests[who].domain.vcpus[caller].blocked:  # a sleeping vCPU makes no calls
            self.attempt(who, caller, "event_channel_op", cmd=cmd, **fields)

    @rule(who=WHO, caller=VCPU, dom=DOMS, remote=DOMS)
    def alloc_unbound(self, who, caller, dom, remote):
        self.evtchn(who, caller, "alloc_unbound", dom=self.domid(who, dom), remote_dom=self.domid(who, remote))

    @rule(who=WHO, caller=VCPU, remote=DOMS, port=PORTS)
    def bind_interdomain(self, who, caller, remote, port):
        self.evtchn(who, caller, "bind_interdomain", remote_dom=self.domid(who, remote), remote_port=port)

    @rule(who=WHO, caller=VCPU, virq=st.sampled_from([VIRQ_TIMER, VIRQ_DEBUG, VIRQ_ARGO, VIRQ_CONSOLE, 24]), to=st.integers(0, 2))
    def bind_virq(self, who, caller, virq, to):
        self.evtchn(who, caller, "bind_virq", virq=virq, vcpu=to)

    @rule(who=WHO, caller=VCPU, to=st.integers(0, 2))
    def bind_ipi(self, who, caller, to):
        self.evtchn(who, caller, "bind_ipi", vcpu=to)

    @rule(who=WHO, caller=VCPU, port=PORTS, to=st.integers(0, 2))
    def bind_vcpu(self, who, caller, port, to):
        self.evtchn(who, caller, "bind_vcpu", port=port, vcpu=to)

    @rule(who=WHO, caller=VCPU, cmd=st.sampled_from(["send", "send", "send", "close", "unmask", "status"]), port=PORTS)
    def port_op(self, who, caller, cmd, port):
        self.evtchn(who, caller, cmd, port=port)

    @rule(who=WHO, port=PORTS, masked=st.booleans())
    def guest_masks(self, who, port, masked):
        self.guests[who].mask(port, masked)

    @rule(who=WHO, caller=VCPU, port=PORTS)
    def guest_handles(self, who, caller, port):
        """An upcall handler's writes: clear the port's pending bit and ack the vCPU."""
        self.guests[who].clear_pending(port)
        self.guests[who].ack_upcall(caller)

    @rule(who=WHO, caller=VCPU, to=st.integers(0, 2), frame=FRAMES, offset=st.sampled_from([0, 8, 4, 4024, 4032]))
    def init_control(self, who, caller, to, frame, offset):
        if self.guests[who].domain.vcpus[caller].blocked:
            return
        if self.attempt(who, caller, "event_channel_op", cmd="init_control", control_gfn=self.frame(who, frame), offset=offset, vcpu=to) is not None:
            self.guests[who].local_head = {key: 0 for key in self.guests[who].local_head if key[0] != to}  # init_control_block

    @rule(who=WHO, caller=VCPU, frame=FRAMES)
    def expand_array(self, who, caller, frame):
        self.evtchn(who, caller, "expand_array", array_gfn=self.frame(who, frame))

    @rule(who=WHO, caller=VCPU, port=PORTS, priority=st.sampled_from([0, 1, 7, 15, 16]))
    def set_priority(self, who, caller, port, priority):
        self.evtchn(who, caller, "set_priority", port=port, priority=priority)

    @rule(who=WHO, vcpu=VCPU)
    def guest_consumes_its_queues(self, who, vcpu):
        """An upcall handler under FIFO: ack the vCPU and consume its queues."""
        guest = self.guests[who]
        fifo = guest.domain.evtchn_fifo
        if fifo is not None and fifo.vcpus[vcpu].control_mfn:
            guest.ack_upcall(vcpu)
            guest.fifo_consume(vcpu)

    @rule(who=WHO, port=PORTS, masked=st.booleans())
    def guest_masks_its_event_word(self, who, port, masked):
        guest = self.guests[who]
        if guest.domain.evtchn_fifo is not None and port < guest.domain.evtchn_fifo.num_evtchns:
            word = guest.fifo_word(port)
            guest.set_fifo_word(port, word | 1 << 30 if masked else word & ~(1 << 30))

    def frame(self, who, which):
        """A frame for the FIFO ops: one of three of the guest's own pages, the other's, or none."""
        if which == "none":
            return 2**64 - 2
        guest = self.guests[who if which != "other" else 1 - who]
        return guest.mfn(guest.start_info["first_free_pfn"] + (which if isinstance(which, int) else 0))

    @rule(who=WHO, caller=VCPU, poll=st.none() | st.lists(PORTS, max_size=3), timeout=st.sampled_from([0, 5, 50]))
    def sleep(self, who, caller, poll, timeout):
        if self.guests[who].domain.vcpus[caller].blocked:
            return
        if poll is None:
            self.attempt(who, caller, "sched_op", cmd="block")
        else:
            self.attempt(who, caller, "sched_op", cmd="poll", ports=poll, timeout_ns=timeout and self.hv.sched.now_ns + timeout)

    @rule(who=WHO, caller=VCPU, delay=st.sampled_from([0, 3, 30]))
    def set_timer(self, who, caller, delay):
        if not self.guests[who].domain.vcpus[caller].blocked:
            self.attempt(who, caller, "set_timer_op", timeout_ns=self.hv.sched.now_ns + delay)

    @rule(step=st.sampled_from([1, 10, 100]))
    def time_passes(self, step):
        self.hv.advance_time(self.hv.sched.now_ns + step)
        self.hv.take_kicks()

    @rule(who=WHO)
    def reset_or_destroy(self, who):
        if self.guests[who].domain.vcpus[0].blocked:
            self.hv.toolstack("destroy_domain", domid=self.guests[who].domid)
            self.guests[who] = Guest(self.hv, nr_pages=128, max_evtchn_port=40)
        else:
            self.attempt(who, 0, "event_channel_op", cmd="reset")

    def domid(self, who, which):
        return {"self": DOMID_SELF, "own": self.guests[who].domid, "other": self.guests[1 - who].domid}.get(which, which)

    @invariant()
    def audit_is_clean_and_no_wakeup_is_lost(self):
        assert audit(self.hv) == []
        for guest in self.guests:
            for vcpu in guest.domain.vcpus:
                if vcpu.blocked:
                    assert not (guest.upcall_pending(vcpu.vcpu_id) and not guest.upcall_mask(vcpu.vcpu_id)), "lost wake-up"
                if vcpu.poll_evtchn > 0:
                    assert not port_is_pending(self.hv, guest.domain, vcpu.poll_evtchn), "a poller sleeps on a pending port"

    def teardown(self):
        for guest in self.guests:
            self.hv.toolstack("destroy_domain", domid=guest.domid)
        assert audit(self.hv) == [] and self.hv.next_deadline() is None


EventStorm.TestCase.settings = settings(
    max_examples=int(os.environ.get("XENSIM_STATEFUL_EXAMPLES", "100")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEventStorm = EventStorm.TestCase


def test_a_multicalls_failed_entries_are_counted_as_errors_of_their_op(hv, guest):
    """A guest meets -EBUSY inside a batch (the lazy-TLB race's remap) while the multicall
    itself succeeds: Stats must show that error, or a report puts 'hypercall errors 0' beside
    the kernel BUG it caused."""
    guest.call("multicall", calls=[
        {"op": "event_channel_op", "args": {"cmd": "close", "port": 7}},
        {"op": "event_channel_op", "args": {"cmd": "close", "port": 8}},
        {"op": "multicall", "args": {"calls": []}},
        {"op": "event_channel_op", "args": {"cmd": "bind_ipi", "vcpu": 1}},
    ])
    assert hv.stats[("multicall", "ok")] == 1
    assert hv.stats[("multicall/event_channel_op", "EINVAL")] == 2 and hv.stats[("multicall/multicall", "EINVAL")] == 1
    assert ("multicall/event_channel_op", "ok") not in hv.stats
