"""The page allocator: a free bitmap in guest memory and a page pool per CPU.

The bitmap (bit set = free) is shared and claimed without a lock: a CPU reads it, then takes
whole words with fetch_and, and the old value says exactly which pages it got, so two CPUs
racing for a word split it and nobody gets a page twice. Each CPU keeps a pool of pages (its
per-CPU area holds the pool, mirrored in the process) and refills or spills it a word at a
time, so most allocations and frees cost no message of their own: the pool update rides in
the message that uses the pages. Highmem (pfns outside the direct map) has its own pool.

As Linux's per-CPU page lists (docs/linux.md section 15), a pool's refill batch and its high
mark are scaled to the zone's size split across the CPUs, so a small zone is not hoarded by one
CPU; and a CPU that finds the bitmap empty asks the others to give their pools back
(drain_all_pages, a call-function IPI) before it declares the memory gone. A CPU going offline
gives its pools back in its last message.
"""

import struct

from ..hypercalls import ops
from ..xen import PAGE_SIZE
from .cpu import Cpu, checked
from .layout import POOL_SLOTS, KernelLayout
from .smp import call_function

_WORD = 64
_WORDS_PER_PAGE = PAGE_SIZE // 8
REFILL_TRIES = 8  # empty refills in a row, with every CPU's pools drained between them, before a BUG
DRAIN_PAGES = 2  # the call-function number of drain_local_pages


def zone(kl: KernelLayout, highmem: bool) -> tuple[int, int]:
    """The pfns [first, last) the allocator hands out from lowmem or highmem."""
    return (kl.nr_lowmem, kl.nr_pages) if highmem else (kl.first_free_pfn, kl.nr_lowmem)


