"""The PV MMU hypercalls: mmu_update, mmuext_op, update_va_mapping (docs/xen.md sections 4 to 8, 10).

Organised as Xen's mm.c is: each hypercall is a loop over its requests that calls one checked
primitive per entry; a failing entry raises with nothing of its own committed, the entries
before it stay done (Xen's `*pdone`), and nothing after it runs. mmu_update and mmuext_op are
preemptible (preempt.py): before every entry but the first they stop if the call's work is
spent or a put left a table to tear down, and an entry whose validation stopped part-way is
retried when the call goes on; `start` is where a continued call goes on.
"""

from typing import TYPE_CHECKING

from .abi import (
    DOMID_IO,
    DOMID_SELF,
    DOMID_XEN,
    PAGE_SHIFT,
    STEP_WORK,
    UVMF_ALL,
    UVMF_FLUSHTYPE_MASK,
    UVMF_INVLPG,
    UVMF_TLB_FLUSH,
    Errno,
    MmuCmd,
    MmuextCmd,
    PageType,
)
from .domain import Domain, Vcpu, install_compat_base
from .errors import Restart, XenError
from .walk import copy_from_guest, walk_entries

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

_PIN_LEVEL = {
    MmuextCmd.PIN_L1_TABLE: PageType.L1,
    MmuextCmd.PIN_L2_TABLE: PageType.L2,
    MmuextCmd.PIN_L3_TABLE: PageType.L3,
    MmuextCmd.PIN_L4_TABLE: PageType.L4,
}
MAX_LDT_ENTRIES = 8192


def get_pg_owner(hv: "Hypervisor", caller: Domain, domid: int) -> int:
    """Xen's get_pg_owner: the domain whose frames a call names (docs/xen.md section 0.3 quirk)."""
    if domid == DOMID_SELF:
        return caller.domid
    if domid == caller.domid:
        raise XenError(Errno.ESRCH, f"dom{domid} is the caller: cannot name itself as foreign domain (use DOMID_SELF)")
    if domid in (DOMID_IO, DOMID_XEN):
        return domid
    if domid not in hv.domains:
        raise XenError(Errno.ESRCH, f"foreign domain {domid} does not exist")
    return domid


def _privilege_error(caller: Domain, *owners: int) -> XenError | None:
    """The XSM dummy policy: an unprivileged caller acts on its own frames only."""
    for owner in owners:
        if owner not in (caller.domid, DOMID_IO) and not caller.privileged:
            return XenError(Errno.EPERM, f"dom{caller.domid} may not act on frames of dom{owner}")
    return None


def _check_foreign_privilege(caller: Domain, *owners: int) -> None:
    error = _privilege_error(caller, *owners)
    if error is not None:
        raise error


# -- mmu_update ----------------------------------------------------------------------------


def stop_before(hv: "Hypervisor", vcpu: Vcpu, i: int, start: int) -> bool:
    """Whether a batch stops before entry `i` (do_mmu_update, do_mmuext_op, do_multicall):
    never before its first entry in this run, else when the call's work is spent or a put left
    a table to tear down. Charges the entry's own work when it runs."""
    budget = hv.budget  # a batch always runs preemptibly: check the budget itself, cheaply
    if i > start and (budget.work >= budget.end or vcpu.old_guest_tables):
        return True
    budget.work += STEP_WORK
    return False


