"""The ``darkspec`` command line: ``vectors``, ``conformance``, ``mutants``, ``bench``, ``check`` and ``golden``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from darkspec.errors import DarkspecError


def _golden_dirs(args) -> list[Path]:
    """The shipped golden folder and the user's own on top (--golden), or none with --no-golden."""
    from darkspec.conformance.golden import shipped

    return [] if args.no_golden else [shipped(), *args.golden]


def _vectors(args) -> int:
    from darkspec.backends.registry import load
    from darkspec.conformance.vectors import run_vectors

    backend = load(args.backend)
    if backend.availability():
        print(f"darkspec: backend {backend.name} is unavailable: {backend.availability()}", file=sys.stderr)
        return 2
    return run_vectors(args.paths, backend)


def _conformance(args) -> int:
    """The suite through its pytest plugin, in this process, with one xdist worker per core: a crashing or hanging
    backend fails its own items only. The plugin prints the matrix and writes conformance.json; pytest writes the
    JUnit XML."""
    from importlib import resources

    import pytest

    from darkspec.folders import check_writable

    check_writable(args.report_dir)
    # hypothesis keeps its files with the reports, not in whatever directory the command runs from
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(args.report_dir / ".hypothesis"))
    isolated = resources.files("darkspec.conformance").joinpath("pytest.ini")
    options = ["-c", str(isolated), "--rootdir", str(Path.cwd()), "--noconftest", "-p", "no:cacheprovider",
               "--darkspec-suite-only", "--darkspec-profile", args.profile, "--darkspec-report-dir",
               str(args.report_dir), f"--junitxml={args.report_dir / 'conformance.xml'}", "-n", str(args.workers)]
    options += [f"--darkspec-backend={spec}" for spec in args.backend] or ["--darkspec-all-backends"]
    options += ["--darkspec-no-golden"] if args.no_golden else [f"--darkspec-golden={d}" for d in args.golden]
    options += [f"--darkspec-only={spec}" for spec in args.only] + [f"--darkspec-dtype={d}" for d in args.dtype]
    if args.timeout is not None:
        options.append(f"--darkspec-timeout={args.timeout}")
    return int(pytest.main([*options, str(args.report_dir)]))


def _mutants(args) -> int:
    from tabulate import tabulate

    from darkspec.conformance.mutants import MUTANTS, hunt, killer
    from darkspec.conformance.golden import gate

    golden = gate(_golden_dirs(args))
    for problem in golden.problems:
        print(f"golden: {problem}", file=sys.stderr)
    if golden.problems:
        return 1
    rows, survivors = [], 0
    for mutant in MUTANTS:
        killed_by = killer(hunt(mutant, args.profile, golden))
        survivors += killed_by is None
        rows.append([mutant.name, mutant.mistake, "killed" if killed_by else "SURVIVED", killed_by or ""])
    print(tabulate(rows, headers=["mutant", "mistake", "verdict", "killed by"], maxcolwidths=[None, 30, None, 70]))
    print(f"{len(MUTANTS) - survivors} killed, {survivors} survived")
    return 1 if survivors else 0


def _bench(args) -> int:
    from darkspec.bench.cli import run_args

    return run_args(args)


def _check(args) -> int:
    from darkspec.conformance import check

    if not args.cfg.is_file():
        raise DarkspecError("MODEL.cfg", str(args.cfg), "a cfg file that exists", code="no-such-file")
    if args.plot is not None and args.weights is None:
        raise DarkspecError("--plot", str(args.plot), "--plot together with --weights (it draws the file's shortcut "
                            "weights)", code="plot-needs-weights")
    text = args.cfg.read_text()
    runtimes = check.select_runtimes(args.runtime)
    network, _ = check.parse_model(text)
    trained = None
    if args.weights is not None:
        from darkspec.conformance import shortcut_weights
        from darkspec.reference.weights import read_weights

        if not args.weights.is_file():
            raise DarkspecError("--weights", str(args.weights), "a .weights file that exists", code="no-such-file")
        trained = read_weights(args.weights, network)
        shortcuts = shortcut_weights.analyse(network, trained)
    report = check.check_model(text, str(args.cfg), runtimes,
                               weights=None if trained is None else check.shortcut_weights_of(network, trained))
    if args.json:
        data = report.to_json()
        if trained is not None:
            data["weights"] = {"file": str(args.weights), "header": dataclasses.asdict(trained.header),
                               "shortcuts": [s.to_json() for s in shortcuts]}
        print(json.dumps(data, indent=2))
    else:
        print(check.render(report))
        if trained is not None:
            header = trained.header
            print(f"\n{args.weights}: version {header.major}.{header.minor}.{header.revision}, seen {header.seen}, "
                  f"{len(trained.layers)} layers with parameters, as the cfg reads them")
            print(shortcut_weights.render(shortcuts))
    if args.plot is not None:
        if shortcuts:
            renderer = shortcut_weights.write_heatmap(shortcuts, args.plot)
            print(f"heat-map of the normalized shortcut weights: {args.plot} ({renderer})", file=sys.stderr)
        else:
            print("no weighted [shortcut]: no heat-map written", file=sys.stderr)
    return 1 if check.failing(report, args.fail_on) else 0


