"""Reading a bench report: the tables, the notes, and compare mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

from darkspec.bench.cases import size_label
from darkspec.bench.matrix import SCHEMA
from darkspec.errors import DarkspecError


def _ms(figures: dict | None) -> str:
    if not figures or "median_s" not in figures:
        return "error" if figures else "n/a"
    return f"{figures['median_s'] * 1e3:.3g} [{figures['p20_s'] * 1e3:.3g}, {figures['p80_s'] * 1e3:.3g}]"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def baselines_of(report: dict) -> list[str]:
    return list(dict.fromkeys(r["backend"] for r in report["results"] if r["kind"] == "baseline"))


def table(report: dict, results=None) -> str:
    """One row per contender and case: median time [p20, p80], GB/s, % of the same-run copy, time ÷ each baseline's
    (below 1: faster), and the first call (a compile, for torch.compile)."""
    results = report["results"] if results is None else results
    names = baselines_of(report)
    rows = []
    for r in results:
        vs = r.get("vs") or {}
        rows.append([r["backend"], r["label"], size_label(r["shape"]), r["dtype"], r["threads"] or "",
                     _ms(r["time"]), "" if r["gbps"] is None else f"{r['gbps']:.2f}", _pct(r["pct_of_copy"]),
                     *("" if n not in vs else f"{vs[n]:.2f}" for n in names),
                     "" if r["first_call_s"] is None else f"{r['first_call_s']:.2g}"])
    headers = ["contender", "case", "size", "dtype", "threads", "ms median [p20, p80]", "GB/s", "% copy",
               *(f"÷ {n}" for n in names), "first call s"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def summary(report: dict, largest_only: bool = True):
    """Per group: configurations, contenders, and the median % of copy bandwidth over the dtypes and thread counts
    at the largest size measured (``largest_only``) or over every size."""
    out = {}
    largest = max((tuple(r["shape"]) for r in report["results"]), key=lambda s: np.prod(s), default=None)
    for r in report["results"]:
        if largest_only and tuple(r["shape"]) != largest:
            continue
        group = out.setdefault(r["group"], {})
        cell = group.setdefault(r["configuration"], {}).setdefault(r["backend"], [])
        if r["pct_of_copy"] is not None:
            cell.append(r["pct_of_copy"])
    return largest, {g: {cfg: {b: float(np.median(v)) if v else None for b, v in row.items()}
                         for cfg, row in configs.items()} for g, configs in out.items()}


def summary_table(report: dict) -> str:
    largest, groups = summary(report)
    parts = []
    for group, configs in groups.items():
        contenders = list(dict.fromkeys(b for row in configs.values() for b in row))
        rows = [[cfg, *(_pct(row.get(b)) for b in contenders)] for cfg, row in configs.items()]
        parts.append(tabulate(rows, headers=[f"{group}: % of copy at {size_label(largest)}", *contenders],
                              disable_numparse=True))
    return "\n\n".join(parts)


def notes(report: dict) -> list[str]:
    machine = report["machine"]
    lines = [f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable core(s), "
             f"{machine['llc_bytes'] >> 20} MiB last-level cache, load average {machine.get('load_average')}; "
             f"allocator: {report['allocator']}"]
    warm = sum(not r["cache_cold"] for r in report["results"])
    if warm:
        lines.append(f"{warm} of {len(report['results'])} results rotate over less than twice the last-level cache: "
                     f"their figures include cache hits")
    spreads = [r["time"]["spread"] for r in report["results"] if r["gbps"]]
    if spreads:
        lines.append(f"spread (p80-p20)/median: median {100 * float(np.median(spreads)):.0f}%, "
                     f"largest {100 * max(spreads):.0f}%")
    for name, state in report["baselines"].items():
        if state is False:
            lines.append(f"baseline {name}: not measured")
        elif isinstance(state, str) and state.startswith("not measured"):
            lines.append(f"baseline {name}: {state}")
    for b in report["backends"]:
        if not b["available"]:
            lines.append(f"{b['name']}: unavailable: {b['reason']}")
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['backend']} {r['label']} {size_label(r['shape'])} {r['dtype']}: {r['error']}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['key']} {size_label(s['shape'])} {s['dtype']}: {s['reason']}")
    return lines


# --- compare mode ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    backend: str
    label: str
    shape: tuple
    dtype: str
    threads: int | None
    baseline_s: float | None
    current_s: float | None
    change: float | None  # current/baseline - 1 (of the time, or of time/copy time)
    tolerance: float | None  # the larger relative spread of the two, at least min_regression
    verdict: str  # "regression", "faster", "same", "new", "missing", "failed", "unmeasured" (in neither)


def _case_key(r: dict):
    return r["backend"], r["key"], tuple(r["shape"]), r["dtype"], r.get("case_threads")


def compare_reports(baseline: dict, current: dict, min_regression: float = 0.0, relative_to_copy: bool = False
                    ) -> list[Change]:
    """Every contender and case of either report. Slower than the baseline by more than the measured spread is a
    regression; so is a case the baseline measured that now fails its check or is gone (``missing``).

    ``relative_to_copy`` compares each time divided by the copy time of the same rounds, so that a machine that is
    slower as a whole does not read as a regression; the spread is then the op's plus the copy's.
    """
    def index(report):
        return {_case_key(r): r for r in report["results"]}

    def timed(r):
        return r is not None and r["gbps"] and (not relative_to_copy or (r.get("copy") or {}).get("median_s"))

    def figure(r):
        t = r["time"]
        if not relative_to_copy:
            return t["median_s"], t["spread"]
        return t["median_s"] / r["copy"]["median_s"], t["spread"] + r["copy"]["spread"]

    old, new = index(baseline), index(current)
    changes = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        r = b or a
        common = dict(backend=r["backend"], label=r["label"], shape=tuple(r["shape"]), dtype=r["dtype"],
                      threads=r.get("case_threads"))
        times = dict(baseline_s=a["time"].get("median_s") if a else None,
                     current_s=b["time"].get("median_s") if b else None)
        if not timed(a) or not timed(b):
            if not timed(a):
                verdict = "new" if timed(b) else "unmeasured"
            else:
                verdict = "missing" if b is None else "failed"
            changes.append(Change(**common, **times, change=None, tolerance=None, verdict=verdict))
            continue
        (fa, sa), (fb, sb) = figure(a), figure(b)
        change = fb / fa - 1
        tolerance = max(sa, sb, min_regression)
        verdict = "regression" if change > tolerance else "faster" if change < -tolerance else "same"
        changes.append(Change(**common, **times, change=change, tolerance=tolerance, verdict=verdict))
    return changes


def is_regression(change: Change) -> bool:
    """Slower beyond the spread, or a figure the baseline had and this run has not (gone or now failing)."""
    return change.verdict in ("regression", "missing", "failed")


def compare_table(changes: list[Change]) -> str:
    def ms(v):
        return "" if v is None else f"{v * 1e3:.3g}"

    rows = [[c.backend, c.label, size_label(c.shape), c.dtype, c.threads or "", ms(c.baseline_s), ms(c.current_s),
             "" if c.change is None else f"{100 * c.change:+.0f}%",
             "" if c.tolerance is None else f"{100 * c.tolerance:.0f}%",
             c.verdict.upper() if is_regression(c) else c.verdict] for c in changes]
    return tabulate(rows, headers=["contender", "case", "size", "dtype", "threads", "baseline ms", "now ms",
                                   "change", "spread", "verdict"], disable_numparse=True)


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DarkspecError("--compare", str(path), "a bench JSON file written by darkspec bench",
                            code="bad-baseline", reason=str(error)) from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise DarkspecError("--compare", str(path), f"a bench JSON file of schema {SCHEMA}", code="bad-baseline")
    return report
