"""A vCPU's TLB: translations cached per virtual page, flushed only when someone says so.

Hardware keeps a translation until it is flushed, even after the pagetable entry behind it
changed; the guest must flush (mmuext flush ops, UVMF flags), and Xen flushes on its own only
where docs/xen.md section 10 says. Global entries (Xen makes user pages global, docs/xen.md section 2.5) survive the
kernel/user toggle but not a base-pointer load, which is a full flush in Xen (docs/xen.md section 8).
Entries are tagged with the guest mode whose base filled them, as Xen's PCIDs for a PV
guest's kernel and user halves tag them (PCID_PV_PRIV/PCID_PV_USER); a non-global entry serves
only its own mode. Each entry also remembers where it came from (base, L1 frame, slot and the
entry's value), which is what lets `cpu` tell a stale hit cheaply.
A bounded capacity with FIFO eviction keeps it finite, deterministically.
"""

from dataclasses import dataclass

import numpy as np

from .abi import PAGE_SHIFT

DEFAULT_CAPACITY = 1536


@dataclass(slots=True)
class TlbEntry:
    mfn: int
    flags: int  # the walk's effective flags: RW and USER ANDed over the levels, D and G of the L1e
    is_global: bool
    user: bool  # filled by a user-mode walk (of the user base) or a kernel-mode one
    root: int = 0  # the base (L4 mfn) the walk started from
    l1: int = 0  # the L1 frame and slot of the entry that mapped the page, and its value
    slot: int = 0
    pte: int = 0


class Tlb:
    """Virtual page -> cached translation, with a reverse index by mfn for Xen's flushes."""

    __slots__ = ("capacity", "entries", "_by_mfn")

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.entries: dict[int, TlbEntry] = {}
        self._by_mfn: dict[int, set[int]] = {}

    def lookup(self, vpn: int) -> TlbEntry | None:
        return self.entries.get(vpn)

    def fill(self, vpn: int, entry: TlbEntry) -> None:
        self._drop(vpn)
        if len(self.entries) >= self.capacity:
            self._drop(next(iter(self.entries)))
        self.entries[vpn] = entry
        self._by_mfn.setdefault(entry.mfn, set()).add(vpn)

    def _drop(self, vpn: int) -> None:
        entry = self.entries.pop(vpn, None)
        if entry is not None:
            vpns = self._by_mfn[entry.mfn]
            vpns.discard(vpn)
            if not vpns:
                del self._by_mfn[entry.mfn]

    def invlpg(self, va: int) -> None:
        self._drop(va >> PAGE_SHIFT)

    def flush(self, keep_global: bool = False) -> None:
        if not keep_global:
            self.entries.clear()
            self._by_mfn.clear()
            return
        for vpn in [vpn for vpn, e in self.entries.items() if not e.is_global]:
            self._drop(vpn)

    def forget_mfn(self, mfn: int) -> None:
        """Drop every translation to `mfn` (Xen's safety flush when a frame changes type)."""
        for vpn in list(self._by_mfn.get(mfn, ())):
            self._drop(vpn)

    def maps(self, mfn: int) -> bool:
        return mfn in self._by_mfn

    def mapped(self, mfns: np.ndarray) -> list[int]:
        """Which of `mfns` some cached translation maps: the work of the TLB's size, not theirs."""
        if not self._by_mfn:
            return []
        cached = np.fromiter(self._by_mfn, dtype=np.int64, count=len(self._by_mfn))
        return cached[np.isin(cached, mfns)].tolist()

    def __len__(self) -> int:
        return len(self.entries)
