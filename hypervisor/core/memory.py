"""Machine memory: 4 KiB frames stored sparsely, each as 512 little-endian 64-bit words.

A frame that was never written reads as zeros and costs nothing, so a host with many large
guests stays small. Pagetable code sees a frame as a numpy array of 512 entries, which is what
lets validation work on a whole frame at once; byte access views the same array.
"""

import numpy as np

from .abi import ENTRIES_PER_TABLE, PAGE_SIZE

_ZERO = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
_ZERO.flags.writeable = False


class MachineMemory:
    """The contents of every machine frame, keyed by mfn."""

    def __init__(self, nr_frames: int):
        self.nr_frames = nr_frames
        self._frames: dict[int, np.ndarray] = {}

    def entries(self, mfn: int) -> np.ndarray:
        """The frame's 512 words for reading (a shared read-only zero frame if never written)."""
        return self._frames.get(mfn, _ZERO)

    def frame(self, mfn: int) -> np.ndarray:
        """The frame's 512 words for writing; the frame becomes stored."""
        words = self._frames.get(mfn)
        if words is None:
            words = self._frames[mfn] = np.zeros(ENTRIES_PER_TABLE, dtype=np.uint64)
        return words

    def read(self, mfn: int, offset: int, length: int) -> bytes:
        return self.entries(mfn).view(np.uint8)[offset : offset + length].tobytes()

    def write(self, mfn: int, offset: int, data: bytes) -> None:
        self.frame(mfn).view(np.uint8)[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def snapshot(self, mfn: int) -> np.ndarray | None:
        """A copy of the frame's contents (None for a frame never written), for `restore`."""
        words = self._frames.get(mfn)
        return None if words is None else words.copy()

    def restore(self, mfn: int, snapshot: np.ndarray | None) -> None:
        if snapshot is None:
            self.scrub(mfn)
        else:
            self.frame(mfn)[:] = snapshot

    def stored(self):
        """(mfn, words) of every stored frame that is not all zeros, in mfn order."""
        return ((mfn, self._frames[mfn]) for mfn in sorted(self._frames) if self._frames[mfn].any())

    def scrub(self, mfn: int) -> None:
        """Zero a frame (it reads as zeros again and stops costing memory)."""
        self._frames.pop(mfn, None)

    def scrub_many(self, mfns: np.ndarray) -> None:
        """`scrub` every frame of `mfns`, at the cost of those that were ever written (the
        others read as zeros already), whichever of the two sets is smaller."""
        if len(mfns) <= len(self._frames):
            for mfn in mfns.tolist():
                self._frames.pop(mfn, None)
            return
        stored = np.fromiter(self._frames, dtype=np.int64, count=len(self._frames))
        for mfn in stored[np.isin(stored, mfns)].tolist():
            del self._frames[mfn]

    def copy(self, dst: int, src: int) -> None:
        source = self._frames.get(src)
        if source is None:
            self.scrub(dst)
        else:
            self.frame(dst)[:] = source

    @property
    def stored_frames(self) -> int:
        return len(self._frames)


assert PAGE_SIZE == ENTRIES_PER_TABLE * 8
