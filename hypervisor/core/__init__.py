"""The sans-I/O model of Xen's PV MMU: hypercalls in, results or `XenError` out.

Theory of operation. Machine memory is a set of 4 KiB frames; the frame table records for
each its owner, its type and the references held on it (see `frames` for who holds which).
A guest may map only frames it owns; a frame is either writable data or a pagetable, never
both while referenced; loading a base pointer takes a type reference of the top level on the
table (an L4, or a 32-bit PAE guest's L3: each domain has a paging mode, `paging`), which
validates the whole tree if nothing held it yet, and pinning holds such a reference for as long
as the guest likes, so that loads of a pinned table cost O(1). Unpinning is never refused,
even while another vCPU still runs on the table: that is the guest's problem to avoid (Linux's
drop_mm_ref), and the model shows its consequence exactly as Xen does, by refusing to make any
frame of the still-live tree writable (-EBUSY).

Nothing here does I/O, reads a clock or starts a thread: the same calls in the same order give
the same state, so the model can be traced, replayed, fuzzed and benchmarked without a
network. Every call enters through `Hypervisor.hypercall` or `Hypervisor.toolstack`. A long
hypercall stops after a bounded, counted amount of work and answers a `Continuation`, which
`Hypervisor.resume` goes on with once the caller has let other calls run (preempt.py).
"""

from .audit import audit, audit_domain
from .cpu import PageFault
from .errors import SimulatorBug, VcpuNotRunning, XenError
from .hypervisor import Hypervisor
from .preempt import Continuation
from .sched import BLOCKED

__all__ = ["BLOCKED", "Continuation", "Hypervisor", "PageFault", "SimulatorBug", "VcpuNotRunning", "XenError", "audit", "audit_domain"]