def mmu_update(hv: "Hypervisor", vcpu: Vcpu, reqs: list, foreigndom: int = DOMID_SELF, start: int = 0) -> int:
    """HYPERVISOR_mmu_update: returns the number of requests done (docs/xen.md section 4)."""
    caller = hv.domains[vcpu.domid]
    pfd = (foreigndom >> 16) & 0xFFFF
    if pfd:
        if pfd - 1 not in hv.domains:
            raise XenError(Errno.ESRCH, f"pagetable owner dom{pfd - 1} does not exist", done=start)
        pt_owner = pfd - 1
    else:
        pt_owner = caller.domid
    try:
        pg_owner = get_pg_owner(hv, caller, foreigndom & 0xFFFF)
    except XenError as e:
        raise XenError(e.errno, e.message, done=start) from None
    flush = False
    privileged: XenError | None | bool = False  # the XSM check, made at the first PT update
    try:
        for i in range(start, len(reqs)):
            if stop_before(hv, vcpu, i, start):
                raise Restart(start=i)
            ptr, val = reqs[i]
            cmd = ptr & 7
            try:
                if cmd == MmuCmd.MACHPHYS_UPDATE:
                    _machphys_update(hv, caller, ptr, val, pt_owner, pg_owner)
                elif cmd in (MmuCmd.NORMAL_PT_UPDATE, MmuCmd.PT_UPDATE_PRESERVE_AD, MmuCmd.PT_UPDATE_NO_TRANSLATE):
                    if privileged is False:  # the same owners for every entry: check once
                        privileged = _privilege_error(caller, pg_owner, pt_owner)
                    if privileged is not None:
                        raise privileged
                    flush |= _pt_update(hv, ptr - cmd, val, pt_owner, pg_owner, cmd == MmuCmd.PT_UPDATE_PRESERVE_AD)
                else:
                    raise XenError(Errno.ENOSYS, f"unknown mmu_update command {cmd}")
            except Restart:
                raise Restart(start=i) from None
            except XenError as e:
                raise e.at(i, "mmu_update") from None
    finally:
        if flush:  # an L2..L4 entry changed: Xen flushes the pagetable owner's vCPUs (4.3)
            for other in hv.domains[pt_owner].vcpus:
                other.tlb.flush()
    return len(reqs)


def _pt_update(hv: "Hypervisor", addr: int, val: int, pt_owner: int, pg_owner: int, preserve_ad: bool) -> bool:
    """One MMU_NORMAL_PT_UPDATE: a checked entry update if the frame is a live pagetable,
    otherwise a plain memory write. Returns whether an upper-level entry changed.

    Xen holds a general reference on the target for the duration (get_page_from_mfn ...
    put_page); for a frame its owner has allocated that reference can neither fail nor free
    anything, so checking ownership is all it does here, and the hot path stays short."""
    frames = hv.frames
    mfn, slot = addr >> PAGE_SHIFT, (addr & 0xFFF) >> 3
    if not (mfn < frames.nr_frames and frames.owner.item(mfn) == pt_owner and frames.count.item(mfn)):
        raise XenError(Errno.EINVAL, f"target mfn {mfn:#x} is {frames.describe_owner(mfn)}, not dom{pt_owner}")
    kind = frames.locked_type(mfn)
    if kind == PageType.WRITABLE:
        hv.memory.frame(mfn)[slot] = val
        return False
    if kind is not None:
        level = hv.pagetables.level_of(mfn, kind)
        if level is None:
            raise XenError(Errno.EINVAL, f"target mfn {mfn:#x} has type {PageType(kind).name}")
        hv.pagetables.mod_entry(level, mfn, slot, val, pt_owner, pg_owner, preserve_ad)
        return level.level > 1
    try:
        frames.get_page_type(mfn, PageType.WRITABLE)
    except XenError as e:
        raise XenError(Errno.EINVAL, f"target {e.message}") from None
    hv.memory.frame(mfn)[slot] = val
    frames.put_page_type(mfn)
    return False


def _machphys_update(hv: "Hypervisor", caller: Domain, ptr: int, val: int, pt_owner: int, pg_owner: int) -> None:
    if pt_owner != caller.domid:
        raise XenError(Errno.EPERM, "MMU_MACHPHYS_UPDATE with a foreign pagetable owner")
    _check_foreign_privilege(caller, pg_owner)
    mfn = ptr >> PAGE_SHIFT
    if not hv.frames.get_page(mfn, pg_owner):
        raise XenError(Errno.EINVAL, f"M2P update of mfn {mfn:#x} {hv.frames.describe_owner(mfn)}, not dom{pg_owner}")
    hv.m2p[mfn] = val
    hv.domains[pg_owner].guest_m2p.add(mfn)
    hv.frames.put_page(mfn)


# -- mmuext_op -----------------------------------------------------------------------------


