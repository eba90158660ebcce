"""Preemption: long work stops at a clean point and goes on later, as Xen's continuations do.

Theory of operation. Xen bounds the work one hypercall does before it lets the CPU go, not the
number of operations a guest asks for. do_mmu_update, do_mmuext_op (xen/arch/x86/mm.c) and
do_multicall (xen/common/multicall.c) call hypercall_preempt_check() before every entry but the
first; promote_l2/l3/l4_table and demote_l2/l3/l4_table (mm.c) call it between entries of one
table and, when it fires, record how far they got (nr_validated_ptes, PGT_partial). The
hypercall then answers -ERESTART internally: hypercall_create_continuation makes the guest
re-issue the same hypercall for what is left (mmu_update and mmuext_op with the remaining count
| MMU_UPDATE_PREEMPTED and the done count kept in *pdone; a multicall from the entry it stopped
in, that entry rewritten into its own continuation). The guest sees one call and its final
result.

The model does the same, with two differences that keep it deterministic:

- Work is counted, not timed (`Budget`, units in abi.py): every entry into the core gets
  abi.PREEMPT_WORK of it. The same calls therefore stop at the same points, and a trace replays
  exactly.
- The continuation is a value, not rewritten guest registers: a preemptible hypercall
  (`PREEMPTIBLE` in hypervisor.py) that stops answers a `Continuation`, which the caller (the
  server's adapter) hands back to `Hypervisor.resume` once other calls have run. Resuming
  re-enters the handler with the call's own arguments plus where it stopped (`at`), so done
  counts and error indexes are the whole call's, as Xen's *pdone makes them.

A put that would devalidate a tree stops part-way the same way; the vCPU keeps the table in
`old_guest_table` (Xen's field) and the call is not finished until that table's teardown is:
preemptible calls go on with it first when they are entered (put_old_guest_table in Xen).
"""

from dataclasses import dataclass, field
from typing import Any

from .abi import PREEMPT_WORK


class Budget:
    """Xen's hypercall_preempt_check, counting work: `start` on entry into the core, `charge`
    as work is done, `spent` when this entry has had its share."""

    def __init__(self, per_call: int = PREEMPT_WORK):
        self.per_call = per_call
        self.work = 0  # every charge ever made: the adapter also paces calls by it
        self.end = per_call  # `work` at which this entry's share is spent

    def start(self) -> None:
        self.end = self.work + self.per_call

    def charge(self, work: int) -> None:
        self.work += work

    def spent(self) -> bool:
        return self.work >= self.end


@dataclass(eq=False)
class Continuation:
    """A hypercall that stopped at a preemption point, to be passed to `Hypervisor.resume`.

    `args` are the call's own arguments; `at` says where it goes on (merged into them on
    re-entry: `start`, the first batch entry not done; for a multicall also the `results` so far
    and the `inner` continuation of the entry it stopped in). `outcome`, once set, is the call's
    answer, held back until the vCPU's old_guest_table has been torn down: ("result", value)
    or ("error", XenError).
    """

    op: str
    args: dict
    at: dict = field(default_factory=dict)
    outcome: tuple[str, Any] | None = None

    def summary(self) -> dict:
        """What the trace records of it: where the call stopped (its arguments are in the
        record of the call itself)."""
        out: dict = {"op": self.op}
        if "start" in self.at:
            out["start"] = self.at["start"]
        if self.at.get("inner") is not None:
            out["inner"] = self.at["inner"].summary()
        if self.outcome is not None:
            kind, value = self.outcome
            out["outcome"] = value.errno.name if kind == "error" else kind
        return out
