"""guestlib: the guest side of xensim, a trio client of the hypervisor's Hypercalls service.

One process per vCPU: `connect()` opens its Session and gives a `HypercallClient` (typed
hypercalls and memory accesses, `batch()`/`submit()` to put many calls in one message);
`xen_mc_batch` batches like Linux's multicalls, `EventChannels` dispatches upcalls (2-level;
`FifoEventChannels` for the FIFO ABI), and
`Toolstack` is the admin's client. guestlib imports only the wire contract (xensim.v1), grpc
and trio, never the hypervisor: a guest may run on another host.
"""

from .events import EventChannels, FifoEventChannels
from .hypercalls import CallRejected, CallSkipped, HypercallClient, PageFault, Pending, XenError, connect, ops
from .multicall import xen_mc_batch
from .toolstack import Toolstack
from .transport import SessionClosed

__all__ = [
    "CallRejected",
    "CallSkipped",
    "EventChannels",
    "FifoEventChannels",
    "HypercallClient",
    "PageFault",
    "Pending",
    "SessionClosed",
    "Toolstack",
    "XenError",
    "connect",
    "ops",
    "xen_mc_batch",
]
