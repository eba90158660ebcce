"""What the guest's tasks do: process lifecycles with data that is checked from any CPU.

Each CPU runs a long-lived parent process with a few data pages. A lifecycle forks a child
from it (the parent's pages shared copy-on-write), switches to the child, which writes its
pattern into fresh pages and into some inherited ones (copy-on-write faults), then either
finishes here (verify, munmap a page and its heap, exit) or migrates: it is handed to another CPU through a
run-queue ring in guest memory, and this CPU runs a kernel thread that borrows the child's mm
lazily before going back to the parent. The other CPU switches to the child, verifies its data
(written on another CPU), and exits it, while the first CPU may still hold its pgd lazily, or be
halfway through switching away from it: the two windows drop_mm_ref must close.
"""

import random
import struct
from dataclasses import dataclass

import trio

from ..hypercalls import ops
from .alloc import drain_pages
from .balloon import Balloon
from .boot import OFFLINE, ONLINE, STOPPED, answer_pending_calls
from .cpu import Cpu, KernelBug, Panicked, checked
from .layout import RING_SLOTS
from .mm import HEAP_FIRST, MM_LIVE, Mm, claim, describe_corruption, fork, free_task, mm_alloc, munmap, munmap_heap, new_id, pin, read_l1, read_mm, release_claims, touch, user_va, verify
from .sched import enter_lazy, leave_lazy, switch_mm
from .shootdown import exit_mmap, exit_unpinned

SHARED_PAGES = 4  # the parent's pages a child inherits
FRESH_PAGES = 8  # pages a child faults in, in its heap (whose pte page joins the pinned mm)
WRITTEN = [0, 1] + list(range(HEAP_FIRST, HEAP_FIRST + FRESH_PAGES))  # two inherited, all fresh
UNMAPPED = 3  # the inherited page a child unmaps on its own


@dataclass
class WorkloadConfig:
    seconds: float = 5.0
    seed: int = 1
    migrate: float = 0.5  # chance that a child is finished on another CPU
    max_lifecycles: int = 0  # 0 = as many as fit in `seconds`
    idle_ms: float = 20.0  # how long an idle CPU stays lazy on a borrowed mm, at most
    balloon: int = 0  # pages each CPU gives back to Xen and takes again between lifecycles (balloon.py)
    until: float | None = None  # the deadline in the client's clock instead (a restarted vCPU's in a controlled run, which ends with the run)


@dataclass
class Task:
    id: int
    mm: Mm
    generation: int

    @property
    def pages(self) -> list[int]:
        return list(range(SHARED_PAGES + FRESH_PAGES))


