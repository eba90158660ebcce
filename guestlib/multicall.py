"""Linux's multicall batching (arch/x86/xen/multicalls.c; docs/linux.md section 4.3) on guestlib.

    async with xen_mc_batch(client) as mc:      # xen_mc_batch()
        pin = mc.pin_table(4, l4)                # __xen_mc_entry + MULTI_mmuext_op
        mc.callback(set_current_cr3, cr3)        # xen_mc_callback(fn, data)
    # xen_mc_issue(): one HYPERVISOR_multicall; then the callbacks, in queue order
    pin.result()

Entries reach Xen in queue order as one multicall, a failing entry does not stop the rest,
and, as xen_mc_flush does, failures are logged (Linux WARNs) rather than raised: the caller
looks at an entry's Pending, or at a callback given that Pending, when it cares. Linux
flushes early when its 32 slots fill; here a batch only splits into several multicalls (in
one Session message) beyond Xen's MAX_BATCH entries. Linux's xen_mc_extend_args, which merges
consecutive mmu_updates into one entry to save slots, has no purpose here: a single
`mc.mmu_update` already takes a whole list.
"""

import logging

from xensim.v1 import hypercalls_pb2

from .hypercalls import HypercallClient, Op, Pending, QueuedCalls, ops

MAX_BATCH = 4096  # entries per multicall (common.proto, Limits)
_HYPERCALLS = frozenset(f.name for f in hypercalls_pb2.MulticallEntry.DESCRIPTOR.oneofs_by_name["call"].fields)
log = logging.getLogger(__name__)


class MulticallBatch(QueuedCalls):
    """Hypercalls queued as entries of one HYPERVISOR_multicall; see the module docstring."""

    def __init__(self, client: HypercallClient):
        super().__init__()
        self._client = client

    def _issue(self, op: Op) -> Pending:
        if op.kind not in _HYPERCALLS:
            raise TypeError(f"{op.kind} cannot be a multicall entry: only hypercalls can ({', '.join(sorted(_HYPERCALLS))})")
        return super()._issue(op)

    async def _send(self, pendings: list[Pending]) -> None:
        chunks = [pendings[i : i + MAX_BATCH] for i in range(0, len(pendings), MAX_BATCH)]
        multicalls = await self._client.submit([ops.multicall([p.op for p in chunk]) for chunk in chunks])
        for chunk, multicall in zip(chunks, multicalls, strict=True):
            for pending, entry in zip(chunk, multicall.result(), strict=True):
                pending._result = entry._result
        failed = [(i, p.op.kind, error) for i, p in enumerate(pendings) if (error := p.exception()) is not None]
        for entry in failed:
            log.warning("multicall entry %d (%s) failed: %s", *entry)
        if failed:
            log.warning("%d of %d multicall entries failed", len(failed), len(pendings))


def xen_mc_batch(client: HypercallClient) -> MulticallBatch:
    """Start a multicall batch on client; it is issued when its `async with` block ends."""
    return MulticallBatch(client)
