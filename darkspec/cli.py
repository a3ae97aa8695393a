"""The ``darkspec`` command line."""

from __future__ import annotations

import argparse
import sys

from darkspec.errors import DarkspecError


def _vectors(args) -> int:
    from darkspec.conformance.vectors import run_vectors

    return run_vectors(args.paths)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="darkspec", description="Darknet feature-fusion layers: spec and "
                                     "conformance suite.")
    commands = parser.add_subparsers(dest="command", required=True)
    vectors = commands.add_parser("vectors", help="replay Darknet recordings (.npz files or folders of them) and "
                                  "compare every recorded array")
    vectors.add_argument("paths", nargs="+", metavar="PATH")
    vectors.set_defaults(run=_vectors)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DarkspecError as error:
        print(f"darkspec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