class Workload:
    def __init__(self, kernel, config: WorkloadConfig):
        self.k, self.cpu, self.config = kernel, kernel.cpu, config
        self.rng = random.Random(config.seed * 1009 + self.cpu.id)
        self.corruptions: list[str] = []
        self.balloon = Balloon(self.cpu, kernel.pt, config.balloon) if config.balloon else None
        self.lifecycles = 0
        self.ring_tail = [0] * self.cpu.kl.nr_cpus  # what this CPU produced into each ring
        self.ring_head = [0] * self.cpu.kl.nr_cpus  # what it consumed from each ring
        self.ring_seen_head = [0] * self.cpu.kl.nr_cpus  # what each consumer had taken, as last read

    async def _load_rings(self) -> None:
        """Where this CPU stands in its rings (a restarted process takes over from memory)."""
        cpu, kl = self.cpu, self.cpu.kl
        n = kl.nr_cpus
        values = await cpu.send(*(ops.load(kl.ring(cpu.id, dst, "tail")[0]) for dst in range(n)), *(ops.load(kl.ring(src, cpu.id, "head")[0]) for src in range(n)))
        values = [checked(cpu, "rings", v) for v in values]
        self.ring_tail, self.ring_head = values[:n], values[n:]

    async def run(self) -> None:
        cpu = self.cpu
        if self.k.offline:  # its process died after the CPU went offline: its work is done
            return
        deadline = cpu.client.clock() + self.config.seconds if self.config.until is None else self.config.until
        async with cpu.irq:
            await self._load_rings()
            if self.k.restarted:
                await self._take_over()
            parent = await self._make_parent()
            if self.balloon:
                await self.balloon.start()
        cpu.phase = "running"
        while not self._done(deadline):
            async with cpu.irq:
                await self._drain_incoming()
                if cpu.borrowed is not None:
                    await self._kernel_thread()
                await self._lifecycle(parent)
                if self.balloon:
                    await self.balloon.cycle()
            await trio.sleep(0)  # interrupts on between lifecycles
        if self.balloon and self.balloon.given_back:
            async with cpu.irq:
                await self.balloon.take_back()
        await self._finish(parent)

    def _done(self, deadline: float) -> bool:
        limit = self.config.max_lifecycles
        return (limit and self.lifecycles >= limit) or self.cpu.client.clock() >= deadline

    async def _make_parent(self) -> Mm:
        """This CPU's parent process, named in the per-CPU area by the message that builds and
        pins it; a restarted process takes its predecessor's over (its pages touched again:
        a page already written faults no more) unless that one had begun to exit."""
        cpu, k = self.cpu, self.k
        mm = await read_mm(cpu, cpu.mirror["parent_mm"]) if cpu.mirror.get("parent_mm") else None
        if mm is not None and not mm.users:  # killed between go_offline's unpin and its puts
            await self._end_exit(mm, "parent_mm")
            mm = None
        if mm is None:
            mm_id = await new_id(cpu, "mm")
            batch = cpu.msg()
            mm = await mm_alloc(cpu, k.pt, batch, mm_id, {})
            pin(cpu, k.pt, batch, mm)
            cpu.set_percpu(batch, "parent_mm", mm_id)
            await batch.flush()
        await self._run_user(mm)
        await touch(cpu, k.pt, mm, 0, cpu.id, list(range(SHARED_PAGES)))
        return mm

    # -- a restarted process: what its predecessor owned (docs/linux.md section 17) ------------

    async def _take_over(self) -> None:
        """Free the slots the dead process claimed and never recorded, and end the tasks it
        had forked or taken and not yet freed, as a killed process's exit ends them: from
        whatever step it reached, with no data to check."""
        cpu, kl = self.cpu, self.cpu.kl
        await self.k.smp.wait_posted()
        await release_claims(cpu)
        for field in ("task", "incoming"):
            task_id = cpu.mirror.get(field)
            if task_id:
                (task,) = await cpu.send(ops.read(kl.task(task_id, "state")[0], 16))
                state, mm_id = struct.unpack("<2Q", checked(cpu, "take over", task))  # TASK's first two fields
                if state != MM_LIVE:
                    raise cpu.bug("take over", f"task {task_id}, this CPU's {field}, is not live (state {state:#x})")
                await self._end_exit(await read_mm(cpu, mm_id), field)
                free_task(cpu, task_id)
                cpu.count("killed_tasks")

    async def _end_exit(self, mm: Mm, field: str) -> None:
        """Exit mm, which the per-CPU `field` names, from where its dead process left it: a
        pinned one (`users` still 1: its exit's second message never ran) exits whole (its
        first message, if it ran, only left the pgd, which drop_mm_ref does again); an unpinned
        one only puts what it holds. The field is cleared with those puts."""
        if mm.users:
            await exit_mmap(self.cpu, mm)
        else:
            await exit_unpinned(self.cpu, mm)
        self.cpu.set_percpu_later(field, 0)

    async def _lifecycle(self, parent: Mm) -> None:
        cpu, k = self.cpu, self.k
        await self._run_user(parent)
        task = await self._fork_child(parent)
        await self._preempt()
        await self._run_user(task.mm)
        await touch(cpu, k.pt, task.mm, task.id, task.generation, WRITTEN)
        await self._preempt()
        others = [c for c in range(cpu.kl.nr_cpus) if c != cpu.id]
        if not (others and self.rng.random() < self.config.migrate and await self._migrate(task, self.rng.choice(others))):
            await self._finish_task(task)

    async def _fork_child(self, parent: Mm) -> Task:
        """The parent forks: copy_process claims a task and an mm slot as dup_mmap reads the
        parent's L1, then fork builds the child (`_record` names the task in its message)."""
        cpu, k = self.cpu, self.k
        batch = cpu.msg()
        task_id, mm_id = claim(cpu, batch, "task"), claim(cpu, batch, "mm")
        parent_l1 = read_l1(cpu, k.pt, parent.l1, batch, "fork")
        await batch.flush()
        child_id = await mm_id()
        task = Task(await task_id(), Mm(child_id), self.rng.randrange(1 << 32))
        task.mm = await fork(cpu, k.pt, parent, child_id, list(range(SHARED_PAGES)), parent_l1(), record=lambda batch: self._record(batch, task))
        return task

    def _record(self, batch, task: Task) -> None:
        """copy_process's task, running here, in the message that makes its mm live: the task
        struct made live, with its mm and generation, and named as this CPU's `task`, which
        a restarted process of this CPU ends (`_take_over`)."""
        kl = self.cpu.kl
        batch.write(kl.task(task.id, "state")[0], struct.pack("<4Q", MM_LIVE, task.mm.id, task.mm.id, self.cpu.id))
        batch.store(kl.task(task.id, "generation")[0], task.generation)
        self.cpu.set_percpu(batch, "task", task.id)

    async def _preempt(self) -> None:
        """A preemption point: after a reschedule IPI, run the tasks handed to this CPU."""
        await self.cpu.irq_window()
        if self.k.smp.need_resched:
            self.k.smp.need_resched = False
            await self._drain_incoming()

    async def _run_user(self, mm: Mm) -> None:
        """Switch to a task of mm: from a lazy kernel thread (dropping what it borrowed), or
        from another user task."""
        if self.cpu.borrowed is not None:
            await leave_lazy(self.cpu, mm)
        elif self.cpu.loaded is not mm:
            await switch_mm(self.cpu, mm)

    async def _kernel_thread(self) -> None:
        """The idle task on its borrowed mm: cr3 untouched, interrupts on, for a while (Xen's
        PV idle blocks until an event; a bounded sleep stands in for the timer)."""
        self.cpu.irq.release()
        try:
            await self.cpu.client.relax(self.rng.uniform(0, self.config.idle_ms) / 1000)
        finally:
            await self.cpu.irq.acquire()

    async def _finish_task(self, task: Task, field: str = "task") -> None:
        """The child's last steps, on whichever CPU it ended up: check its data, unmap a
        page (flush_tlb_others) and the heap with its pte page, exit (exit_mmap with this
        kernel's drop_mm_ref). The task is freed, and the per-CPU `field` naming it cleared,
        in the message that puts what its mm held."""
        cpu, k = self.cpu, self.k
        await self._run_user(task.mm)
        batch = cpu.msg()  # the task's last user reads, its munmaps, and exit's first message
        wrong = verify(cpu, batch, task.id, task.generation, WRITTEN)
        l1 = munmap(cpu, k.pt, task.mm, UNMAPPED, batch)  # read after the pages, in the same message
        heap = munmap_heap(cpu, k.pt, task.mm, batch) if task.mm.heap else None
        await exit_mmap(cpu, task.mm, batch)
        for index, data in wrong().items():
            entry = heap()[index - HEAP_FIRST] if heap and index >= HEAP_FIRST else l1()[index]
            self.corruptions.append(describe_corruption(cpu.id, task.id, task.generation, index, user_va(index), entry, data))
        free_task(cpu, task.id)
        cpu.set_percpu_later(field, 0)
        self.lifecycles += 1
        cpu.count("lifecycles")

    # -- migration through the run-queue rings -----------------------------------------------

    async def _migrate(self, task: Task, dst: int) -> bool:
        cpu, kl = self.cpu, self.cpu.kl
        tail = self.ring_tail[dst]
        if tail - self.ring_seen_head[dst] >= RING_SLOTS:  # full as last seen: heads only grow
            return False
        batch = cpu.msg()
        batch.write(kl.task(task.id, "state")[0], struct.pack("<4Q", 1, task.mm.id, task.mm.id, dst))
        batch.store(kl.task(task.id, "generation")[0], task.generation)
        batch.store(kl.ring(cpu.id, dst, "slots")[0] + 8 * (tail % RING_SLOTS), task.id)
        batch.store(kl.ring(cpu.id, dst, "tail")[0], tail + 1)
        batch.evtchn_send(self.k.smp.ports["resched"][dst])  # ttwu: wake it on its CPU
        cpu.set_percpu(batch, "task", 0)  # dst's now
        enter_lazy(cpu, batch)  # the child is gone: a kernel thread runs, borrowing its mm
        await batch.flush()
        self.ring_tail[dst] = tail + 1
        cpu.count("migrations")
        return True

    async def _drain_incoming(self) -> int:
        """Finish the tasks other CPUs handed to this one; returns how many."""
        cpu, kl = self.cpu, self.cpu.kl
        srcs = [c for c in range(kl.nr_cpus) if c != cpu.id]
        batch = cpu.msg()
        tails = [batch.load(kl.ring(src, cpu.id, "tail")[0]) for src in srcs]
        heads = {dst: batch.load(kl.ring(cpu.id, dst, "head")[0]) for dst in srcs}  # room to migrate
        panicked = cpu.check_panic(batch)
        await batch.flush()
        panicked()
        for dst, head in heads.items():
            self.ring_seen_head[dst] = checked(cpu, "drain", head)
        done = 0
        for src, tail in zip(srcs, tails):
            tail = checked(cpu, "drain", tail)
            while self.ring_head[src] < tail:
                slot = kl.ring(src, cpu.id, "slots")[0] + 8 * (self.ring_head[src] % RING_SLOTS)
                (task_id,) = await cpu.send(ops.load(slot))
                task_id = checked(cpu, "drain", task_id)
                # taken, in the message that names it this CPU's: a restarted process ends it
                self.ring_head[src] += 1
                batch = cpu.msg()
                batch.store(kl.ring(src, cpu.id, "head")[0], self.ring_head[src])
                cpu.set_percpu(batch, "incoming", task_id)
                mm_field, gen = batch.load(kl.task(task_id, "mm")[0]), batch.load(kl.task(task_id, "generation")[0])
                await batch.flush()
                mm = await read_mm(cpu, checked(cpu, "drain", mm_field))
                await self._finish_task(Task(task_id, mm, checked(cpu, "drain", gen)), "incoming")
                done += 1
        return done

    async def _finish(self, parent: Mm) -> None:
        """Stop: keep finishing handed-over tasks until every CPU has stopped producing."""
        cpu, kl = self.cpu, self.cpu.kl
        async with cpu.irq:  # count this CPU as stopped once, even across a restart
            (was,) = await cpu.send(ops.atomic("cmpxchg", kl.percpu(cpu.id, "online")[0], STOPPED, expected=ONLINE))
            if checked(cpu, "finish", was) == ONLINE:
                await cpu.send(ops.atomic("fetch_add", kl.kglobal("control")[0], 1))
        while True:
            cpu.phase = "finishing: waiting for the other CPUs to stop"
            async with cpu.irq:
                (stopped,) = await cpu.send(ops.load(kl.kglobal("control")[0]))
                drained = await self._drain_incoming()
            if checked(cpu, "finish", stopped) >= kl.nr_cpus and not drained:
                break
            await cpu.client.relax(0.005)
        async with cpu.irq:
            await self.go_offline(parent)

    async def go_offline(self, parent: Mm) -> None:
        """This CPU's last work, with interrupts off (the caller holds them): finish what was
        handed over, exit its own parent, run every call still addressed to it, and only then
        count as offline. An initiator stops waiting for an offline CPU and may free what its
        call names, so from OFFLINE on this CPU runs no call (docs/linux.md section 16)."""
        cpu = self.cpu
        await cpu.hook("finish:irqs_off", cpu)
        await self._drain_incoming()
        await self._run_user(parent)
        await exit_mmap(cpu, parent)  # this CPU is on swapper from here on
        cpu.set_percpu_later("parent_mm", 0)  # with the puts of what the parent held
        await answer_pending_calls(self.k)  # smpcfd_dying_cpu: nothing left pending when it goes
        drain_pages(cpu)  # page_alloc_cpu_dead: an offline CPU's pools go back (docs/linux.md section 15)
        batch = cpu.msg()
        cpu.set_percpu(batch, "online", OFFLINE)
        await batch.flush()
        await cpu.hook("finish:offline", cpu)


async def run(kernel, config: WorkloadConfig) -> dict:
    """Run the workload on this vCPU; a kernel BUG stops it and is reported."""
    workload = Workload(kernel, config)
    cpu: Cpu = kernel.cpu
    bug = stopped = bug_at = None
    started = cpu.client.clock()
    try:
        await workload.run()
    except KernelBug as e:
        bug = str(e)
        bug_at = cpu.client.clock() - started
        await cpu.client.atomic("fetch_add", cpu.kl.kglobal("bugs")[0], 1)  # panic: stop the others
    except Panicked as e:
        stopped = str(e)
    return {
        "vcpu": cpu.id,
        "lifecycles": workload.lifecycles,
        "messages": cpu.messages,
        "stats": cpu.stats,
        "data_corruptions": workload.corruptions + (workload.balloon.corruptions if workload.balloon else []),
        "bug": bug,
        "bug_after_s": bug_at,
        "stale_cr3": bool(bug and "stale-cr3 window" in bug),
        "final": {k: cpu.mirror.get(k) for k in ("loaded_mm", "active_mm", "xen_cr3", "xen_current_cr3", "online")},
        "stopped": stopped,
    }

