"""`xensim xl pagetable`: the tree under a base pointer drawn as a picture.

One box per table frame, in a column per level (the top level on the left: an L4, or a 32-bit
domain's PAE L3, whose slot-3 L2 is marked pae_xen_l2; L1 on the right), each with its mfn,
type count, general count, and whether it is pinned and validated. An arrow per
present entry that leads to a table, labelled with its slot: solid when the entry is
writable (RW), dashed when read-only. Trees are drawn together and every frame once, so a
kernel subtree that several L4s share (Linux copies the kernel half of the pgd into every
process's) appears once with one arrow from each L4. An L1 box counts its mappings instead
of drawing 512 data frames. The frame given with --highlight is outlined in red wherever
it appears: as a table, as an arrow's target, or among an L1's mappings (listed with slot
and RW). The page needs nothing from the network; a small script lists the highlighted
places and, on a click, highlights another mfn.
"""

import argparse
import html
import json
from pathlib import Path

from xensim.v1 import toolstack_pb2
from xensim.xl import EXIT_REFUSED, EXIT_USAGE, Failed, level_name, mfn_arg, pagetable_record

BOX_W, BOX_H, GAP_Y, COL_W, MARGIN = 230, 80, 14, 320, 30  # a box holds five lines
RW = 0x2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domid", type=int, metavar="DOMID", help="the domain whose tables to draw")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cr3", type=int, metavar="VCPU", help="the kernel base (or --user base) of this vCPU (default: every base of every vCPU)")
    which.add_argument("--mfn", type=mfn_arg, metavar="MFN", help="the tree under this table")
    parser.add_argument("--user", action="store_true", help="with --cr3: the user base instead of the kernel one")
    parser.add_argument("--highlight", type=mfn_arg, metavar="MFN", help="outline this frame wherever it appears")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--html", metavar="OUT", help="write a self-contained HTML page")
    out.add_argument("--svg", metavar="OUT", help="write the picture alone as SVG")


