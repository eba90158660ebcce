"""Start of day (vCPU 0) and attaching a vCPU to the running kernel (every vCPU).

Reference: docs/linux.md sections 7.1 and 9. vCPU 0 boots from start-info: it reads the P2M,
builds the page allocator's bitmap, marks the boot pagetable's pages PG_pinned (Linux's hook
once the allocator exists: they were pinned by the domain builder), builds the fixmap (a kernel
L3/L2/L1 under the swapper pgd's top slot; PAE: an L1 in swapper's kernel pmd, below Xen's
slots, docs/linux.md section 13) holding the shared-info frame and one kmap slot per
CPU, takes the FIFO event-channel ABI (docs/linux.md section 12) in the message that binds every
CPU's IPI ports, stops every vCPU's periodic timer and moves its vcpu_info into
its per-CPU page (docs/linux.md section 11), and brings the other vCPUs up with
VCPUOP_initialise (on the swapper pgd) and VCPUOP_up. Secondary vCPU processes wait until they are started and the
kernel's magic is written, then attach like vCPU 0.
"""

import struct
from types import SimpleNamespace

from ..events import EventChannels, FifoEventChannels
from ..hypercalls import Batch, HypercallClient, Pending, ops
from ..layout import BootLayout
from ..paging import PagingMode
from ..xen import (
    EVTCHN_FIFO_MASKED,
    PAGE_SHIFT,
    PAGE_SIZE,
    START_INFO_FIELD_OFFSET,
    START_INFO_FIELDS,
    Errno,
    MmuCmd,
    VGCF_in_kernel,
    VMASST_CMD_enable,
    VMASST_TYPE_pae_extended_cr3,
    VMASST_TYPE_writable_pagetables,
)
from .alloc import load_pool
from .cpu import Cpu, Hook, _no_hook, checked
from .layout import FIX_SHARED_INFO, KERNEL_MAGIC, OFFLINE, PG_PINNED, PG_TABLE, KernelLayout
from .mm import read_mm
from .pgtable import KERNPG_TABLE, PAGE_KERNEL, PageTables, slot
from .sched import load_cr3
from .shootdown import VARIANTS
from .smp import IPI_KINDS, Smp

# The per-CPU `online` field: running; stopped making work (but still serving IPIs); offline
# (on swapper, serving nothing: smp_call_function skips it, as Linux skips CPUs outside
# cpu_online_mask).
ONLINE, STOPPED = 1, 2


class Kernel:
    """One vCPU's view of the running kernel: its Cpu, pagetables and SMP side."""

    def __init__(self, cpu: Cpu, pt: PageTables, smp: Smp, variant: str, highpte: bool):
        self.cpu, self.pt, self.smp, self.variant, self.highpte = cpu, pt, smp, variant, highpte
        self.restarted = False  # this process took over a vCPU whose process had died
        self.offline = False  # ... and that vCPU had gone offline (see _restore)
        cpu.kernel = self


async def read_start_info(client: HypercallClient, mode: PagingMode) -> SimpleNamespace:
    """The start-info record, from pfn 0 through the direct map (where every vCPU finds it)."""
    data = await client.read(mode.page_offset, START_INFO_FIELD_OFFSET + 8 * len(START_INFO_FIELDS))
    if not data.startswith(mode.start_info_magic):
        raise RuntimeError(f"no {mode.name} start-info record at the direct map's first page")
    values = struct.unpack_from(f"<{len(START_INFO_FIELDS)}Q", data, START_INFO_FIELD_OFFSET)
    return SimpleNamespace(**dict(zip(START_INFO_FIELDS, values)), magic=mode.start_info_magic.decode())


EVTCHN_ABIS = ("fifo", "2l")
# What xen_pvmmu_arch_setup (arch/x86/xen/setup.c) enables, by address size: writable
# pagetables always, and a 32-bit kernel's PAE L3s may lie above 4 GiB (docs/xen.md section 25).
VM_ASSISTS = {64: (VMASST_TYPE_writable_pagetables,), 32: (VMASST_TYPE_writable_pagetables, VMASST_TYPE_pae_extended_cr3)}


