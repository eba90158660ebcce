"""The per-domain counts the toolstack reads, the audit of one domain, and what a destroyed
domain leaves for the next one.

frames.py keeps each owner's frame counts (Xen's d->tot_pages and d->xenheap_pages), which
ListDomains reads instead of scanning the frame table; audit recomputes them. `audit_domain`
reports, at the cost of one domain's frames, exactly the findings whose subject is that
domain (audit.py), which these tests check against the whole-machine audit on a machine
damaged in many ways at once. Destruction scrubs only the frames that were ever written, so
the test of isolation is that a frame freed and given to another domain reads zeros.
"""

import numpy as np
import pytest

from hypervisor.core import Hypervisor, XenError, audit, audit_domain, views
from hypervisor.core.abi import DOMID_XEN, PAGE_SHIFT, Errno, Pte
from hypervisor.core.audit import findings
from hypervisor.core.memory import MachineMemory

from .guest import Guest

RO_DATA = int(Pte.PRESENT | Pte.ACCESSED | Pte.DIRTY)


def _by_subject(hv) -> dict:
    """The whole-machine audit's findings, per subject (None: the machine's own)."""
    out: dict = {}
    for subject, message in findings(hv):
        out.setdefault(subject, []).append(message)
    return out


def _data_frames(hv, guest: Guest, n: int) -> list[int]:
    """`n` frames of the guest that hold no pagetable and nothing the builder wrote."""
    pfns = range(guest.next_pfn + 64, guest.next_pfn + 64 + n)
    return [guest.mfn(pfn) for pfn in pfns]


def _boot_l1_slot(hv, guest: Guest, pfn: int) -> tuple[int, int]:
    """The boot pagetable's L1 and slot mapping `pfn` in the direct map."""
    return guest.direct_l1(pfn)


# -- the counts ------------------------------------------------------------------------------


def test_each_owners_frame_counts_follow_create_destroy_and_quarantine():
    hv = Hypervisor(nr_frames=1 << 14)
    frames = hv.frames
    assert (frames.tot_pages[DOMID_XEN], frames.xenheap_pages[DOMID_XEN]) == (0, 16)
    a, b = Guest(hv, nr_pages=2048), Guest(hv, nr_pages=1024)
    for guest, pages in ((a, 2048), (b, 1024)):
        assert (hv.tot_pages(guest.domid), frames.xenheap_pages[guest.domid]) == (pages, 1)
        assert views.domain_info(hv, hv.domains[guest.domid])["tot_pages"] == pages
    with pytest.raises(XenError) as failed:
        hv.toolstack("create_domain", nr_pages=1 << 14)
    assert failed.value.errno == Errno.ENOMEM
    assert int(frames.tot_pages.sum()) == 3072 and int(frames.xenheap_pages.sum()) == 18, "a failed create owns nothing"
    _, mfn = a.alloc()
    assert frames.get_page(mfn, a.domid)  # a reference nobody holds: destruction quarantines the frame
    result = hv.toolstack("destroy_domain", domid=a.domid)
    assert result["quarantined_frames"] == [mfn]
    assert (hv.tot_pages(a.domid), frames.xenheap_pages[a.domid]) == (0, 0)
    assert frames.tot_pages[DOMID_XEN] == 1, "the quarantined frame is Xen's now"
    assert all("quarantined" in f for f in audit(hv)), "the counts agree with the frame table"
    hv.toolstack("destroy_domain", domid=b.domid)
    assert int(frames.tot_pages.sum()) == 1 and int(frames.xenheap_pages.sum()) == 16


def test_audit_reports_a_count_that_disagrees_with_the_frame_table():
    hv = Hypervisor(nr_frames=1 << 14)
    a, b = Guest(hv), Guest(hv)
    hv.frames.tot_pages[a.domid] += 1
    stray = int(np.flatnonzero(hv.frames.owner == -1)[-1])
    hv.frames.owner[stray] = b.domid  # a frame that became b's behind the counts' back
    found = _by_subject(hv)
    assert found[a.domid] == [f"dom{a.domid}: tot_pages is 2049, but it owns 2048 such frames"]
    assert found[b.domid] == [f"dom{b.domid}: tot_pages is 2048, but it owns 2049 such frames"]
    assert audit_domain(hv, a.domid) == found[a.domid] and audit_domain(hv, b.domid) == found[b.domid]


# -- the audit of one domain -------------------------------------------------------------------


