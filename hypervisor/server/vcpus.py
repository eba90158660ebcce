"""The server's side of scheduling: per-vCPU streams, sleeps and wake-ups, pause, timers.

Theory of operation. Everything runs on one asyncio loop, which is the hypervisor lock: a
core call runs synchronously, atomically, inside a handler. What would wait in Xen waits here
as an await that blocks nothing else:

- A long hypercall stops after a bounded amount of work and answers a `Continuation` (the
  core's preempt.py); its caller yields to the loop, so that every other call, the toolstack
  and the health check get their turn, then goes on with it (`Hypervisor.resume`) until it is
  over, still holding its vCPU's lock (the vCPU is inside the hypercall). A paused domain's
  call waits before it goes on; a destroyed domain's call ends ABORTED like any other. Calls
  that each stay short but come many to a Session message yield as often, by the same count
  of work.

- A hypercall that sleeps (SCHEDOP_block / poll) answers `BLOCKED`; its caller awaits the
  vCPU's `wake` event until the core says the vCPU is no longer blocked.
- After every core call the runtime drains the core's kicks (a coalescing set of vCPUs to
  look at): each kicked vCPU's `wake` is set and its Session stream, if any, gets `attention`.
  Kicks for vCPUs without a stream or a waiter cost nothing and leave no backlog.
- Pushes are not queued per event. A stream has one writer at a time (a lock) and, before each
  answer and whenever it gets attention, looks at the vCPU's state: up and not yet announced
  -> VcpuStarted; upcall deliverable -> the core's `deliver_upcall` (which masks further
  upcalls until the guest unmasks) -> Upcall. So a storm of events costs one push.
- Time: Xen's system time is ns since the server started (`Runtime.now_ns`); every Session
  message carries it (system_time_ns), as vcpu_time_info gives it to a PV guest, and guests
  name absolute deadlines in it. The core's clock moves only through `advance_time`: before a
  call that names a deadline (`catch_up`), and when the one `loop.call_at` kept for the core's
  next deadline fires, after which the kicks are drained.
- Pause (toolstack.proto PauseDomain): calls of a paused domain wait before they run, and no
  push is made for it, until UnpauseDomain. Calls already sleeping stay asleep; one that wakes
  while paused answers after the unpause. A message whose process dies while it waits goes on
  after the unpause all the same, its vCPU free for a new process meanwhile (`_take_back`).
- A vCPU that Xen does not run (down, or of a domain that shut down) gets no push, and the
  core refuses its calls (VcpuNotRunning, answered FAILED_PRECONDITION by errors.py). A call
  already asleep when that happens answers when it is woken, as any sleeping call does; one
  stopped at a preemption point goes on once the vCPU is up again (`_may_go_on`), or is
  refused if its domain shut down.
- Handlers register their task under their domain (`guard`), so DestroyDomain can end that
  domain's calls and streams with ABORTED, and shutdown every call with UNAVAILABLE.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from functools import partial
from time import perf_counter

import grpc

from hypervisor.core import Continuation, Hypervisor
from hypervisor.core.domain import Domain, Vcpu
from hypervisor.core.evtchn import local_events_need_delivery
from hypervisor.core.sched import BLOCKED
from xensim.v1 import hypercalls_pb2

from . import convert
from .errors import PeerGone, Refused, status_of, write
from .schedule import Gate

log = logging.getLogger("xensim.server")


class Later:
    """A hypercall that has to wait (its domain paused, its turn given way, preempted, or
    asleep): awaiting it gives the call's result."""

    __slots__ = ("_coroutine",)

    def __init__(self, coroutine):
        self._coroutine = coroutine

    def __await__(self):
        return self._coroutine.__await__()