async def start_of_day(client: HypercallClient, mode: PagingMode, variant: str, highpte: bool, evtchn: str = "fifo") -> None:
    """vCPU 0's boot, up to bringing the other vCPUs up. `evtchn` "fifo" takes the FIFO ABI
    if Xen offers it, "2l" stays on 2-level (Linux's xen.fifo_events=0)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown drop_mm_ref variant {variant!r}; one of {', '.join(VARIANTS)}")
    if evtchn not in EVTCHN_ABIS:
        raise ValueError(f"unknown event-channel ABI {evtchn!r}; one of {', '.join(EVTCHN_ABIS)}")
    info = await read_start_info(client, mode)
    boot = await BootLayout.read(client, info)
    kl = KernelLayout(info, mode)
    cpu = Cpu(client, kl, 0)
    pt = PageTables(boot, kl)
    batch = cpu.msg()
    for assist in VM_ASSISTS[mode.address_size]:  # first: the stores below may go through ptwr
        batch.vm_assist(VMASST_CMD_enable, assist)
    for field, value in (("nr_cpus", kl.nr_cpus), ("variant", VARIANTS.index(variant)), ("highpte", int(highpte)), ("swapper_pfn", pt.swapper_pfn)):
        batch.store(kl.kglobal(field)[0], value)
    _write_bitmap(batch, kl)
    boot_tables = range(pt.swapper_pfn, pt.swapper_pfn + info.nr_pt_frames)
    for pfn in [*boot_tables, *kl.fixmap_pfns]:  # the post-allocator hook: mark them pinned
        batch.store(kl.pageinfo(pfn)[0], PG_PINNED | PG_TABLE, size=4)
    chain = kl.fixmap_pfns  # top first, the L1 last
    shared_info_mfn = info.shared_info >> PAGE_SHIFT
    pt.write_new(cpu, batch, chain[-1], {FIX_SHARED_INFO: (shared_info_mfn << PAGE_SHIFT) | PAGE_KERNEL})
    for level, table, below in zip(range(mode.kernel_level - 1, 1, -1), chain, chain[1:]):
        pt.write_new(cpu, batch, table, {slot(mode.fixmap_base, level): pt.make(below, KERNPG_TABLE)})
    batch.mmu_update(pt.remap_direct(list(chain), writable=False))
    batch.mmu_update([(pt.maddr(pt.swapper_kernel_pfn, pt.fixmap_slot) | MmuCmd.NORMAL_PT_UPDATE, pt.make(chain[0], KERNPG_TABLE))])
    fifo_setup = _evtchn_fifo_init(batch, kl, pt) if evtchn == "fifo" else []
    ports = [[batch.evtchn_bind_ipi(c) for _ in IPI_KINDS] for c in range(kl.nr_cpus)]
    await batch.flush()
    fifo = bool(fifo_setup) and _took_fifo(cpu, fifo_setup)
    batch = cpu.msg()
    batch.store(kl.kglobal("evtchn_fifo")[0], int(fifo))
    events = event_channels(client, kl, 0, fifo)
    checked_later, again = [], []
    for c, bound in enumerate(ports):
        for kind, pending in zip(IPI_KINDS, bound):
            port = checked(cpu, "boot", pending)
            batch.store(kl.percpu(c, f"{kind}_port")[0], port)
            if kind == "kick":  # masked: only polled for
                events.mask(batch, port)
            else:  # the IRQ's startup (a FIFO event-array page starts all masked)
                events.unmask(batch, port)
        for field in ("xen_cr3", "xen_current_cr3"):
            batch.store(kl.percpu(c, field)[0], pt.swapper_pfn)
    for c in range(kl.nr_cpus):  # one-shot timers only, and each vcpu_info per-CPU (docs/linux.md section 11)
        checked_later.append(batch.vcpu_stop_periodic_timer(c))
        pfn, offset = kl.pfn_offset(kl.percpu(c, "vcpu_info")[0])
        again.append(batch.vcpu_register_vcpu_info(c, pt.mfn(pfn), offset))
    again += [batch.vcpu_initialise(c, pt.mfn(pt.swapper_pfn), flags=VGCF_in_kernel, rip=mode.entry) for c in range(1, kl.nr_cpus)]
    batch.store(kl.kglobal("magic")[0], KERNEL_MAGIC)
    checked_later += [batch.vcpu_up(c) for c in range(1, kl.nr_cpus)]
    await batch.flush()
    for pending in checked_later:
        checked(cpu, "bring up", pending)
    for pending in again:  # EBUSY, EEXIST: a vCPU 0 killed mid-boot already did it
        error = pending.exception()
        if not (error is None or getattr(error, "errno", None) in (Errno.EBUSY, Errno.EEXIST)):
            checked(cpu, "bring up", pending)


def _evtchn_fifo_init(batch: Batch, kl: KernelLayout, pt: PageTables) -> list[Pending]:
    """xen_evtchn_fifo_init and each CPU's xen_evtchn_cpu_prepare (docs/linux.md section 12.1),
    all from the boot CPU before the others come up and before it binds a port: clear each
    CPU's control block and register it, fill the event array's page with MASKED words and
    give it to Xen (evtchn_fifo_setup). Returns the hypercalls, for `_took_fifo`."""
    for c in range(kl.nr_cpus):
        batch.write(kl.evtchn_control.va(c), bytes(PAGE_SIZE))
    setup = [batch.evtchn_init_control(pt.mfn(kl.evtchn_control.first_pfn + c), vcpu=c) for c in range(kl.nr_cpus)]
    batch.write(kl.evtchn_array.va(0), (1 << EVTCHN_FIFO_MASKED).to_bytes(4, "little") * (PAGE_SIZE // 4))  # init_array_page
    return [*setup, batch.evtchn_expand_array(pt.mfn(kl.evtchn_array.first_pfn))]


def _took_fifo(cpu: Cpu, setup: list[Pending]) -> bool:
    """Whether the FIFO ABI is in use: False if Xen has none (init_control ENOSYS: stay on
    2-level, xen_evtchn_2l_init); any other failure is a kernel BUG."""
    if getattr(setup[0].exception(), "errno", None) == Errno.ENOSYS:
        return False
    for call in setup:
        checked(cpu, "evtchn_fifo_init", call)
    return True


def event_channels(client: HypercallClient, kl: KernelLayout, vcpu_id: int, fifo: bool) -> EventChannels:
    """This CPU's event dispatch in the ABI the boot CPU chose, on the vcpu_info boot moved
    into its per-CPU page, in its address size's layout (docs/pv32.md section 7)."""
    shared_info, vcpu_info, layout = kl.fixmap_va(FIX_SHARED_INFO), kl.percpu(vcpu_id, "vcpu_info")[0], kl.mode.abi
    if fifo:
        return FifoEventChannels(client, shared_info, vcpu_id, kl.evtchn_control.va(vcpu_id), kl.evtchn_array.va(0), vcpu_info, layout)
    return EventChannels(client, shared_info, vcpu_id, vcpu_info, layout)