def test_the_audit_of_each_domain_finds_exactly_the_whole_audits_findings_about_it():
    """Damage three domains in a dozen ways, then compare each domain's audit with the whole
    machine's findings about it, one by one and in order."""
    hv = Hypervisor(nr_frames=1 << 15)
    a, b, c = Guest(hv), Guest(hv), Guest(hv)
    frames, memory = hv.frames, hv.memory
    a_data = _data_frames(hv, a, 4)
    frames.count[a_data[0]] += 1  # an extra general reference
    frames.type_count[a.l4] += 1  # an extra type reference on the pinned boot L4
    l1, slot = _boot_l1_slot(hv, a, a.next_pfn + 2)
    memory.frame(l1)[slot] = (a.l4 << PAGE_SHIFT) | int(Pte.PRESENT | Pte.RW | Pte.USER)  # its L4 mapped writable
    hv.domains[a.domid].p2m[7] = hv.domains[a.domid].p2m[8]  # two pfns on one mfn
    hv.m2p[a_data[1]] = 0x1234
    # b's boot L1 maps a frame of a: its translation reaches a foreign frame, and a's frame
    # has the count b's entry accounts for, so only b is at fault.
    l1, slot = _boot_l1_slot(hv, b, b.next_pfn + 3)
    memory.frame(l1)[slot] = (a_data[2] << PAGE_SHIFT) | RO_DATA | int(Pte.USER)
    frames.count[a_data[2]] += 1
    frames.count[b.mfn(b.next_pfn + 3)] -= 1
    memory.frame(b.l4)[260] ^= 1 << PAGE_SHIFT  # one of Xen's slots of a validated L4
    frames.tot_pages[b.domid] -= 1
    hv.domains[c.domid].vcpus[1].guest_table = _data_frames(hv, c, 1)[0]  # a base that is no L4
    frames.linear[c.l4] = -1
    found = _by_subject(hv)
    assert set(found) == {a.domid, b.domid, c.domid}, found
    for guest in (a, b, c):
        assert audit_domain(hv, guest.domid) == found[guest.domid]
    assert any(f"reaches mfn {a_data[2]:#x} owned by dom{a.domid}" in f for f in found[b.domid]), "the cross-domain finding is b's"
    assert any(f"mfn {a.l4:#x} writable but its type is L4" in f for f in found[a.domid]), "an L1's finding is its owner's"
    assert not any(f"{a_data[2]:#x}" in f for f in found[a.domid]), found[a.domid]
    assert sum(map(len, found.values())) == len(audit(hv))


def test_a_privileged_domains_mapping_of_a_foreign_frame_is_counted_in_the_frames_domain_audit():
    """Only the privileged may map another domain's frames; the audit of that domain accounts
    for the privileged domain's entry, or the frame's count would look wrong."""
    hv = Hypervisor(nr_frames=1 << 14)
    a, dom0 = Guest(hv), Guest(hv)
    hv.domains[dom0.domid].privileged = True
    target = _data_frames(hv, a, 1)[0]
    l1, slot = _boot_l1_slot(hv, dom0, dom0.next_pfn + 5)
    assert dom0.mmu_update([(l1 << PAGE_SHIFT) + 8 * slot, (target << PAGE_SHIFT) | RO_DATA], foreigndom=a.domid) == 1
    assert audit(hv) == []
    assert audit_domain(hv, a.domid) == [] and audit_domain(hv, dom0.domid) == []
    hv.frames.count[target] += 1
    assert audit_domain(hv, a.domid) == _by_subject(hv)[a.domid] == [
        f"mfn {target:#x} (owned by dom{a.domid}, WRITABLE): general count is 4, holders account for 3"
    ]


def test_auditing_an_unknown_domain_is_esrch():
    hv = Hypervisor(nr_frames=1 << 14)
    with pytest.raises(XenError) as missing:
        audit_domain(hv, 9)
    assert missing.value.errno == Errno.ESRCH


# -- what destruction leaves -------------------------------------------------------------------


def test_a_frame_freed_and_given_to_another_domain_reads_zeros():
    """The first domain writes most of the machine, through its vCPU and as its builder did;
    the second gets those frames back and must read zeros in every one it did not build."""
    hv = Hypervisor(nr_frames=1 << 14)
    first = Guest(hv, nr_pages=12000)
    written = []
    for pfn in range(first.next_pfn, 12000, 7):
        assert first.store(first.direct_va(pfn), 0x5EC2E7 + pfn) is None
        written.append(first.mfn(pfn))
    hv.toolstack("destroy_domain", domid=first.domid)
    second = Guest(hv, nr_pages=12000)
    reused = [mfn for mfn in written if hv.frames.owner[mfn] == second.domid and hv.m2p[mfn] >= second.next_pfn]
    assert len(reused) > 1000, "the second domain must get the first one's frames back"
    assert not any(hv.memory.entries(mfn).any() for mfn in reused)
    for mfn in reused[::50]:
        assert second.load(second.direct_va(int(hv.m2p[mfn]))) == 0


@pytest.mark.parametrize("stored", [5, 3000])
def test_scrubbing_many_frames_scrubs_exactly_those(stored):
    """Whichever is smaller, the frames to scrub or the frames ever written, is walked."""
    memory = MachineMemory(1 << 14)
    for mfn in range(0, 2 * stored, 2):
        memory.write(mfn, 0, b"x")
    memory.scrub_many(np.arange(0, 2000, dtype=np.int64))
    assert sorted(mfn for mfn, _ in memory.stored()) == [mfn for mfn in range(0, 2 * stored, 2) if mfn >= 2000]


def test_destroy_scrubs_only_what_was_written():
    """A 48 MiB guest writes a few frames; its destruction touches those, not all 12289."""
    hv = Hypervisor(nr_frames=1 << 14)
    guest = Guest(hv, nr_pages=12000)
    popped = []
    pop = hv.memory._frames.pop
    hv.memory._frames = type("Spy", (dict,), {"pop": lambda self, *a: (popped.append(a[0]), pop(*a))[1]})(hv.memory._frames)
    stored = hv.memory.stored_frames
    hv.toolstack("destroy_domain", domid=guest.domid)
    assert hv.memory.stored_frames == 0
    assert len(popped) <= stored, f"{len(popped)} frames scrubbed, {stored} were ever written"
