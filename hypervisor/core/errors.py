"""How a hypercall fails: `XenError` is the guest's errno; `VcpuNotRunning` is a call that
could not have been made; `SimulatorBug` is ours.

A guest must never see a bug of the simulator as an errno: the adapter turns
`SimulatorBug` (and any other exception) into a loud INTERNAL status, never into a Xen error.
"""

from .abi import Errno


class XenError(Exception):
    """A hypercall failed the way Xen fails it: an errno and a message naming the rule.

    For batched calls (mmu_update, mmuext_op) `index` is the failing entry and `done` the
    number of entries committed before it, which is what Xen writes to `*pdone`.
    """

    def __init__(self, errno: Errno, message: str, *, index: int | None = None, done: int | None = None):
        super().__init__(message)
        self.errno = Errno(errno)
        self.message = message
        self.index = index
        self.done = done

    def at(self, index: int, what: str) -> "XenError":
        """The same failure, placed at entry `index` of a batch (entries before it are done)."""
        return XenError(self.errno, f"{what} entry {index}: {self.message}", index=index, done=index)

    def __reduce__(self):
        """Pickle by the constructor's own arguments (a continuation may hold one in a snapshot,
        trace.py): an Exception pickles only its `args`, which here lack the errno."""
        return XenError, (self.errno, self.message), {"index": self.index, "done": self.done}

    def __repr__(self) -> str:
        return f"XenError({self.errno.name}, {self.message!r})"

    def __str__(self) -> str:
        return f"-{self.errno.name}: {self.message}"


class VcpuNotRunning(Exception):
    """A call from a vCPU that Xen does not run: one that is down (never brought up, or after
    VCPUOP_down) or whose domain has shut down. Not an errno: in Xen such a vCPU executes
    nothing, so there is no hypercall to fail; the call simply never happened. The adapter
    answers it with a refusal of its own (the message says why the vCPU is stopped and what
    brings it back)."""


class Restart(Exception):
    """Xen's -ERESTART inside the model: work stopped at a preemption point with its progress
    kept (PGT_partial, see frames.py) and the call is to be re-entered (preempt.py). Never
    reaches a guest: the hypercall answers a continuation instead. `at` is where the call goes
    on (for a batch, `start`: the entry to do next); empty, it starts over, which a call that
    stopped before committing anything may."""

    def __init__(self, **at):
        super().__init__(at)
        self.at = at


class SimulatorBug(AssertionError):
    """An internal invariant broke (for example a frame freed with type references left)."""