def _write_bitmap(batch, kl: KernelLayout) -> None:
    """Every pfn past the kernel's own pages is free (bit set)."""
    bits = bytearray(kl.bitmap.count)
    for pfn in range(kl.first_free_pfn, kl.nr_pages):
        bits[pfn // 8] |= 1 << (pfn % 8)
    for offset in range(0, len(bits), PAGE_SIZE):
        batch.write(kl.bitmap.va(offset), bytes(bits[offset : offset + PAGE_SIZE]))


async def booted(client: HypercallClient, mode: PagingMode) -> bool:
    """Whether vCPU 0 has already booted the kernel (a restarted vCPU 0 must not again)."""
    kl = KernelLayout(await read_start_info(client, mode), mode)
    return await client.load(kl.kglobal("magic")[0]) == KERNEL_MAGIC


async def attach(client: HypercallClient, mode: PagingMode, vcpu_id: int, hook: Hook = _no_hook) -> Kernel:
    """Join the running kernel as vCPU `vcpu_id`: wait for its magic, read the P2M, the
    layout, the kernel half of swapper and the IPI ports, bind this CPU's handlers, and take
    this CPU's own state back from its per-CPU area (all zero for a first start; a restarted
    process carries on from where the killed one left guest memory)."""
    info = await read_start_info(client, mode)
    kl = KernelLayout(info, mode)
    while await client.load(kl.kglobal("magic")[0]) != KERNEL_MAGIC:
        await client.sched_yield()
        await client.relax(0.01)
    boot = await BootLayout.read(client, info)
    cpu = Cpu(client, kl, vcpu_id, hook)
    pt = PageTables(boot, kl)
    await pt.read_kernel_half(cpu)
    (variant, highpte, fifo) = await cpu.send(*(ops.load(kl.kglobal(field)[0]) for field in ("variant", "highpte", "evtchn_fifo")))
    events = event_channels(client, kl, vcpu_id, bool(checked(cpu, "attach", fifo)))
    smp = Smp(cpu, events, await Smp.read_ports(cpu))
    kernel = Kernel(cpu, pt, smp, VARIANTS[checked(cpu, "attach", variant)], bool(checked(cpu, "attach", highpte)))
    await _restore(kernel)
    return kernel


RESTORED = ("loaded_mm", "active_mm", "tlbstate", "xen_cr3", "xen_current_cr3", "online", "parent_mm", "task", "incoming")


async def _restore(kernel: Kernel) -> None:
    """This CPU's per-CPU fields, page pools and call sequences, as guest memory has them."""
    cpu, kl = kernel.cpu, kernel.cpu.kl
    values = await cpu.send(*(ops.load(kl.percpu(cpu.id, f)[0]) for f in RESTORED), *(ops.load(kl.csd(cpu.id, t, "seq")[0]) for t in range(kl.nr_cpus)))
    values = [checked(cpu, "attach", v) for v in values]
    cpu.mirror.update(zip(RESTORED, values), highpte=int(kernel.highpte))
    kernel.smp.seq = dict(enumerate(values[len(RESTORED) :]))
    if cpu.mirror["loaded_mm"]:
        cpu.loaded = await read_mm(cpu, cpu.mirror["loaded_mm"])
    if cpu.mirror["active_mm"] and cpu.mirror["tlbstate"]:
        cpu.borrowed = await read_mm(cpu, cpu.mirror["active_mm"])
    await load_pool(cpu)
    if cpu.mirror["xen_current_cr3"] != cpu.mirror["xen_cr3"]:
        # The last process died between switch_mm's two messages: memory names the new pgd,
        # Xen still runs on the old one. Finish the switch, or a shootdown that finds this
        # CPU through xen_current_cr3 finds nothing to switch away from (and unpin fails).
        load_cr3(cpu, cpu.loaded)
        await cpu.flush_lazy()
    kernel.restarted = bool(cpu.mirror["online"])
    # Killed after going offline: it stays offline, runs no call and does no work, since the
    # calls still addressed to it were given up by their initiators (docs/linux.md section 16).
    kernel.offline = cpu.mirror["online"] == OFFLINE
    if not kernel.restarted:
        batch = cpu.msg()
        cpu.set_percpu(batch, "online", ONLINE)
        await batch.flush()


async def answer_pending_calls(kernel: Kernel) -> None:
    """Run every call addressed to this CPU that it has not acknowledged, with interrupts off
    (the caller holds them): a restarted CPU's, whose predecessor took them off the event
    bitmap but died first, or their initiators would wait forever; a CPU's about to go offline
    (Workload.go_offline)."""
    batch = kernel.cpu.msg()
    slots = kernel.smp._read_slots(batch)
    await batch.flush()
    tail = kernel.cpu.msg()
    await kernel.smp._callfunc(0, tail, slots)
    await tail.flush()