class Stream:
    """A vCPU's open Session: the one writer (answers and the pusher task share a lock).

    `close` stops the pusher between two writes, never during one: grpc sends the stream's
    status as another operation, which fails while a message is still being sent by another
    task (TOO_MANY_OPERATIONS).
    """

    def __init__(self, runtime: "Runtime", slot: "VcpuSlot", context: grpc.aio.ServicerContext):
        self.runtime = runtime
        self.slot = slot
        self.context = context
        self.task = asyncio.current_task()
        self.write_lock = asyncio.Lock()
        self.attention = asyncio.Event()
        self.attention.set()  # a vCPU that is up is announced as soon as its Session opens
        self.started_sent = False
        self.name = f"dom{slot.domid} vCPU {slot.vcpu_id}'s Session"
        self._pusher = asyncio.create_task(self._push_loop())

    async def write(self, response: hypercalls_pb2.SessionResponse) -> None:
        """Send an answer, after any push that is due (an Upcall precedes the answer of the
        block it woke, as hypercalls.proto SchedBlock says). Runs in the handler's task."""
        lock = self.write_lock
        await lock.acquire()  # not `async with`: two coroutines fewer on every answer
        try:
            for push in self._due():
                await self.runtime.send(self, push, self.task)
            await self.runtime.send(self, response, self.task)
        finally:
            lock.release()

    async def close(self) -> None:
        """Stop pushing, between two writes."""
        try:
            async with self.write_lock:
                pass
        finally:
            self._pusher.cancel()

    async def _push_loop(self) -> None:
        """Push what became due while the vCPU's process is not waiting for an answer."""
        while True:
            await self.attention.wait()
            self.attention.clear()
            async with self.write_lock:
                try:
                    pushes = self._due(upcalls=self.runtime.gate is None)
                except Exception as exc:  # noqa: BLE001 - a bug: the handler ends the stream with it
                    self.runtime.end_task(self.task, exc)
                    return
                try:
                    for push in pushes:
                        await self.runtime.send(self, push, self._pusher)
                except PeerGone:  # its handler sees that itself
                    return

    def _due(self, upcalls: bool = True) -> list[hypercalls_pb2.SessionResponse]:
        """The pushes due now, taken (delivering an upcall masks the next one). In a controlled
        run an upcall goes out only ahead of an answer, inside a step (docs/schedule.md section 2)."""
        slot, hv = self.slot, self.runtime.hv
        vcpu = slot.vcpu
        domain = hv.domains.get(slot.domid)
        if slot.stream is not self or domain is None or domain.instance != slot.instance:  # detached or destroyed: being ended
            return []
        if slot.orphan is not None:  # the vCPU is still inside its dead process's message (Runtime._take_back)
            return []
        if vcpu.down:
            self.started_sent = False
            return []
        if slot.domid in self.runtime.paused or domain.shutdown_code is not None:
            return []  # paused, by the toolstack or by domain_shutdown: the vCPU runs nothing
        pushes = []
        if not self.started_sent:
            self.started_sent = True
            pushes.append(hypercalls_pb2.SessionResponse(started=convert.vcpu_started(vcpu, domain)))
        if upcalls and local_events_need_delivery(hv, vcpu):
            ports = hv.toolstack("deliver_upcall", domid=slot.domid, vcpu=slot.vcpu_id)
            if ports is not None:
                pushes.append(hypercalls_pb2.SessionResponse(upcall=hypercalls_pb2.Upcall(vcpu_id=slot.vcpu_id, pending_ports=ports)))
        return pushes


class VcpuSlot:
    """What the server keeps for one vCPU: its stream, its wake-up, and the lock that makes
    its calls (Session messages and unary calls) run one at a time, as on one CPU."""

    def __init__(self, domain: Domain, vcpu: Vcpu):
        self.domid = domain.domid
        self.instance = domain.instance  # the domid may name another domain once this one is gone
        self.vcpu_id = vcpu.vcpu_id
        self.vcpu = vcpu
        self.stream: Stream | None = None
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.orphan: asyncio.Task | None = None  # the handler running on with a dead process's message (Runtime._take_back)


