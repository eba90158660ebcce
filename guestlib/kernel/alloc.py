"""The page allocator: a free bitmap in guest memory and a page pool per CPU.

The bitmap (bit set = free) is shared and claimed without a lock: a CPU reads it, then takes
whole words with fetch_and, and the old value says exactly which pages it got, so two CPUs
racing for a word split it and nobody gets a page twice. Each CPU keeps a pool of pages (its
per-CPU area holds the pool, mirrored in the process) and refills or spills it a word at a
time, so most allocations and frees cost no message of their own: the pool update rides in
the message that uses the pages. Highmem (pfns outside the direct map) has its own pool.
"""

import struct

from ..hypercalls import ops
from ..xen import PAGE_SIZE
from .cpu import Cpu, checked
from .layout import POOL_SLOTS

_WORD = 64
_WORDS_PER_PAGE = PAGE_SIZE // 8
REFILL_TRIES = 8


async def alloc_pages(cpu: Cpu, n: int, highmem: bool = False) -> list[int]:
    """n free pfns from this CPU's pool (refilled from the bitmap when short); the pool's new
    contents go to guest memory in this CPU's next message."""
    pool = cpu.hipool if highmem else cpu.pool
    tries = 0
    while len(pool) < n:
        got = await _refill(cpu, highmem, POOL_SLOTS // 2)
        tries = 0 if got else tries + 1
        if tries == REFILL_TRIES:  # not a lost race with another CPU: memory is gone
            raise cpu.bug("alloc_pages", f"out of {'high' if highmem else 'low'}memory: {len(pool)} pages left, {n} wanted")
        pool.extend(got)
    taken, pool[:] = pool[-n:], pool[:-n]
    cpu.pool_dirty = True
    return taken


def free_pages(cpu: Cpu, pfns: list[int]) -> None:
    """Give pages back: to this CPU's pools, the overflow to the bitmap (fetch_or), both in
    this CPU's next message."""
    words: dict[int, int] = {}
    for pfn in pfns:
        pool = cpu.pool if cpu.kl.is_lowmem(pfn) else cpu.hipool
        if len(pool) < POOL_SLOTS:
            pool.append(pfn)
        else:
            words[pfn // _WORD] = words.get(pfn // _WORD, 0) | 1 << (pfn % _WORD)
    for word, bits in words.items():
        cpu.defer(ops.atomic("fetch_or", cpu.kl.bitmap.va(8 * word), bits))
    cpu.pool_dirty = True


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
    first, last = (kl.nr_lowmem, kl.nr_pages) if highmem else (kl.first_free_pfn, kl.nr_lowmem)
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