def mmuext_op(hv: "Hypervisor", vcpu: Vcpu, ops: list, foreigndom: int = DOMID_SELF, start: int = 0) -> int:
    """HYPERVISOR_mmuext_op: each op is (cmd, arg1, arg2); returns the number done (docs/xen.md section 5)."""
    caller = hv.domains[vcpu.domid]
    try:
        pg_owner = get_pg_owner(hv, caller, foreigndom)
        if pg_owner in (DOMID_IO, DOMID_XEN):
            raise XenError(Errno.EINVAL, f"dom{pg_owner:#x} is not a PV domain")
        _check_foreign_privilege(caller, pg_owner)
    except XenError as e:
        raise XenError(e.errno, e.message, done=start) from None
    for i in range(start, len(ops)):
        if stop_before(hv, vcpu, i, start):
            raise Restart(start=i)
        cmd, arg1, arg2 = ops[i]
        try:
            _mmuext_one(hv, vcpu, caller, pg_owner, cmd, arg1, arg2)
        except Restart:
            raise Restart(start=i) from None
        except XenError as e:
            raise e.at(i, "mmuext_op") from None
    return len(ops)


def _mmuext_one(hv: "Hypervisor", vcpu: Vcpu, caller: Domain, pg_owner: int, cmd: int, arg1: int, arg2: int) -> None:
    frames = hv.frames
    if cmd in _PIN_LEVEL:
        kind = _PIN_LEVEL[cmd]
        if kind == PageType.L4 and frames.pv32.item(pg_owner):
            return  # do_mmuext_op: a 32-bit pg_owner has no L4s of its own; ignored, rc 0 (docs/pv32.md section 3)
        try:
            frames.get_page_and_type(arg1, pg_owner, kind)
        except XenError as e:
            raise XenError(e.errno, f"pin as {kind.name}: {e.message}") from None
        if frames.is_pinned(arg1):
            frames.put_page_and_type(arg1)
            raise XenError(Errno.EINVAL, f"mfn {arg1:#x} is already pinned")
        frames.set_pinned(arg1, True)
        return
    if cmd == MmuextCmd.UNPIN_TABLE:
        if not frames.get_page(arg1, pg_owner):
            raise XenError(Errno.EINVAL, f"unpin of mfn {arg1:#x} {frames.describe_owner(arg1)}, not dom{pg_owner}")
        if not frames.is_pinned(arg1):
            frames.put_page(arg1)
            raise XenError(Errno.EINVAL, f"mfn {arg1:#x} is not pinned")
        frames.set_pinned(arg1, False)
        frames.put_page_and_type(arg1)  # the pin's references; may devalidate the tree
        frames.put_page(arg1)
        return
    if cmd in (MmuextCmd.MARK_SUPER, MmuextCmd.UNMARK_SUPER):
        raise XenError(Errno.EOPNOTSUPP, "superpages are not supported for PV guests")
    if cmd == MmuextCmd.CLEAR_PAGE:
        with_writable(hv, arg1, pg_owner, "clear", lambda: hv.memory.scrub(arg1))
        return
    if cmd == MmuextCmd.COPY_PAGE:
        if not frames.get_page(arg2, pg_owner):
            raise XenError(Errno.EINVAL, f"copy source mfn {arg2:#x} {frames.describe_owner(arg2)}, not dom{pg_owner}")
        try:
            with_writable(hv, arg1, pg_owner, "copy to", lambda: hv.memory.copy(arg1, arg2))
        finally:
            frames.put_page(arg2)
        return
    if cmd not in _LOCAL_OPS:
        raise XenError(Errno.ENOSYS, f"unknown mmuext command {cmd}")
    if pg_owner != caller.domid:
        raise XenError(Errno.EPERM, f"{MmuextCmd(cmd).name} acts on the caller only")
    _LOCAL_OPS[cmd](hv, vcpu, caller, arg1, arg2)


def with_writable(hv: "Hypervisor", mfn: int, owner: int, what: str, action) -> None:
    """Run `action` holding a transient writable type reference (CLEAR_PAGE, COPY_PAGE)."""
    get_writable(hv, mfn, owner, what)
    action()
    hv.frames.put_page_and_type(mfn)


