"""Rebuild one figure from logged runs.

    python -m analysis pad_size --experiment ablation_pad            # latest sweep, from MLflow
    python -m analysis pad_size --trials results/sweeps/<sweep>/trials.parquet
    python -m analysis list                                          # the figures

Writes ``<out>/<figure>.png``, ``.svg`` and ``.csv`` (default ``results/figures/<sweep>``) and,
when the runs' MLflow store is known (read from it, or ``--tracking-uri``), logs them to the
sweep's parent run (``--no-log`` not to).
"""
from __future__ import annotations

import argparse
import sys

from .figures import FIGURES, build_figures, closing_note
from .artifacts import log_to_parent
from .report import add_source_flags, load, output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=[*FIGURES, "list"], metavar="FIGURE",
                        help=f"one of: {', '.join(FIGURES)}; or 'list'")
    add_source_flags(parser)
    args = parser.parse_args(argv)
    if args.figure == "list":
        for name, module in FIGURES.items():
            print(f"{name:16s} {module.TITLE}")
        return 0
    try:
        runs = load(args)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    figures, errors = build_figures(runs, [args.figure], output_dir(args, runs))
    if errors:
        print(f"error: {errors[args.figure]}", file=sys.stderr)
        return 1
    print(closing_note(figures).strip())
    if not args.no_log and runs.tracking_uri:
        try:
            run_id = log_to_parent(runs, figures[0].paths)
            print(f"logged to MLflow parent run {run_id}")
        except LookupError as err:
            print(f"not logged: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
