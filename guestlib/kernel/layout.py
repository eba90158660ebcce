"""Where the kernel's shared state lives in guest memory, computed from start-info alone.

Every vCPU process derives the same map, so they agree on addresses without telling each other
anything. All regions are in lowmem after the boot layout and are reached through the direct
map, at the paging mode's page_offset. A struct is a table of named fields (offset, size);
`Region` gives each instance's address.
"""

from dataclasses import dataclass

from ..paging import PagingMode
from ..xen import PAGE_SHIFT, PAGE_SIZE, VCPU_INFO_SIZE

MAX_MMS = 256
MAX_TASKS = 512
POOL_SLOTS = 120  # pfns a CPU keeps in each of its page pools
BALLOON_SLOTS = 128  # pages a CPU's balloon may hold (balloon.py)
RING_SLOTS = 28  # tasks in flight from one CPU's run queue to another's
MAX_TABLES = 23  # pages below its pgds an mm has from its start (L3, L2, L1; PAE: pmds, L1)
KERNEL_MAGIC = 0x58454E53494D4B31  # "XENSIMK1": the kernel has booted
OFFLINE = 3  # the per-CPU `online` value of a CPU that went offline (see boot)

# The fixmap: one L1 of kernel-only slots (Linux's FIXADDR area) at the mode's fixmap_base.
FIX_SHARED_INFO = 0  # the shared-info frame, mapped writable for event channels
FIX_KMAP_BEGIN = 1  # then one kmap_atomic slot per CPU (highpte)


class Struct:
    """Field name -> (offset, size) of a fixed layout; `size` is the whole struct's."""

    def __init__(self, *fields: tuple[str, int], size: int | None = None):
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, width in fields:
            self.offsets[name] = (offset, width)
            offset += width
        self.size = size or offset
        assert offset <= self.size

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self.offsets[name]


KGLOBAL = Struct(
    ("magic", 8), ("nr_cpus", 8), ("variant", 8), ("highpte", 8), ("swapper_pfn", 8),
    ("pool_lock", 8), ("bugs", 8), ("control", 8 * 16), ("evtchn_fifo", 8),
    size=PAGE_SIZE,
)  # fmt: skip
PERCPU = Struct(
    ("xen_cr3", 8),  # pfn of the pgd last written to cr3 (may still sit in the batch)
    ("xen_current_cr3", 8),  # pfn of the pgd Xen really has: set after submission only
    ("loaded_mm", 8),  # mm id whose pgd is loaded here; 0 = init_mm (swapper)
    ("tlbstate", 8),  # TLBSTATE_OK / TLBSTATE_LAZY
    ("active_mm", 8),  # the mm a lazy kernel thread borrows (holding a count)
    ("current", 8),  # running task id; 0 = idle
    ("resched_port", 8), ("callfunc_port", 8), ("kick_port", 8), ("online", 8),
    ("pool_count", 8), ("hipool_count", 8),
    ("stats", 8 * 16),
    ("pool", 8 * POOL_SLOTS), ("hipool", 8 * POOL_SLOTS),
    ("vcpu_info", VCPU_INFO_SIZE),  # this vCPU's vcpu_info, registered at boot (xen_vcpu_setup)
    ("balloon_count", 8), ("balloon_state", 8), ("balloon", 8 * BALLOON_SLOTS),  # balloon.py: its pages, generation << 1 | given back
    # What a restarted process of this CPU takes over (docs/linux.md section 17): its parent's mm
    # id, the task it forked and runs, the task it took from a run queue (task ids; 0 = none).
    ("parent_mm", 8), ("task", 8), ("incoming", 8),
    size=PAGE_SIZE,
)  # fmt: skip
MM = Struct(
    ("state", 8), ("pgd", 8), ("user_pgd", 8), ("cpumask", 8), ("users", 8), ("count", 8),
    ("nr_tables", 8), ("owner", 8), ("heap", 8), ("tables", 8 * MAX_TABLES),  # heap: the pfn of the heap's pte page, 0 = none
    size=256,
)  # fmt: skip
TASK = Struct(
    ("state", 8), ("mm", 8), ("active_mm", 8), ("cpu", 8), ("pages", 8), ("generation", 8),
    ("parent", 8), ("flags", 8),
    size=64,
)  # fmt: skip
CSD = Struct(("func", 8), ("arg", 8), ("seq", 8), ("done", 8))  # a call-function slot
RING = Struct(("head", 8), ("tail", 8), ("slots", 8 * RING_SLOTS), size=256)
PAGEINFO_SIZE = 4  # u32 per pfn: flags in the low byte, map count above (PAGE_COUNT_ONE)
PG_PINNED, PG_TABLE, PG_RESERVED = 1, 2, 4
PAGE_COUNT_ONE = 1 << 8

