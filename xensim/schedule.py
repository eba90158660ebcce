"""--schedule for the programs that start a hypervisor (demo, stress): one place that reads it,
passes it to the server, and puts what the run was into the report (docs/schedule.md)."""

import argparse
import json
import os
from collections import deque
from dataclasses import dataclass

from hypervisor.core.policy import STEP_QUANTUM_NS, ScheduleSpec, parse_schedule
from hypervisor.server.schedule import check_kills, load_record
from xensim.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schedule",
        default="free",
        metavar="free|random:SEED|pct:SEED[:DEPTH]|replay:FILE",
        help="free: the operating system interleaves the vCPUs (default); otherwise the hypervisor schedules them, the seed names the interleaving, "
        "time is Xen's virtual system time, and replay:FILE runs a recorded schedule again (docs/schedule.md)",
    )
    parser.add_argument("--steps", type=int, metavar="N", help="with a controlled --schedule: run N steps of Xen system time (instead of --seconds)")
    parser.add_argument("--schedule-file", metavar="FILE", help="where a controlled run's schedule is written (default: beside the trace, else in the current directory)")


@dataclass(frozen=True)
class Schedule:
    """What --schedule, --seed, --seconds and --steps make of a run."""

    spec: ScheduleSpec
    seed: int
    seconds: float  # wall seconds in a free run; Xen system time in a controlled one
    file: str | None  # the schedule file a controlled run writes
    kill_vcpus: float = 0.0  # a controlled run's kills per vCPU per second, the schedule's (docs/schedule.md section 10)

    @property
    def controlled(self) -> bool:
        return self.spec.controlled

    def server_args(self) -> tuple[str, ...]:
        if not self.controlled:
            return ()
        steps = max(int(self.seconds * 1e9 / STEP_QUANTUM_NS), 2)
        kills = ("--schedule-kills", f"{self.kill_vcpus!r}") if self.kill_vcpus and self.spec.mode != "replay" else ()
        return ("--schedule", str(self.spec), "--schedule-file", self.file, "--schedule-steps", str(steps), *kills)

    def words(self) -> list[str]:
        """The options that reproduce this: a controlled run replays its seed's schedule."""
        return ["--schedule", str(self.spec), "--seed", str(self.seed)] if self.controlled else ["--seed", str(self.seed)]

    def report(self, trace: str | None) -> dict:
        """The report's schedule, seed, final state digest (the trace's end record, None
        without a trace), and for a controlled run its steps and where determinism was lost."""
        out = {"schedule": str(self.spec), "seed": self.seed, "final_state_digest": _final_digest(trace)}
        if self.controlled:
            record = _read_json(self.file)
            out |= {"schedule_file": self.file, "steps": len(record.get("steps", ())), "lost_determinism": record.get("lost_determinism", []), "kill_steps": record.get("kills", [])}
        return out


def resolve(args: argparse.Namespace, trace: str | None, kill_vcpus: float = 0.0) -> Schedule:
    """Check --schedule with the options it changes (and --kill-vcpus, which a replay takes
    from its file); UsageError says what does not fit."""
    try:
        spec = parse_schedule(args.schedule)
        recorded = load_record(spec.file) if spec.mode == "replay" else {}
        if recorded:
            check_kills(recorded, spec.file, kill_vcpus)
            kill_vcpus = recorded.get("kill_vcpus", 0.0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seconds = args.seconds
    if args.steps is not None:
        if not spec.controlled:
            raise UsageError("--steps counts the steps of a controlled run: give --schedule random:SEED or pct:SEED too")
        if args.steps < 1:
            raise UsageError("--steps must be at least 1")
        seconds = args.steps * STEP_QUANTUM_NS / 1e9
    seed = args.seed if args.seed is not None else spec.seed if spec.seed is not None else recorded.get("seed", 1)
    file = None
    if spec.controlled:
        file = args.schedule_file or (f"{trace.removesuffix('.gz').removesuffix('.jsonl').removesuffix('.trace')}.schedule.json" if trace else os.path.abspath("xensim.schedule.json"))
    return Schedule(spec, seed, seconds, file, kill_vcpus)


def _read_json(path: str | None) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, TypeError, ValueError):
        return {}


def _final_digest(trace: str | None) -> str | None:
    """The digest in the trace's end record; None without one (the server did not stop cleanly)."""
    if not trace or not os.path.exists(trace):
        return None
    from hypervisor.core.trace import TraceError
    from hypervisor.server.tracing import read_trace

    try:
        ends = deque(read_trace(trace), maxlen=1)
    except TraceError:
        return None
    last = ends[0][1] if ends else None
    return last.get("digest") if isinstance(last, dict) else None
