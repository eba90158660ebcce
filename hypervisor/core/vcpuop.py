"""HYPERVISOR_vcpu_op (docs/xen.md section 14): initialise, bring up and take down the
vCPUs of the caller's domain, their timers (the caller's single-shot one, any vCPU's periodic
one), their runstate, and where their vcpu_info lives.

Every vCPU but 0 is created down and uninitialised. VCPUOP_initialise gives it a context whose
kernel and user pagetables take their references exactly as MMUEXT_NEW_BASEPTR and
NEW_USER_BASEPTR do (so an unpinned tree is validated here); VCPUOP_up then lets it run. A vCPU
taken down keeps those references; taking down the last vCPU that is up shuts the domain down.
"""

from typing import TYPE_CHECKING

from .abi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PERIODIC_MIN_NS,
    STIME_DELTA_MAX,
    VCPU_INFO_SIZE,
    Errno,
    SHUTDOWN_poweroff,
    VGCF_in_kernel,
    VGCF_online,
)
from .domain import install_compat_base
from .errors import Restart, XenError
from .evtchn import vcpu_info_words, vcpu_mark_events_pending
from .mmu import get_writable
from .sched import domain_shutdown, s_time, update_runstate_area, vcpu_runstate_change, vcpu_runstate_get, vcpu_set_periodic_timer
from .schedop import SINGLESHOT_TIMER, arm_singleshot_timer, send_timer_event
from .walk import canonical

if TYPE_CHECKING:
    from .domain import Domain, Vcpu
    from .hypervisor import Hypervisor


def vcpu_op(hv: "Hypervisor", current: "Vcpu", cmd: str, vcpuid: int, **fields):
    """HYPERVISOR_vcpu_op(cmd, vcpuid, arg): `cmd` names the VCPUOP_* (a key of `VCPUOP`),
    `vcpuid` a vCPU of the caller's domain (any, the caller included, except for the
    single-shot timer ops) and `fields` the op's argument (initialise: `context`;
    set_singleshot_timer: `timeout_abs_ns`, `flags`; set_periodic_timer: `period_ns`;
    register_runstate_memory_area: `addr`; register_vcpu_info: `mfn`, `offset`). is_up returns
    1 or 0, get_runstate_info the runstate, the others 0."""
    target = hv.vcpu(current.domid, vcpuid)  # ENOENT, before the command is looked at
    handler = VCPUOP.get(cmd)
    if handler is None:
        raise XenError(Errno.ENOSYS, f"unknown vcpu_op {cmd!r} (xensim has {', '.join(VCPUOP)})")
    if cmd in OWN_VCPU_ONLY and target is not current:
        raise XenError(Errno.EINVAL, f"VCPUOP_{cmd} from dom{current.domid} vCPU {current.vcpu_id} names vCPU {vcpuid}: a vCPU sets only its own timer")
    return handler(hv, hv.domains[current.domid], target, **fields)