STATS = (
    "lifecycles", "forks", "faults", "cow", "munmaps", "ipis_sent", "ipis_handled", "switches", "lazy", "migrations", "pins", "unpins", "bugs",
    "ballooned_out", "ballooned_in", "pte_allocs", "drains", "killed_tasks",
)  # fmt: skip


@dataclass(frozen=True)
class Region:
    """One array of structs in guest memory: pfn of its first page, struct size, count."""

    first_pfn: int
    struct_size: int
    count: int
    page_offset: int  # the direct map's base

    @property
    def pages(self) -> int:
        return -(-self.struct_size * self.count // PAGE_SIZE)

    def va(self, index: int, struct: Struct | None = None, field: str | None = None) -> int:
        offset = struct[field][0] if field else 0
        return self.page_offset + (self.first_pfn << PAGE_SHIFT) + index * self.struct_size + offset


class KernelLayout:
    """The kernel's regions for a domain (from its start-info), after the boot layout's pfns."""

    def __init__(self, info, mode: PagingMode):
        self.mode = mode
        self.nr_cpus = info.nr_vcpus
        self.nr_pages, self.nr_lowmem = info.nr_pages, info.nr_lowmem_pages
        pfn = info.first_free_pfn
        regions = {}
        for name, size, count in (
            ("kglobal", KGLOBAL.size, 1),
            ("percpu", PERCPU.size, self.nr_cpus),
            ("csd", CSD.size, self.nr_cpus * self.nr_cpus),
            ("rings", RING.size, self.nr_cpus * self.nr_cpus),
            ("mms", MM.size, MAX_MMS),
            ("tasks", TASK.size, MAX_TASKS),
            ("pageinfo", PAGEINFO_SIZE, self.nr_pages),
            ("bitmap", 1, -(-self.nr_pages // 8)),
            ("evtchn_control", PAGE_SIZE, self.nr_cpus),  # a FIFO control block per CPU, at offset 0
            ("evtchn_array", PAGE_SIZE, 1),  # the FIFO event array: ports below 1024
        ):
            regions[name] = Region(pfn, size, count, mode.page_offset)
            pfn += regions[name].pages
        self.regions = regions
        self.fixmap_pfns = tuple(range(pfn, pfn + mode.fixmap_tables))  # its chain, top first: L3, L2, L1 (PAE: the L1)
        self.first_free_pfn = pfn + mode.fixmap_tables
        if self.first_free_pfn + 64 > self.nr_lowmem:
            raise MemoryError(f"{self.nr_lowmem} lowmem pages cannot hold the kernel ({self.first_free_pfn} used at boot)")

    def __getattr__(self, name: str) -> Region:
        try:
            return self.__dict__["regions"][name]
        except KeyError:
            raise AttributeError(name) from None

    def kglobal(self, field: str) -> tuple[int, int]:
        return self.regions["kglobal"].va(0, KGLOBAL, field), KGLOBAL[field][1]

    def percpu(self, cpu: int, field: str) -> tuple[int, int]:
        return self.regions["percpu"].va(cpu, PERCPU, field), PERCPU[field][1]

    def pfn_offset(self, va: int) -> tuple[int, int]:
        """The (pfn, byte offset) of a direct-map address."""
        return (va - self.mode.page_offset) >> PAGE_SHIFT, va & (PAGE_SIZE - 1)

    def mm(self, mm: int, field: str) -> tuple[int, int]:
        return self.regions["mms"].va(mm, MM, field), MM[field][1]

    def task(self, task: int, field: str) -> tuple[int, int]:
        return self.regions["tasks"].va(task, TASK, field), TASK[field][1]

    def csd(self, src: int, dst: int, field: str) -> tuple[int, int]:
        """Target-major, so a CPU reads every slot addressed to it in one access."""
        return self.regions["csd"].va(dst * self.nr_cpus + src, CSD, field), 8

    def ring(self, src: int, dst: int, field: str = "head") -> tuple[int, int]:
        return self.regions["rings"].va(src * self.nr_cpus + dst, RING, field), 8

    def pageinfo(self, pfn: int) -> tuple[int, int]:
        return self.regions["pageinfo"].va(pfn), PAGEINFO_SIZE

    def fixmap_va(self, index: int) -> int:
        return self.mode.fixmap_base + (index << PAGE_SHIFT)

    def is_lowmem(self, pfn: int) -> bool:
        return pfn < self.nr_lowmem
