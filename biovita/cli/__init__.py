"""`biovita` console script: pybioclip-style subcommands. Heavy imports (torch, Ray) happen
inside the commands, so `biovita --help` is instant."""

from __future__ import annotations

import argparse
import sys

from biovita.cli import bench, data, models, serve
from biovita.errors import USER_ERRORS

# Commands that hand their arguments to an application's own parser (`--help` included).
PASS_THROUGH = {
    "train": ("the main job (same as python ray_jobs/train.py)", "biovita.train.job"),
    "tune": ("Ray Tune sweep (same as python tune/sweep.py)", "biovita.train.sweep"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biovita",
        description="BioVITA: animal sounds, images and names in one embedding space.",
        epilog="`biovita COMMAND --help` describes each command.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    data.add_parsers(sub)
    models.add_parsers(sub)
    for name, (text, _) in PASS_THROUGH.items():
        sub.add_parser(name, help=text, add_help=False)
    bench.add_parsers(sub)
    serve.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        module = importlib.import_module(PASS_THROUGH[argv[0]][1])
        return module.main(argv[1:], prog=f"biovita {argv[0]}")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except USER_ERRORS as e:
        print(f"biovita {args.cmd}: error: {e}", file=sys.stderr)
        return 2