def get_writable(hv: "Hypervisor", mfn: int, owner: int, what: str, type_errno: Errno = Errno.EINVAL) -> None:
    """get_page, then get_page_type(PGT_writable_page), as Xen takes a frame it will write:
    EINVAL if `owner` does not own it, `type_errno` (and no reference kept) if it cannot be
    writable, a page table say."""
    frames = hv.frames
    if not frames.get_page(mfn, owner):
        raise XenError(Errno.EINVAL, f"{what} mfn {mfn:#x} {frames.describe_owner(mfn)}, not dom{owner}")
    try:
        frames.get_page_type(mfn, PageType.WRITABLE)
    except XenError as e:
        frames.put_page(mfn)
        raise XenError(type_errno, f"{what} {e.message}") from None


def new_guest_cr3(hv: "Hypervisor", vcpu: Vcpu, mfn: int) -> None:
    """Load a new kernel base (docs/xen.md section 8): take the new table's reference of the
    mode's top level, an L4 or a PV32 PAE L3 (validating an unpinned tree), map the read-only
    M2P in a 64-bit one or put a PAE L3 in the vCPU's compat L4 (docs/pv32.md section 2), then
    drop the old one's (devalidating it if that was the last)."""
    frames = hv.frames
    old = vcpu.guest_table
    if mfn != old:
        try:
            frames.get_page_and_type(mfn, vcpu.domid, vcpu.mode.root_type)
        except XenError as e:
            raise XenError(e.errno, f"new base {e.message}") from None
        vcpu.guest_table = mfn
        if vcpu.compat_l4:
            install_compat_base(hv.memory, vcpu)
        else:
            hv.pagetables.fill_ro_mpt(mfn, vcpu.domid)  # the read-only M2P (docs/xen.md section 22)
    vcpu.tlb.flush()
    if old and mfn != old:
        frames.put_page_and_type(old)


def new_user_baseptr(hv: "Hypervisor", vcpu: Vcpu, mfn: int) -> None:
    frames = hv.frames
    if vcpu.compat_l4:  # compat_mmuext_op: a 32-bit guest has one base (docs/pv32.md section 2)
        raise XenError(Errno.EINVAL, f"dom{vcpu.domid} is a 32-bit guest: its kernel and user share one base, there is no user base")
    old = vcpu.guest_table_user
    if mfn == old:
        return
    if mfn:
        try:
            frames.get_page_and_type(mfn, vcpu.domid, PageType.L4)
        except XenError as e:
            raise XenError(e.errno, f"new user base {e.message}") from None
    vcpu.guest_table_user = mfn
    if mfn:
        hv.pagetables.zap_ro_mpt(mfn, vcpu.domid)
    if old:
        frames.put_page_and_type(old)