def roots(xl, args) -> list[tuple[int, str]]:
    """The base pointers to draw: (mfn, label)."""
    if args.mfn is not None:
        xl("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=args.domid))  # ESRCH for an unknown domain
        return [(args.mfn, f"mfn {args.mfn:#x}")]
    request = toolstack_pb2.VcpuInfoRequest(domid=args.domid)
    if args.cr3 is not None:
        request.vcpu = args.cr3
    found: dict[int, list[str]] = {}
    for v in xl("VcpuInfo", request).vcpus:
        for base, kind in ((v.kernel_cr3_mfn, "kernel"), (v.user_cr3_mfn, "user")):
            if base and (args.cr3 is None or (kind == "user") == args.user):
                found.setdefault(base, []).append(f"vCPU{v.vcpu_id} {kind}")
    if not found:
        raise Failed(f"dom{args.domid}: no vCPU has a {'user' if args.user else 'kernel'} base pointer to draw", EXIT_REFUSED)
    return [(mfn, ", ".join(labels)) for mfn, labels in found.items()]


def cmd_pagetable(xl, args) -> tuple:
    tables: dict[str, dict] = {}
    bases = roots(xl, args)
    for mfn, _ in bases:
        for t in xl("DumpPagetable", toolstack_pb2.DumpPagetableRequest(mfn=mfn, tree=True)).tables:
            record = pagetable_record(t)
            tables.setdefault(record["frame"]["mfn"], record)
    highlight = None if args.highlight is None else f"{args.highlight:#x}"
    picture = Picture(tables, [(f"{m:#x}", label) for m, label in bases], highlight)
    title = f"dom{args.domid} pagetables"
    out = args.html or args.svg
    try:
        Path(out).write_text(picture.page(title) if args.html else picture.svg())
    except OSError as e:
        raise Failed(f"cannot write {out}: {e.strerror}", EXIT_USAGE) from None
    data = {"out": out, "roots": [{"mfn": m, "label": label} for m, label in picture.roots], "tables": len(tables), "highlight": highlight, "highlighted": picture.hits}
    where = f"; {highlight} appears {len(picture.hits)} times" if highlight else ""
    return data, f"wrote {out}: {len(tables)} tables under {len(bases)} base pointers{where}"


class Picture:
    """The layout and the SVG of a set of trees (`tables`: pagetable records by hex mfn)."""

    def __init__(self, tables: dict[str, dict], roots: list[tuple[str, str]], highlight: str | None):
        self.tables, self.roots, self.highlight = tables, roots, highlight
        self.top = max((t["level"] for t in tables.values()), default=4)  # 4, or 3 for a PAE domain: its leftmost column
        self.address_size = next((t["address_size"] for t in tables.values()), 64)
        self.y: dict[str, float] = {}
        self._cursor = {level: MARGIN + 30 for level in (1, 2, 3, 4)}
        for mfn, _ in roots:
            self._place(mfn)
        self.hits: list[dict] = []

    def children(self, mfn: str) -> list[tuple[dict, str]]:
        """(entry, child mfn) for each entry of `mfn` that leads to a drawn table."""
        return [
            (e, e["mfn"]) for e in self.tables[mfn]["entries"] if not e["xen_slot"] and e["mfn"] in self.tables and e["mfn"] != mfn and self.tables[e["mfn"]]["level"] == self.tables[mfn]["level"] - 1
        ]

    def _place(self, mfn: str) -> None:
        """Post-order: children first, then the parent level with its first child, below
        everything already in its column."""
        self.y[mfn] = -1.0  # visiting: a cycle through a shared table is drawn once
        placed = []
        for _, child in self.children(mfn):
            if child not in self.y:
                self._place(child)
                placed.append(self.y[child])
        level = self.tables[mfn]["level"]
        y = max(self._cursor[level], min(placed, default=0))
        self.y[mfn] = y
        self._cursor[level] = y + BOX_H + GAP_Y

    def x(self, mfn: str) -> float:
        return MARGIN + (self.top - self.tables[mfn]["level"]) * COL_W

    def svg(self) -> str:
        self.hits = []
        height = max(self._cursor.values()) + MARGIN
        width = MARGIN * 2 + (self.top - 1) * COL_W + BOX_W
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" font-family="monospace" font-size="12">', _DEFS]
        for level in range(self.top, 0, -1):
            parts.append(f'<text x="{MARGIN + (self.top - level) * COL_W}" y="{MARGIN}" font-weight="bold">{level_name(level, self.address_size)}</text>')
        for mfn in self.y:
            for entry, child in self.children(mfn):
                parts.append(self._edge(mfn, entry, child))
        for mfn in self.y:
            parts.append(self._box(mfn))
        parts.append("</svg>")
        return "\n".join(parts)

    def _edge(self, parent: str, entry: dict, child: str) -> str:
        x1, y1 = self.x(parent) + BOX_W, self.y[parent] + BOX_H / 2
        x2, y2 = self.x(child), self.y[child] + BOX_H / 2
        writable = int(entry["entry"], 16) & RW
        hot = child == self.highlight
        if hot:
            self.hits.append({"where": "entry", "table": parent, "slot": entry["slot"], "writable": bool(writable)})
        cls = "edge " + ("rw" if writable else "ro") + (" hot" if hot else "")
        return (
            f'<g class="{cls}" data-target="{child}"><path d="M{x1:.0f},{y1:.0f} C{x1 + 40:.0f},{y1:.0f} {x2 - 40:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" marker-end="url(#arrow)"/>'
            f'<text x="{(x1 + x2) / 2 - 14:.0f}" y="{(y1 + y2) / 2 - 4:.0f}">[{entry["slot"]}]{"" if writable else " ro"}</text></g>'
        )

    def _box(self, mfn: str) -> str:
        t = self.tables[mfn]
        f = t["frame"]
        x, y = self.x(mfn), self.y[mfn]
        state = f"{'pinned' if f['pinned'] else 'not pinned'}, {'validated' if f['validated'] else 'not validated'}"
        root = [label for m, label in self.roots if m == mfn]
        lines = [f"{t['name']} {mfn}" + (" pae_xen_l2" if f["pae_xen_l2"] else "") + (f"  [{root[0]}]" if root else ""), f"tc {f['type_count']}  c {f['count']}  dom{f['owner']}", state]
        classes = ["table", f"l{t['level']}"] + (["pinned"] if f["pinned"] else []) + (["root"] if root else []) + (["pae-xen-l2"] if f["pae_xen_l2"] else [])
        if mfn == self.highlight:
            classes.append("hot")
            self.hits.append({"where": "table", "table": mfn})
        if t["level"] == 1:
            maps = [e for e in t["entries"] if not e["xen_slot"]]
            rw = sum(1 for e in maps if int(e["entry"], 16) & RW)
            lines.append(f"{len(maps)} mappings, {rw} writable")
            mapped = [e for e in maps if e["mfn"] == self.highlight]
            for e in mapped:
                self.hits.append({"where": "mapping", "table": mfn, "slot": e["slot"], "writable": bool(int(e["entry"], 16) & RW)})
            if mapped:
                classes.append("maps-hot")
                shown = ", ".join(f"[{e['slot']}]{' RW' if int(e['entry'], 16) & RW else ''}" for e in mapped[:3])
                lines.append(f"maps {self.highlight} at {shown}" + (f" +{len(mapped) - 3}" if len(mapped) > 3 else ""))
        text = "".join(f'<text x="{x + 8}" y="{y + 16 + 14 * i:.0f}">{html.escape(line)}</text>' for i, line in enumerate(lines))
        title = html.escape(json.dumps({k: f[k] for k in ("mfn", "type", "type_count", "count", "pinned", "validated", "owner", "pfn", "pae_xen_l2")}))
        return f'<g class="{" ".join(classes)}" data-mfn="{mfn}"><title>{title}</title><rect x="{x}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6"/>{text}</g>'

    def page(self, title: str) -> str:
        svg = self.svg()
        legend = (
            "solid arrow: writable entry (RW); dashed: read-only; thick border: pinned; "
            "grey: not validated (its entries hold no references); red: the highlighted frame. Click a box to highlight its mfn."
        )
        return _PAGE.format(title=html.escape(title), legend=legend, svg=svg, highlight=_script_json(self.highlight), hits=_script_json(self.hits))


def _script_json(value) -> str:
    """JSON to embed in a <script>: it may not contain "</" (which would end the script)."""
    return json.dumps(value).replace("</", "<\\/")


_DEFS = """<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>
<style>
.table rect { fill: #f4f7ff; stroke: #4a6fa5; stroke-width: 1.2; }
.table.l1 rect { fill: #f6fbf2; stroke: #5b8c3a; }
.table.pinned rect { stroke-width: 3; }
.table.root rect { fill: #fff8e6; }
.edge path { fill: none; stroke: #555; stroke-width: 1.2; }
.edge.ro path { stroke-dasharray: 5 3; }
.edge text { fill: #555; font-size: 10px; }
.hot rect, .maps-hot rect { stroke: #d62728 !important; stroke-width: 3.5 !important; }
.edge.hot path { stroke: #d62728; stroke-width: 2.5; }
</style>"""

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 16px; }} #where li {{ font-family: monospace; }} .grey rect {{ fill: #eee !important; }}</style>
</head><body>
<h1>{title}</h1>
<p>{legend}</p>
<p id="summary"></p>
<ul id="where"></ul>
{svg}
<script>
const hits = {hits};
let highlight = {highlight};
function show() {{
  const summary = document.getElementById("summary");
  const where = document.getElementById("where");
  where.innerHTML = "";
  if (!highlight) {{ summary.textContent = "No frame highlighted."; return; }}
  document.querySelectorAll(".table").forEach(g => g.classList.toggle("hot", g.dataset.mfn === highlight));
  document.querySelectorAll(".edge").forEach(g => g.classList.toggle("hot", g.dataset.target === highlight));
  const places = document.querySelectorAll(".table.hot, .edge.hot, .maps-hot").length;
  summary.textContent = "mfn " + highlight + " appears in " + places + " places";
  for (const h of hits.filter(h => h.table !== undefined)) {{
    const li = document.createElement("li");
    li.textContent = h.where === "table" ? "the table " + h.table : (h.where === "entry" ? "entry " : "mapping ") + h.slot + " of " + h.table + (h.writable ? " (RW)" : " (read-only)");
    where.appendChild(li);
  }}
}}
document.querySelectorAll(".table").forEach(g => {{
  if (g.querySelector("text:nth-of-type(3)").textContent.includes("not validated")) g.classList.add("grey");
  g.addEventListener("click", () => {{ highlight = g.dataset.mfn; hits.length = 0; show(); }});
}});
show();
</script>
</body></html>
"""