class Runtime:
    """The core plus the server's per-vCPU state, pauses, the timer and running calls."""

    def __init__(self, hv: Hypervisor):
        self.hv = hv
        self.slots: dict[tuple[int, int], VcpuSlot] = {}
        self.paused: dict[int, asyncio.Event] = {}  # domid -> set on unpause
        self._loop = asyncio.get_running_loop()
        self._epoch = self._loop.time()  # time.monotonic(): the clock of asyncio's own loops (BaseEventLoop.time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: int | None = None
        self._tasks: dict[int | None, set[asyncio.Task]] = {}
        self._endings: dict[asyncio.Task, Exception] = {}
        self._writing: set[asyncio.Task] = set()  # handlers inside a Session write (see send)
        self._orphans: set[asyncio.Task] = set()  # handlers going on with a dead process's message (see _take_back)
        self.observe: Callable[[str, float], None] | None = None  # observe.Metrics, with --metrics-port
        self._yielded_at = hv.budget.work  # the core's work count when calls last gave way
        self.gate: Gate | None = None  # a controlled run's scheduler (schedule.py); None: free

    # -- time ---------------------------------------------------------------------------------

    def now_ns(self) -> int:
        """Xen's system time: ns since the server started, never behind the core's clock. The
        one place that says what time it is (SessionResponse.system_time_ns, the timer). A
        controlled run's time is virtual, the gate's (docs/schedule.md section 4)."""
        if self.gate is not None:
            return self.gate.now_ns
        now = int((time.monotonic() - self._epoch) * 1e9)  # the loop's clock, without its method call
        core = self.hv.sched.now_ns
        return now if now > core else core

    def catch_up(self) -> int:
        """convert.Clock: move the core's clock to now (running the timers due), before a call
        that names a deadline; returns now."""
        self.hv.advance_time(self.now_ns())
        return self.hv.sched.now_ns

    def _arm_timer(self) -> None:
        deadline = self.hv.next_deadline()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_deadline = None, deadline
        if deadline is not None:
            self._timer = self._loop.call_at(self._epoch + deadline / 1e9, self._fire)

    def _fire(self) -> None:
        deadline, self._timer, self._timer_deadline = self._timer_deadline, None, None
        try:
            self.hv.advance_time(max(self.now_ns(), deadline))
            self.drain()
        except Exception as exc:  # noqa: BLE001 - a timer has no caller to fail; log it as the bug it is
            status_of(exc, "advance_time")

    # -- vCPUs --------------------------------------------------------------------------------

    def slot(self, domid: int, vcpu_id: int) -> VcpuSlot:
        key = (domid, vcpu_id)
        slot = self.slots.get(key)
        if slot is None:
            domain = self.hv.domains[domid]
            slot = self.slots[key] = VcpuSlot(domain, domain.vcpus[vcpu_id])
        return slot

    def attach(self, slot: VcpuSlot, context: grpc.aio.ServicerContext) -> Stream:
        if slot.stream is not None:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"dom{slot.domid} vCPU {slot.vcpu_id} already has a Session open")
        slot.stream = Stream(self, slot, context)
        if self.gate is not None:
            self.gate.attached(slot)
        log.info("dom%d vCPU %d: Session opened by %s", slot.domid, slot.vcpu_id, context.peer())
        return slot.stream

    def detach(self, stream: Stream) -> None:
        """The stream is gone; the vCPU's state stays for the next process that attaches. Called
        again once its handler has unwound: a dead process's message that ran on (`_take_back`)
        is then over, and the vCPU's next process hears from it."""
        slot = stream.slot
        if slot.stream is stream:
            slot.stream = None
            if self.gate is not None:
                self.gate.detached(slot)
            log.info("dom%d vCPU %d: Session closed", slot.domid, slot.vcpu_id)
        elif slot.orphan is stream.task:
            slot.orphan = None
            log.info("dom%d vCPU %d: the message of its dead process is over", slot.domid, slot.vcpu_id)
            if slot.stream is not None:
                slot.stream.attention.set()

    def end_session(self, domid: int, vcpu_id: int, exc: Exception) -> bool:
        """End the vCPU's Session, if one is open, with `exc` (DetachSession). The vCPU is free
        for another process at once, before the handler has unwound."""
        slot = self.slots.get((domid, vcpu_id))
        stream = slot.stream if slot is not None else None
        if stream is None:
            return False
        self.detach(stream)
        self.end_task(stream.task, exc)
        return True

    def session_open(self, domid: int, vcpu_id: int) -> bool:
        slot = self.slots.get((domid, vcpu_id))
        return slot is not None and slot.stream is not None

    def sessions_open(self) -> int:
        return sum(slot.stream is not None for slot in self.slots.values())

    def call(self, slot: VcpuSlot, op: str, args: dict):
        """Run one hypercall of `slot`'s vCPU: wait while its domain is paused, run it on the
        core, going on with it after every preemption point until it is over, then sleep if it
        blocked. Kicks are drained whatever the outcome. Its time in the core is observed once,
        when it is over (the core counts it, Hypervisor.count).

        Its result when it is over at once, without waiting, as most calls are: that costs no
        coroutine and no turn of the loop. Otherwise `Later`, which the caller awaits for it."""
        if slot.domid in self.paused or self.hv.budget.work - self._yielded_at >= self.hv.budget.per_call:
            return Later(self._when_ready(slot, op, args))
        in_core = None if self.observe is None else [0.0]
        try:
            if in_core is None:  # `_run` without metrics, inline: this is every call's path
                try:
                    result = self.hv.hypercall(slot.domid, slot.vcpu_id, op, **args)
                finally:
                    self.drain()
            else:
                result = self._run(in_core, self.hv.hypercall, slot.domid, slot.vcpu_id, op, **args)
        except BaseException:
            self._over(op, in_core)
            raise
        if isinstance(result, Continuation):
            return Later(self._go_on(slot, op, in_core, result))
        return self._done(slot, op, in_core, result)

    async def _when_ready(self, slot: VcpuSlot, op: str, args: dict):
        """`call`, once the domain is unpaused and calls have given way."""
        await self._whole(slot, partial(self._unpaused, slot.domid))
        if self.hv.budget.work - self._yielded_at >= self.hv.budget.per_call:
            await self._give_way(slot)
        result = self.call(slot, op, args)
        return await result if isinstance(result, Later) else result

    async def _go_on(self, slot: VcpuSlot, op: str, in_core: list[float] | None, result: Continuation):
        """Go on with a call that stopped at a preemption point, after every other call."""
        try:
            while isinstance(result, Continuation):
                await self._give_way(slot)
                await self._whole(slot, partial(self._may_go_on, slot))
                result = self._run(in_core, self.hv.resume, slot.domid, slot.vcpu_id, result)
        except BaseException:
            self._over(op, in_core)
            raise
        result = self._done(slot, op, in_core, result)
        return await result if isinstance(result, Later) else result

    def _done(self, slot: VcpuSlot, op: str, in_core: list[float] | None, result):
        """A call that ran to its end: its result, or Later if it blocked (it answers 0 once woken)."""
        self._over(op, in_core)
        if result is not BLOCKED:
            return result
        stepped = self.gate is not None and slot.orphan is None and self.gate.done(slot)  # a controlled run's step ends here (an orphan's, at its death)
        return Later(self._sleep(slot, stepped))

    def _over(self, op: str, in_core: list[float] | None) -> None:
        """The call is over: its time in the core observed (with metrics on)."""
        if in_core is not None:
            self.observe(op, in_core[0])

    async def _sleep(self, slot: VcpuSlot, stepped: bool) -> int:
        """A call that blocked: it answers 0 once its vCPU is woken and its domain unpaused (and,
        if it blocked inside a controlled run's step, once the gate gives the rest of its message
        a step of its own, docs/schedule.md section 1). A message whose process died on the way
        (`_take_back`) ends here: the vCPU stays asleep, free for a new process."""
        self.end_orphan(asyncio.current_task())
        while slot.vcpu.blocked:
            slot.wake.clear()
            await slot.wake.wait()
        await self._unpaused(slot.domid)
        if stepped:
            await self.gate.turn(slot)
        return 0

    def _run(self, in_core: list[float] | None, core_call, *args, **kwargs):
        """A call into the core; the kicks it made are drained whatever its outcome, and the
        time it took is added to in_core[0] (when it is timed: with metrics on)."""
        if in_core is None:
            try:
                return core_call(*args, **kwargs)
            finally:
                self.drain()
        started = perf_counter()
        try:
            return core_call(*args, **kwargs)
        finally:
            in_core[0] += perf_counter() - started
            self.drain()

    async def _may_go_on(self, slot: VcpuSlot) -> None:
        """Wait until a call that stopped at a preemption point may go on: not while its domain
        is paused, and not while its vCPU is down. Xen keeps a continuation in the vCPU's
        registers, and a vCPU that VCPUOP_down took down runs nothing until VCPUOP_up makes it
        runnable again (vcpu_runnable, xen/include/xen/sched.h); VCPUOP_up kicks the vCPU,
        which sets its `wake`. A domain that shut down never runs its vCPUs again: the call
        goes on at once, and the core refuses it as it refuses that vCPU's every call
        (VcpuNotRunning)."""
        while True:
            await self._unpaused(slot.domid)
            domain = self.hv.domains.get(slot.domid)
            if domain is None or domain.shutdown_code is not None or not slot.vcpu.down:
                return
            slot.wake.clear()
            await slot.wake.wait()

    async def _give_way(self, slot: VcpuSlot) -> None:
        """A preemption point: every call that is ready runs before this one goes on."""
        self._yielded_at = self.hv.budget.work
        await self._whole(slot, partial(asyncio.sleep, 0))

    async def _whole(self, slot: VcpuSlot, wait: Callable[[], Awaitable]) -> None:
        """Await `wait()` in the middle of `slot`'s call: a give-way, or the wait for its
        domain's unpause or its vCPU's VCPUOP_up. None of these is a point at which a message
        may end (docs/transport.md section 8): grpc cancels the handler of a process that died
        at its next await, which is usually one of these, and the guest relies on a message
        running whole (its page pools are written at the end of the message that uses their
        pages). So a death is taken back (`_take_back`) and the wait begins again, as a paused
        vCPU's hypercall goes on at the unpause in Xen; an ending from outside (`end_task`)
        still ends the message here."""
        while True:
            try:
                return await wait()
            except asyncio.CancelledError:
                if not self._take_back(slot):
                    raise

    def _take_back(self, slot: VcpuSlot) -> bool:
        """A cancellation of the running handler in the middle of `slot`'s call: False if it is
        an ending from outside. Otherwise the process died: its message goes on, an orphan, to
        its end or to a call that sleeps (`end_orphan`). Its vCPU is free for a new process at
        once, since the orphan may wait long for an unpause: the new process's messages wait
        for the vCPU's lock, which the orphan holds to its end, and it hears nothing from the
        vCPU until then (`Stream._due`: a VcpuStarted would show registers the orphan may
        still change)."""
        task = asyncio.current_task()
        if task in self._endings:
            return False
        task.uncancel()
        self._orphans.add(task)
        stream = slot.stream
        if stream is not None and stream.task is task:
            self.detach(stream)
            slot.orphan = task
        return True

    def end_orphan(self, task: asyncio.Task) -> None:
        """End the message that handler `task` runs here if its process died during it (the
        cancellation `_take_back` held back): after its last call, or where it sleeps."""
        if task in self._orphans:
            self._orphans.discard(task)
            raise asyncio.CancelledError

    async def _unpaused(self, domid: int) -> None:
        gate = self.paused.get(domid)
        if gate is not None:
            await gate.wait()

    def drain(self) -> None:
        """Look at the vCPUs the core kicked, if it kicked any, and re-arm the timer (a controlled
        run's gate fires the timers itself, on virtual time, and looks again at whom it waits for)."""
        for key in self.hv.take_kicks() if self.hv.sched.kicks else ():
            slot = self.slots.get(key)
            if slot is not None:
                slot.wake.set()
                if slot.stream is not None:
                    slot.stream.attention.set()
        if self.gate is None:
            self._arm_timer()
        else:
            self.gate.poke()

    def poke(self, domid: int) -> None:
        """Have every stream of the domain look at its vCPU (after an unpause)."""
        for slot in self.slots.values():
            if slot.domid == domid and slot.stream is not None:
                slot.stream.attention.set()

    # -- pause ----------------------------------------------------------------------------------

    def pause(self, domid: int) -> None:
        self.paused.setdefault(domid, asyncio.Event())

    def unpause(self, domid: int) -> None:
        gate = self.paused.pop(domid, None)
        if gate is not None:
            gate.set()
        self.poke(domid)

    # -- ending calls from outside ------------------------------------------------------------

    @contextmanager
    def guard(self, domid: int | None):
        """Register the running handler under `domid` (None: a toolstack stream), so that it
        can be ended from outside: it then raises the exception it was ended with."""
        task = asyncio.current_task()
        tasks = self._tasks.setdefault(domid, set())
        tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            ending = self._endings.pop(task, None)
            if ending is None:
                raise
            task.uncancel()
            raise ending from None
        finally:
            tasks.discard(task)
            self._endings.pop(task, None)
            self._orphans.discard(task)

    def end_task(self, task: asyncio.Task, exc: Exception) -> None:
        """End a registered handler: it raises `exc` (see `guard`), once any Session message it
        is sending has gone out (see `send`)."""
        if task not in self._endings:
            self._endings[task] = exc
            if task not in self._writing:
                task.cancel()

    async def send(self, stream: Stream, message: hypercalls_pb2.SessionResponse, task: asyncio.Task) -> None:
        """Send a Session message from `task` (the running one: the stream's handler or its
        pusher, which the caller knows), stamped with Xen's system time (errors.write).

        An ending that comes meanwhile (shutdown, DestroyDomain, DetachSession) waits for the
        message to go out, because grpc refuses a stream's closing status while a send is in
        flight (TOO_MANY_OPERATIONS), which turned a clean UNAVAILABLE or ABORTED into a logged
        error. Costs a set insertion per message, where shielding each write cost a task."""
        message.system_time_ns = self.now_ns()
        self._writing.add(task)
        try:
            await write(stream.context, message, stream.name)
        finally:
            self._writing.discard(task)
            if task in self._endings:
                task.cancel()

    def forget_domain(self, domid: int) -> None:
        """DestroyDomain, before the core tears the domain down: end the domain's calls and
        streams with ABORTED (each raises it when it next runs, so none reaches the core
        again), drop its state."""
        for task in list(self._tasks.pop(domid, ())):
            self.end_task(task, Refused(grpc.StatusCode.ABORTED, f"dom{domid} was destroyed"))
        for key in [key for key in self.slots if key[0] == domid]:
            del self.slots[key]
        self.paused.pop(domid, None)

    def end_all(self, exc: Exception) -> None:
        for tasks in self._tasks.values():
            for task in list(tasks):
                self.end_task(task, exc)
        if self._timer is not None:
            self._timer.cancel()
