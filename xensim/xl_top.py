"""`xensim xl top`: each domain's hypercall rates by op and outcome, refreshed like xentop.

Each sample reads the Toolstack's DomainStats (each domain's counts since it was created,
by op and errno) and shows what changed since the previous one, per second, beside the
totals. With --iterations the command stops after that many samples, which is how tests and
scripts use it; with --json each sample is one JSON line.
"""

import json
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from xensim.xl import domain_counts


def sample(before: dict, after: dict, seconds: float) -> list[dict]:
    """One row per (domain, op, outcome) seen so far: its rate over the interval and its
    total; by domain, busiest first."""
    rows = [
        {"domid": domid, "op": op, "outcome": outcome, "per_s": round((n - before.get((domid, op, outcome), 0)) / seconds, 1), "total": n}
        for (domid, op, outcome), n in after.items()
    ]
    return sorted(rows, key=lambda r: (r["domid"], -r["per_s"], -r["total"], r["op"], r["outcome"]))


def render(rows: list[dict], server: str) -> Table:
    view = Table(title=f"xensim top: {server}", caption="rates over the last interval; totals since each domain was created")
    for name, justify in (("domain", "right"), ("op", "left"), ("outcome", "left"), ("per s", "right"), ("total", "right")):
        view.add_column(name, justify=justify)
    for r in rows:
        style = None if r["outcome"] == "ok" else "red"
        view.add_row(f"dom{r['domid']}", r["op"], r["outcome"], f"{r['per_s']:.1f}", str(r["total"]), style=style)
    return view


def cmd_top(xl, args) -> tuple:
    console = Console()
    before, taken = domain_counts(xl), time.monotonic()
    live = None if args.json or args.iterations else Live(render([], xl.server), console=console, auto_refresh=False)
    done = 0
    try:
        if live:
            live.start()
        while args.iterations is None or done < args.iterations:
            time.sleep(args.interval)
            after, now = domain_counts(xl), time.monotonic()
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