def pcp_limits(kl: KernelLayout, highmem: bool) -> tuple[int, int]:
    """(batch, high) of a zone's pools: a refill takes `batch` pages, a free spills past
    `high`. High is half the zone's share per CPU (zone_highsize splits the zone's high across
    its CPUs), at most POOL_SLOTS; batch is half of high (docs/linux.md section 15)."""
    first, last = zone(kl, highmem)
    high = max(1, min(POOL_SLOTS, (last - first) // (2 * kl.nr_cpus)))
    return max(1, high // 2), high


async def alloc_pages(cpu: Cpu, n: int, highmem: bool = False) -> list[int]:
    """n free pfns from this CPU's pool (refilled from the bitmap when short); the pool's new
    contents go to guest memory in this CPU's next message. A refill that finds nothing drains
    the other CPUs' pools and tries again (__alloc_pages_direct_reclaim); only when that finds
    nothing REFILL_TRIES times in a row is the memory gone, a kernel BUG."""
    pool = cpu.hipool if highmem else cpu.pool
    batch, _ = pcp_limits(cpu.kl, highmem)
    tries = 0
    while len(pool) < n:
        got = await _refill(cpu, highmem, max(batch, n - len(pool)))
        tries = 0 if got else tries + 1
        if tries == REFILL_TRIES:  # not a lost race, nor pages in another CPU's pool: memory is gone
            zone_name = "highmem" if highmem else "lowmem"
            raise cpu.bug("alloc_pages", f"out of {zone_name}: {n} pages wanted, {len(pool)} in this CPU's pool, the bitmap empty {tries} times in a row with every CPU's pools drained in between")
        if not got:
            cpu.count("drains")
            await cpu.kernel.smp.call_function_many(list(range(cpu.kl.nr_cpus)), DRAIN_PAGES, 0)
        pool.extend(got)
    taken, pool[:] = pool[-n:], pool[:-n]
    cpu.pool_dirty = True
    return taken


def free_pages(cpu: Cpu, pfns: list[int]) -> None:
    """Give pages back: to this CPU's pools up to their high mark, the overflow to the bitmap
    (fetch_or), both in this CPU's next message."""
    kl = cpu.kl
    high = {highmem: pcp_limits(kl, highmem)[1] for highmem in (False, True)}
    spill = []
    for pfn in pfns:
        highmem = not kl.is_lowmem(pfn)
        pool = cpu.hipool if highmem else cpu.pool
        if len(pool) < high[highmem]:
            pool.append(pfn)
        else:
            spill.append(pfn)
    _to_bitmap(cpu, spill)
    cpu.pool_dirty = True


def drain_pages(cpu: Cpu) -> None:
    """drain_pages: give both of this CPU's pools back to the bitmap in its next message."""
    _to_bitmap(cpu, cpu.pool + cpu.hipool)
    cpu.pool.clear()
    cpu.hipool.clear()
    cpu.pool_dirty = True


@call_function(DRAIN_PAGES)
async def drain_local_pages(cpu: Cpu, arg: int) -> None:
    """Another CPU found the bitmap empty: give the pools back in a message of their own, so
    the pages are in the bitmap (and the pools' counts zero) before the acknowledgement that
    follows it. A process killed before that message comes back with its pools intact; one
    killed after it, with them empty: the pages are never both in a pool and free."""
    if cpu.pool or cpu.hipool:
        drain_pages(cpu)
        await cpu.msg().flush()


def _to_bitmap(cpu: Cpu, pfns: list[int]) -> None:
    """Set the pages' bits, one fetch_or per word, in this CPU's next message."""
    words: dict[int, int] = {}
    for pfn in pfns:
        words[pfn // _WORD] = words.get(pfn // _WORD, 0) | 1 << (pfn % _WORD)
    for word, bits in words.items():
        cpu.defer(ops.atomic("fetch_or", cpu.kl.bitmap.va(8 * word), bits))


async def load_pool(cpu: Cpu) -> None:
    """Read this CPU's pools back from its per-CPU area (a restarted vCPU process)."""
    kl = cpu.kl
    counts = await cpu.send(*(ops.load(kl.percpu(cpu.id, f"{name}_count")[0]) for name in ("pool", "hipool")))
    reads = await cpu.send(*(ops.read(kl.percpu(cpu.id, name)[0], 8 * POOL_SLOTS) for name in ("pool", "hipool")))
    for pool, count, data in zip((cpu.pool, cpu.hipool), counts, reads):
        n = checked(cpu, "load_pool", count)
        pool[:] = struct.unpack_from(f"<{n}Q", checked(cpu, "load_pool", data))


def _scan_order(lo: int, hi: int, start: int) -> list[tuple[int, int]]:
    """The bitmap words lo..hi from `start` round to `start`, as word ranges that each lie
    in one page: a block read may not cross a page (the bitmap is page-aligned)."""
    ranges = []
    for a, b in ((start, hi), (lo, start)):
        while a < b:
            end = min(b, (a // _WORDS_PER_PAGE + 1) * _WORDS_PER_PAGE)
            ranges.append((a, end))
            a = end
    return ranges


async def _refill(cpu: Cpu, highmem: bool, want: int) -> list[int]:
    """Claim up to `want` free pages: read the bitmap a page's worth of words per message
    from this CPU's own part on (fewer races, and a large guest costs no more than a small
    one), then take the chosen bits of each word with one fetch_and. Only bits of the zone
    are chosen, so every bit cleared is a page returned."""
    kl = cpu.kl
    first, last = zone(kl, highmem)
    lo, hi = first // _WORD, -(-last // _WORD)
    ranges = _scan_order(lo, hi, lo + cpu.id * (hi - lo) // kl.nr_cpus)
    claim: dict[int, int] = {}
    count = 0
    while ranges and count < want:
        batch, size = [], 0
        while ranges and size + ranges[0][1] - ranges[0][0] <= _WORDS_PER_PAGE:
            batch.append(ranges.pop(0))
            size += batch[-1][1] - batch[-1][0]
        reads = await cpu.send(*(ops.read(kl.bitmap.va(8 * a), 8 * (b - a)) for a, b in batch))
        for (a, b), read in zip(batch, reads):
            for w, word in enumerate(struct.unpack(f"<{b - a}Q", checked(cpu, "alloc_pages", read)), a):
                word &= _zone_mask(w, first, last)
                while word and count < want:
                    low = word & -word  # the lowest free page of the word
                    claim[w] = claim.get(w, 0) | low
                    word ^= low
                    count += 1
    if not claim:
        return []
    olds = await cpu.send(*(ops.atomic("fetch_and", kl.bitmap.va(8 * w), ~bits & (2**64 - 1)) for w, bits in claim.items()))
    got = []
    for (w, bits), old in zip(claim.items(), olds):
        mine = checked(cpu, "alloc_pages", old) & bits
        got += [w * _WORD + b for b in range(_WORD) if mine >> b & 1]
    return got


def _zone_mask(w: int, first: int, last: int) -> int:
    """The bits of bitmap word `w` that are pfns in [first, last): the word holding the
    lowmem/highmem boundary belongs to both zones, and a refill clears only bits it returns."""
    lo, hi = max(first - w * _WORD, 0), min(last - w * _WORD, _WORD)
    return (1 << hi) - (1 << lo)