def initialise(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", context: dict) -> int:
    """VCPUOP_initialise: `context` holds the fields of vcpu_guest_context that xensim uses:
    flags (VGCF_*), ctrlreg3 and ctrlreg1 (the kernel and user L4 as mfns; ctrlreg1 0 = none),
    rip and rsp (handed to the vCPU's process when it starts). Missing fields are 0."""
    return _set_info_guest(hv, domain, vcpu, **context)


def _set_info_guest(
    hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", flags: int = 0, ctrlreg3: int = 0, ctrlreg1: int = 0, rip: int = 0, rsp: int = 0
) -> int:
    """arch_set_info_guest for a vCPU that never ran (xen/arch/x86/domain.c), its checks in
    Xen's order. Xen commits the kernel base before it looks at the user base, and keeps it
    when the user base is refused; here both bases are taken as one step
    (FrameTable.atomically), so that a refused call changes nothing at all. When the user
    base's validation stops at a preemption point, the kernel base is dropped too and the call
    starts over (preempt.py): the user base's progress is kept in its partial tables, so each
    run gets further, though an unpinned kernel tree is validated again each time."""
    where = f"VCPUOP_initialise of dom{domain.domid} vCPU {vcpu.vcpu_id}"
    if vcpu.initialised:
        raise XenError(Errno.EEXIST, f"{where}: the vCPU is already initialised")
    for name, va in (("rip", rip), ("rsp", rsp)):
        if not canonical(va):
            raise XenError(Errno.EINVAL, f"{where}: {name} {va:#x} is not canonical")
    compat = bool(vcpu.compat_l4)
    if compat:
        ctrlreg1 = 0  # arch_set_info_guest takes no user base for a compat guest (docs/pv32.md section 2)
    elif not flags & VGCF_in_kernel and not ctrlreg1:
        raise XenError(Errno.EINVAL, f"{where}: starts in user mode (no VGCF_in_kernel) without a user pagetable (ctrlreg1)")
    frames = hv.frames

    def take_bases() -> None:
        _take_base(hv, domain, ctrlreg3, f"{where}: ctrlreg3")
        if ctrlreg1:
            try:
                _take_base(hv, domain, ctrlreg1, f"{where}: ctrlreg1")
            except (XenError, Restart):  # Restart: ctrlreg1's validation stopped part-way
                frames.put_page_and_type(ctrlreg3)
                raise

    frames.atomically(take_bases)
    vcpu.guest_table, vcpu.guest_table_user = ctrlreg3, ctrlreg1  # a vCPU that never ran held none
    if compat:
        install_compat_base(hv.memory, vcpu)  # slot 0 of its compat L4
    else:
        hv.pagetables.fill_ro_mpt(ctrlreg3, domain.domid)  # after the bases are taken, as arch_set_info_guest does
        if ctrlreg1:
            hv.pagetables.zap_ro_mpt(ctrlreg1, domain.domid)
    vcpu.initialised = True
    vcpu.vgc_flags, vcpu.rip, vcpu.rsp = flags, rip, rsp
    vcpu.down = not flags & VGCF_online  # VGCF_online clears _VPF_down without waking the vCPU
    vcpu_runstate_change(hv, vcpu)
    return 0


def _take_base(hv: "Hypervisor", domain: "Domain", mfn: int, what: str) -> None:
    """The reference a base pointer holds: a general and a type reference of the mode's top
    level (an L4, or a PV32 PAE L3), which validates an unpinned tree (as MMUEXT_NEW_BASEPTR
    takes it)."""
    try:
        hv.frames.get_page_and_type(mfn, domain.domid, domain.mode.root_type)
    except XenError as e:
        raise XenError(e.errno, f"{what}: {e.message}") from None


def up(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> int:
    """VCPUOP_up: clear _VPF_down; a vCPU that was down is woken (poked: the adapter starts it)."""
    if not vcpu.initialised:
        raise XenError(Errno.EINVAL, f"VCPUOP_up: dom{domain.domid} vCPU {vcpu.vcpu_id} is not initialised")
    if vcpu.down:
        vcpu.down = False
        vcpu_runstate_change(hv, vcpu)
        hv.sched.poke(vcpu)
    return 0


def down(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> int:
    """VCPUOP_down: if no other vCPU is up, shut the domain down (SHUTDOWN_poweroff) and leave
    the vCPU up; otherwise set _VPF_down (poked: the adapter stops it). References stay."""
    if all(other.down for other in domain.vcpus if other is not vcpu):
        domain_shutdown(hv, domain, SHUTDOWN_poweroff)
    elif not vcpu.down:
        vcpu.down = True
        vcpu_runstate_change(hv, vcpu)
        hv.sched.poke(vcpu)
    return 0


def is_up(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> int:
    return int(not vcpu.down)


def set_singleshot_timer(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", timeout_abs_ns: int, flags: int = 0) -> int:
    """VCPUOP_set_singleshot_timer (xen/common/domain.c, common_vcpu_op): arm the vCPU's
    single-shot timer, the one set_timer_op arms, at the absolute Xen system time
    `timeout_abs_ns`. A deadline already past raises VIRQ_TIMER at once (Xen stops the timer
    and sends the event), and so does one of 2**63 or more, which Xen's timer takes as a
    negative s_time_t. `flags` is not looked at: VCPU_SSHOTTMR_future once asked for -ETIME
    instead of a late event, and Xen ignores it since 4.18 (commit "xen/vcpu: ignore
    VCPU_SSHOTTMR_future")."""
    expires = s_time(timeout_abs_ns)
    if expires < hv.sched.now_ns:
        hv.sched.stop_timer(vcpu, SINGLESHOT_TIMER)
        send_timer_event(hv, vcpu)
    else:
        arm_singleshot_timer(hv, vcpu, expires)
    return 0


def stop_singleshot_timer(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> int:
    """VCPUOP_stop_singleshot_timer: stop the timer, as set_timer_op(0) does."""
    hv.sched.stop_timer(vcpu, SINGLESHOT_TIMER)
    return 0


def get_runstate_info(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> dict:
    """VCPUOP_get_runstate_info (common_vcpu_op, vcpu_runstate_get): the target's runstate
    with the time in its current state so far; any vCPU of the domain (docs/vcpu-time.md section 6)."""
    state, entry, time = vcpu_runstate_get(hv, vcpu)
    return {"state": state, "state_entry_time": entry, "time": time}


def register_runstate_memory_area(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", addr: int) -> int:
    """VCPUOP_register_runstate_memory_area: from now on Xen copies the target's runstate to
    guest virtual `addr` whenever it changes, and once now; 0 unregisters. -EFAULT unless the
    48 bytes at `addr` lie in the guest's range (guest_handle_okay: __addr_ok at both ends).
    A 32-bit guest's handle is a u32 whose 44 bytes end below HYPERVISOR_COMPAT_VIRT_START
    (compat_vcpu_op: the u64 field must equal its low half, and compat_handle_okay; docs/pv32.md section 9).
    Whether they are mapped is not checked: a copy that faults is dropped. The copy is the
    runstate as of its last change, as Xen copies it for the calling vCPU (docs/vcpu-time.md section 6)."""
    size, mode = domain.abi.runstate_info_size, vcpu.mode
    if addr and not (mode.guest_addr_ok(addr) and mode.guest_addr_ok(addr + size - 1)):
        raise XenError(Errno.EFAULT, f"VCPUOP_register_runstate_memory_area: {size} bytes at {addr:#x} are not all {mode.address_size}-bit guest addresses (guest_handle_okay)")
    vcpu.runstate_guest = addr
    if addr:
        update_runstate_area(hv, vcpu)
    return 0


def set_periodic_timer(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", period_ns: int) -> int:
    """VCPUOP_set_periodic_timer: -EINVAL below 1 ms or above STIME_DELTA_MAX; otherwise the
    target's periodic timer restarts with this period, whichever vCPU of the domain it is
    (docs/vcpu-time.md section 5)."""
    if not PERIODIC_MIN_NS <= period_ns <= STIME_DELTA_MAX:
        raise XenError(Errno.EINVAL, f"VCPUOP_set_periodic_timer: period {period_ns} ns is outside {PERIODIC_MIN_NS} ns (1 ms) .. {STIME_DELTA_MAX:#x} (STIME_DELTA_MAX)")
    vcpu_set_periodic_timer(hv, vcpu, period_ns)
    return 0


def stop_periodic_timer(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu") -> int:
    """VCPUOP_stop_periodic_timer: the target's period becomes 0, so it never ticks again
    until set_periodic_timer; what Linux does at boot (xen_vcpuop_set_mode)."""
    vcpu_set_periodic_timer(hv, vcpu, 0)
    return 0


def register_vcpu_info(hv: "Hypervisor", domain: "Domain", vcpu: "Vcpu", mfn: int, offset: int = 0) -> int:
    """VCPUOP_register_vcpu_info (common_vcpu_op, map_guest_area; docs/vcpu-time.md section 7):
    move the target's vcpu_info out of shared info to byte `offset` of the domain's frame
    `mfn`, in Xen's order of checks:

    - the address mfn << 12 | offset must name that frame (-EINVAL: an offset of a page or more);
    - a vcpu_info already registered is -EBUSY (no re-registration);
    - the 64 bytes must lie in the frame and start on 8 bytes (-ENXIO);
    - the frame must be the domain's (get_page: -EINVAL) and take a writable type (-EACCES:
      a pagetable, say).

    The area keeps both references until the domain dies. Xen copies the old vcpu_info there,
    sets every selector bit and marks events pending, so nothing pending is lost (the guest
    gets a spurious upcall)."""
    where = f"VCPUOP_register_vcpu_info of dom{domain.domid} vCPU {vcpu.vcpu_id}"
    if ((mfn << PAGE_SHIFT) + offset) >> PAGE_SHIFT != mfn:
        raise XenError(Errno.EINVAL, f"{where}: offset {offset:#x} is not within mfn {mfn:#x}'s page")
    if vcpu.vcpu_info_area is not None:
        raise XenError(Errno.EBUSY, f"{where}: its vcpu_info is already at mfn {vcpu.vcpu_info_area[0]:#x} offset {vcpu.vcpu_info_area[1]:#x}")
    if offset + VCPU_INFO_SIZE > PAGE_SIZE or offset % 8:
        raise XenError(Errno.ENXIO, f"{where}: {VCPU_INFO_SIZE} bytes at offset {offset:#x} of mfn {mfn:#x} cross the page's end or are not 8-byte aligned")
    get_writable(hv, mfn, domain.domid, f"{where}: vcpu_info", type_errno=Errno.EACCES)
    old_mfn, old_index = vcpu_info_words(hv, vcpu)
    hv.memory.write(mfn, offset, hv.memory.read(old_mfn, old_index * 8, VCPU_INFO_SIZE))  # vcpu_info_populate
    vcpu.vcpu_info_area = (mfn, offset)
    hv.memory.write(mfn, offset + domain.abi.vcpu_info_pending_sel, b"\xff" * domain.abi.word_bytes)  # a 32-bit guest's u32 (docs/pv32.md section 7)
    vcpu_mark_events_pending(hv, vcpu)
    return 0


VCPUOP = {
    "initialise": initialise,
    "up": up,
    "down": down,
    "is_up": is_up,
    "get_runstate_info": get_runstate_info,
    "register_runstate_memory_area": register_runstate_memory_area,
    "set_periodic_timer": set_periodic_timer,
    "stop_periodic_timer": stop_periodic_timer,
    "set_singleshot_timer": set_singleshot_timer,
    "stop_singleshot_timer": stop_singleshot_timer,
    "register_vcpu_info": register_vcpu_info,
}
# The ops that act on the calling vCPU's own timer: common_vcpu_op answers -EINVAL when the
# target is another vCPU (v != current).
OWN_VCPU_ONLY = {"set_singleshot_timer", "stop_singleshot_timer"}
