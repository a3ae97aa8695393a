"""``darkspec bench`` / ``python -m darkspec.bench`` / ``nox -s bench``: measure, print, write, compare."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from darkspec.bench.cases import PROFILES, parse_size
from darkspec.bench.charts import matplotlib_reason, write_charts
from darkspec.bench.matrix import run_matrix, select_backends
from darkspec.bench.report import compare_reports, compare_table, is_regression, load_report, notes, summary_table, \
    table
from darkspec.errors import DarkspecError

DEFAULT_OUTPUT = Path("reports")
JSON_NAME = "bench.json"


def run(*, quick: bool = False, backends=(), only: bool = False, sizes=None, dtypes=None, threads=None,
        cases=None, output: Path | str = DEFAULT_OUTPUT, compare_with: Path | str | None = None,
        current: Path | str | None = None, fail_on_regression: bool = False, min_regression: float = 0.0,
        relative_to_copy: bool = False, baselines: bool = True, compile_baseline: bool = True,
        darknet: bool = True, out=None, progress=None) -> int:
    """Measure (or, with ``current``, load) a report; print the tables; write bench.json and the charts into
    ``output``; with ``compare_with`` print the comparison. Exit status: 0; 1 on a regression when
    ``fail_on_regression``; 2 when nothing could be measured. Raises DarkspecError for bad options."""
    out = out or sys.stdout
    baseline = load_report(Path(compare_with)) if compare_with else None
    if current is not None:
        if baseline is None:
            raise DarkspecError("--current", str(current), "only together with --compare", code="bad-option")
        report = load_report(Path(current))
    else:
        profile = PROFILES["quick" if quick else "full"]
        if baseline is not None and not quick and not sizes:
            sizes = [tuple(s) for s in baseline["profile"]["sizes"]]
        if sizes:
            profile = replace(profile, sizes=tuple(parse_size(s) if isinstance(s, str) else tuple(s) for s in sizes))
        if threads:
            if any(t < 1 for t in threads):
                raise DarkspecError("--threads", threads, "positive thread counts", code="bad-option")
            profile = replace(profile, threads=tuple(threads))
        case_filter = None
        if cases:
            known = {c.key for c in profile.cases}
            unknown = [p for p in cases if not any(p in k for k in known)]
            if unknown:
                raise DarkspecError("--case", unknown, "parts of the case keys in the JSON, e.g. shortcut.forward, "
                                    "per_channel, leaky, reorg3d", code="bad-option")
            case_filter = lambda c: any(p in c.key for p in cases)  # noqa: E731
        report = run_matrix(select_backends(backends, only), profile, dtypes=tuple(dtypes or ("float32",)),
                            progress=progress, baselines=baselines, compile_baseline=compile_baseline,
                            darknet=darknet, case_filter=case_filter)
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        reason = matplotlib_reason()
        report["charts"] = {"files": [] if reason else write_charts(report, output), "reason": reason}
        (output / JSON_NAME).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report), file=out)
    print(file=out)
    print(summary_table(report), file=out)
    print(file=out)
    for line in notes(report):
        print(line, file=out)
    if current is None:
        charts = report["charts"]
        written = ", ".join(str(output / f) for f in charts["files"]) or f"no chart: {charts['reason']}"
        print(f"\n{report['duration_s']:.1f} s; wrote {output / JSON_NAME}; {written}", file=out)
    if not any(r["gbps"] for r in report["results"]):
        print("darkspec bench: nothing was measured", file=out)
        return 2
    if baseline is None:
        return 0
    changes = compare_reports(baseline, report, min_regression, relative_to_copy)
    print(file=out)
    if baseline["machine"].get("cpu_model") != report["machine"].get("cpu_model"):
        print(f"note: the baseline was measured on {baseline['machine'].get('cpu_model')}", file=out)
    print(compare_table(changes), file=out)
    regressions = [c for c in changes if is_regression(c)]
    basis = "time / same-run copy time" if relative_to_copy else "median time"
    print(f"{len(regressions)} regression(s): slower beyond the measured spread ({basis}), failing or gone", file=out)
    return 1 if regressions and fail_on_regression else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, few cases and repeats: a smoke run")
    parser.add_argument("--backend", action="append", default=[], metavar="SPEC",
                        help="a backend name or package.module:ClassName, added to the discovered ones (repeatable)")
    parser.add_argument("--only", action="store_true", help="measure only the --backend ones")
    parser.add_argument("--size", action="append", default=None, metavar="NxCxHxW",
                        help="an input size instead of the profile's (repeatable)")
    parser.add_argument("--dtype", action="append", default=None, help="a dtype (repeatable; default float32)")
    parser.add_argument("--threads", action="append", type=int, default=None, metavar="N",
                        help="torch's thread count for a run of every case (repeatable; full profile: 1 and 2)")
    parser.add_argument("--case", action="append", default=None, metavar="PART",
                        help="only cases whose key contains PART (repeatable), e.g. shortcut.forward, leaky")
    parser.add_argument("--no-baselines", action="store_true",
                        help="leave the PyTorch baselines (eager and torch.compile, on the CPU) out")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile baseline out")
    parser.add_argument("--no-darknet", action="store_true", help="leave Darknet's own functions out")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"folder for {JSON_NAME} and the charts (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--compare", type=Path, metavar="BASELINE.json",
                        help="flag cases slower than this earlier run by more than the measured spread, or gone")
    parser.add_argument("--current", type=Path, metavar="RESULT.json",
                        help="with --compare: compare this saved run instead of measuring")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="with --compare: exit 1 when a case regressed, failed or vanished")
    parser.add_argument("--relative-to-copy", action="store_true",
                        help="with --compare: compare time divided by the same-run copy time")
    parser.add_argument("--min-regression", type=float, default=0.0, metavar="FRACTION",
                        help="with --compare: ignore slowdowns below this fraction even where the spread is smaller")


def run_args(args: argparse.Namespace) -> int:
    return run(quick=args.quick, backends=args.backend, only=args.only, sizes=args.size, dtypes=args.dtype,
               threads=args.threads, cases=args.case, output=args.output, compare_with=args.compare,
               current=args.current, fail_on_regression=args.fail_on_regression,
               min_regression=args.min_regression, relative_to_copy=args.relative_to_copy,
               baselines=not args.no_baselines, compile_baseline=not args.no_compile, darknet=not args.no_darknet, progress=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darkspec.bench",
                                     description="The throughput matrix of every available backend.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except DarkspecError as error:
        print(f"darkspec: {error}", file=sys.stderr)
        return 2