def read_vcpumask(hv: "Hypervisor", vcpu: Vcpu, caller: Domain, va: int) -> list[Vcpu] | None:
    """The vCPUs named by the bitmap at guest virtual `va` (docs/xen.md section 10); None on a fault.
    vcpumask_to_pcpumask reads it in the guest's words, 32-bit ones for a 32-bit guest
    (docs/pv32.md section 6), as many as the domain's vCPUs need. Bits beyond them are ignored."""
    word_bytes = caller.abi.word_bytes
    size = word_bytes * -(-len(caller.vcpus) // (8 * word_bytes))
    data = copy_from_guest(hv.memory, vcpu.guest_table, va, size, vcpu.mode)
    if data is None:
        return None
    mask = int.from_bytes(data, "little")
    return [v for v in caller.vcpus if mask >> v.vcpu_id & 1]


def _flush_targets(hv, vcpu, caller, arg2, scope_all: bool) -> list[Vcpu]:
    if scope_all:
        return caller.vcpus
    targets = read_vcpumask(hv, vcpu, caller, arg2)
    if targets is None:
        raise XenError(Errno.EINVAL, f"cannot read the vCPU bitmap at {arg2:#x}")
    return targets


def _flush(hv, vcpu, caller, arg1, arg2, *, scope: str, va: bool) -> None:
    if va and not vcpu.mode.guest_addr_ok(arg1):
        return  # a bad address is a silent no-op
    targets = [vcpu] if scope == "local" else _flush_targets(hv, vcpu, caller, arg2, scope == "all")
    for target in targets:
        if va:
            target.tlb.invlpg(arg1)
        else:
            target.tlb.flush()


def _set_ldt(hv, vcpu, caller, linear_addr, nr_ents) -> None:
    if nr_ents > MAX_LDT_ENTRIES or (nr_ents and (linear_addr & 0xFFF or not vcpu.mode.guest_addr_ok(linear_addr))):
        raise XenError(Errno.EINVAL, f"bad LDT base {linear_addr:#x} or size {nr_ents}")


def _flush_cache(hv, vcpu, caller, arg1, arg2) -> None:
    raise XenError(Errno.EACCES, f"dom{caller.domid} has no cache-flush permission (no I/O resources)")


_LOCAL_OPS = {
    MmuextCmd.NEW_BASEPTR: lambda hv, vcpu, caller, mfn, _: new_guest_cr3(hv, vcpu, mfn),
    MmuextCmd.NEW_USER_BASEPTR: lambda hv, vcpu, caller, mfn, _: new_user_baseptr(hv, vcpu, mfn),
    MmuextCmd.TLB_FLUSH_LOCAL: lambda *a: _flush(*a, scope="local", va=False),
    MmuextCmd.INVLPG_LOCAL: lambda *a: _flush(*a, scope="local", va=True),
    MmuextCmd.TLB_FLUSH_MULTI: lambda *a: _flush(*a, scope="multi", va=False),
    MmuextCmd.INVLPG_MULTI: lambda *a: _flush(*a, scope="multi", va=True),
    MmuextCmd.TLB_FLUSH_ALL: lambda *a: _flush(*a, scope="all", va=False),
    MmuextCmd.INVLPG_ALL: lambda *a: _flush(*a, scope="all", va=True),
    MmuextCmd.SET_LDT: _set_ldt,
    MmuextCmd.FLUSH_CACHE: _flush_cache,
    MmuextCmd.FLUSH_CACHE_GLOBAL: _flush_cache,
}


# -- update_va_mapping ---------------------------------------------------------------------


def update_va_mapping(hv: "Hypervisor", vcpu: Vcpu, va: int, val: int, flags: int = 0, domid: int | None = None) -> int:
    """HYPERVISOR_update_va_mapping[_otherdomain] (docs/xen.md section 6): a checked update of the L1
    entry that maps `va` in the caller's current pagetable, then the flush `flags` ask for."""
    caller = hv.domains[vcpu.domid]
    pg_owner = caller.domid if domid is None else get_pg_owner(hv, caller, domid)
    _check_foreign_privilege(caller, pg_owner)
    mode = vcpu.mode
    if not mode.guest_addr_ok(va):
        raise XenError(Errno.EINVAL, f"va {va:#x} is not a guest address of a {mode.address_size}-bit guest")
    path = walk_entries(hv.memory, vcpu.guest_table, va, mode) if vcpu.guest_table else []
    if len(path) < len(mode.shifts):
        raise XenError(Errno.EINVAL, f"no L1 maps va {va:#x} in the current pagetable")
    l1, slot, _ = path[-1]
    frames = hv.frames
    if frames.owner.item(l1) != caller.domid or frames.locked_type(l1) != PageType.L1:
        raise XenError(Errno.EINVAL, f"mfn {l1:#x} mapping va {va:#x} is not a validated L1 of dom{caller.domid}")
    hv.pagetables.mod_entry(mode.levels[1], l1, slot, val, caller.domid, pg_owner)
    kind, scope = flags & UVMF_FLUSHTYPE_MASK, flags & ~UVMF_FLUSHTYPE_MASK
    if kind not in (UVMF_TLB_FLUSH, UVMF_INVLPG):
        return 0
    if scope == 0:
        targets = [vcpu]
    elif scope == UVMF_ALL:
        targets = caller.vcpus
    else:
        targets = read_vcpumask(hv, vcpu, caller, scope)
        if targets is None:
            raise XenError(Errno.EFAULT, f"cannot read the vCPU bitmap at {scope:#x} (the PTE was updated)")
    for target in targets:
        if kind == UVMF_INVLPG:
            target.tlb.invlpg(va)
        else:
            target.tlb.flush()
    return 0
