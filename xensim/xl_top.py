"""`xensim xl top`: hypercall rates by op and outcome, refreshed like xentop.

Each sample reads the Toolstack's Stats (counts since the server started, by op and errno)
and shows what changed since the previous one, per second, beside the totals. With
--iterations the command stops after that many samples, which is how tests and scripts use
it; with --json each sample is one JSON line.
"""

import json
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from xensim.v1 import common_pb2, toolstack_pb2


def _counts(xl) -> dict[tuple[str, str], int]:
    counts = xl("Stats", toolstack_pb2.StatsRequest()).counts
    return {(c.op, common_pb2.XenErrno.Name(c.errno).removeprefix("XEN_ERRNO_") if c.errno else "ok"): c.count for c in counts}


def sample(before: dict, after: dict, seconds: float) -> list[dict]:
    """One row per (op, outcome) seen so far: its rate over the interval and its total,
    busiest first."""
    rows = [{"op": op, "outcome": outcome, "per_s": round((n - before.get((op, outcome), 0)) / seconds, 1), "total": n} for (op, outcome), n in after.items()]
    return sorted(rows, key=lambda r: (-r["per_s"], -r["total"], r["op"], r["outcome"]))


def render(rows: list[dict], server: str) -> Table:
    view = Table(title=f"xensim top: {server}", caption="rates over the last interval; totals since the server started")
    for name, justify in (("op", "left"), ("outcome", "left"), ("per s", "right"), ("total", "right")):
        view.add_column(name, justify=justify)
    for r in rows:
        style = None if r["outcome"] == "ok" else "red"
        view.add_row(r["op"], r["outcome"], f"{r['per_s']:.1f}", str(r["total"]), style=style)
    return view


def cmd_top(xl, args) -> tuple:
    console = Console()
    before, taken = _counts(xl), time.monotonic()
    live = None if args.json or args.iterations else Live(render([], xl.server), console=console, auto_refresh=False)
    done = 0
    try:
        if live:
            live.start()
        while args.iterations is None or done < args.iterations:
            time.sleep(args.interval)
            after, now = _counts(xl), time.monotonic()
            rows = sample(before, after, now - taken)
            before, taken, done = after, now, done + 1
            if args.json:
                print(json.dumps({"sample": done, "rows": rows}), flush=True)
            elif live:
                live.update(render(rows, xl.server), refresh=True)
            else:
                console.print(render(rows, xl.server))
    finally:
        if live:
            live.stop()
    return None, None