def _golden(args) -> int:
    from darkspec.conformance import golden

    return (golden.verify if args.action == "verify" else golden.record)(args.golden or golden.shipped())


def _add_golden_options(parser):
    parser.add_argument("--golden", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder of your own recordings, with its manifest.json, replayed on top of the "
                        "golden cases shipped with darkspec (repeatable)")
    parser.add_argument("--no-golden", action="store_true", help="run the property checks only")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="darkspec", description="Darknet feature-fusion layers: spec and "
                                     "conformance suite.")
    commands = parser.add_subparsers(dest="command", required=True)

    vectors = commands.add_parser("vectors", help="replay recordings (.npz files or folders of them) through a "
                                  "backend and compare every recorded array")
    vectors.add_argument("paths", nargs="+", metavar="PATH")
    vectors.add_argument("--backend", default="reference", help="a backend name or package.module:ClassName")
    vectors.set_defaults(run=_vectors)

    conformance = commands.add_parser("conformance", help="check every backend's declared capabilities against "
                                      "the reference and print the conformance matrix")
    conformance.add_argument("--backend", action="append", default=[],
                             help="a backend name or package.module:ClassName (repeatable; default: all known)")
    conformance.add_argument("--profile", choices=["quick", "ci", "thorough"], default="ci")
    conformance.add_argument("--report-dir", type=Path, default=Path("reports"),
                             help="where conformance.json, conformance.xml (JUnit) and saved failing cases go")
    conformance.add_argument("--only", action="append", default=[], metavar="OP/DIALECT/PASS",
                             help="only these capabilities (repeatable; * matches any part)")
    conformance.add_argument("--dtype", action="append", default=[], choices=["float32", "float64"],
                             help="only capabilities in this dtype (repeatable)")
    conformance.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                             help="pytest-xdist workers (default: one per core; 0 runs everything in this process, "
                             "where a crashing backend ends the run)")
    conformance.add_argument("--timeout", type=float, metavar="SECONDS",
                             help="per check: one running longer has hung and fails (default 600)")
    _add_golden_options(conformance)
    conformance.set_defaults(run=_conformance)

    mutants = commands.add_parser("mutants", help="run the suite on deliberately broken backends; each must fail")
    mutants.add_argument("--profile", choices=["quick", "ci", "thorough"], default="ci")
    _add_golden_options(mutants)
    mutants.set_defaults(run=_mutants)

    bench = commands.add_parser("bench", help="the throughput matrix: GB/s and %% of the memory-copy bandwidth per "
                                "backend and case, and the ratios to eager PyTorch, torch.compile and Darknet")
    from darkspec.bench.cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(run=_bench)

    check = commands.add_parser("check", help="will this model compute the same everywhere? every [shortcut], "
                                "[reorg3d] and [reorg] of a cfg, its quirks, and per runtime: same, different or "
                                "refused, each backed by a run")
    check.add_argument("cfg", type=Path, metavar="MODEL.cfg")
    check.add_argument("--weights", type=Path, metavar="MODEL.weights",
                       help="a Darknet .weights file for the cfg: checked against it, its shortcut weights analysed "
                       "and used in the runs")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    check.add_argument("--fail-on", choices=["different", "refused"],
                       help="exit status 1 when a runtime computes the model differently (or refuses it), or "
                       "refuses it")
    check.add_argument("--runtime", action="append", default=[], metavar="NAME",
                       help="check only these runtimes (repeatable): darknet-cpu, darknet-gpu, darknet-inference, "
                       "pjreddie, opencv, onnx, torch, cupy")
    check.add_argument("--plot", type=Path, metavar="FILE",
                       help="with --weights: a heat-map of every weighted shortcut's normalized weights (PNG)")
    check.set_defaults(run=_check)

    golden = commands.add_parser("golden", help="verify the golden folder against its manifest, or regenerate "
                                 "the reference regression cases")
    golden.add_argument("action", choices=["verify", "record"])
    golden.add_argument("--golden", type=Path, metavar="DIR",
                        help="the golden folder (default: the one shipped with darkspec)")
    golden.set_defaults(run=_golden)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DarkspecError as error:
        print(f"darkspec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
