"""The benchmark suite behind `xensim bench`: groups of keys, one JSON report.

Each module named in GROUPS has `run() -> {key: {"value": ..., "unit": ..., ...}}`; a group is
a key prefix, and one module may measure keys of several groups side by side. Ratios are taken
within one module's run, since these machines are shared and noisy.
"""

import importlib
import os
import platform
import time

GROUPS = {
    "core": ["xensim.bench.core_mmu", "xensim.bench.core_cpu", "xensim.bench.core_evtchn"],
    "rpc": ["xensim.bench.rpc"],
    "ipi": ["xensim.bench.guest"],
    "guest": ["xensim.bench.guest"],
    "stress": ["xensim.bench.stress"],
    "server": ["xensim.bench.stress"],
    "load": ["xensim.bench.load", "xensim.bench.revalidation"],
    "sched": ["xensim.bench.sched"],
    "hunt": ["xensim.bench.hunt"],
    "trace": ["xensim.bench.trace"],
    "scale": ["xensim.bench.scale"],
}


def run(only: str | None = None, progress=print) -> dict:
    if only is not None and only not in GROUPS:
        raise SystemExit(f"unknown benchmark group {only!r}; groups: {', '.join(GROUPS)}")
    report = {
        "_context": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    }
    modules = dict.fromkeys(m for group, names in GROUPS.items() if only in (None, group) for m in names)
    for name in modules:
        progress(f"running {name} ...")
        for key, result in importlib.import_module(name).run().items():
            if only is None or key.startswith(f"{only}."):
                report[key] = result
                progress(f"  {key} = {result['value']:.6g} {result['unit']}")
                for row in result.get("rows", ()):  # a growth table
                    progress(f"      {row}")
    return report
