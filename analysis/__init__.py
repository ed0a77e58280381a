"""Figures of the paper rebuilt from logged sweeps, and a readable report per sweep.

Every figure family is a module with ``NAME``, ``TITLE``, ``applicable(runs)`` (do these runs
hold the figure's axis?) and ``build(runs) -> Figure``, registered in :mod:`analysis.figures`;
runs come from the Parquet export or from MLflow (:mod:`analysis.runs`), never from Ray's files.
Every sweep script ends in :func:`sweep_figure`; ``python -m analysis FIGURE --experiment NAME``
rebuilds one figure and ``python -m analysis.report --experiment NAME`` the whole page.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vpns_core.checkpoint import atomic_write

from .figures import FIGURES, SCRIPT_FIGURES, build_figures, closing_note, figures_for, numbers
from .runs import read_parquet

__all__ = ["FIGURES", "SCRIPT_FIGURES", "build_figures", "closing_note", "figures_for", "numbers",
           "sweep_figure"]


def sweep_figure(script: str, table: list[dict[str, Any]], trials_parquet: Path,
                 epochs_parquet: Path, out_dir: Path, *,
                 echo: Callable[[str], None] | None = print) -> list[Path]:
    """Hook every sweep script calls at its end; returns the files it wrote (the caller logs
    them to the sweep's MLflow parent run).

    Writes the printed result table (``<script>_table.csv``), the script's figures (and any
    other whose axis the sweep varied) under ``<out_dir>/figures`` as PNG, SVG and CSV, and
    ``<out_dir>/report.html``; ``echo`` gets the closing note (paths and numbers). Never raises:
    the sweep's runs are logged whatever happens here, and errors are reported.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_write_table(table, out_dir / f"{script}_table.csv")]
    try:
        runs = read_parquet(trials_parquet, epochs_parquet, tracking_uri=_tracking_uri(out_dir))
        figures, errors = build_figures(runs, figures_for(runs, script), out_dir / "figures")
        from .report import write_report
        report = write_report(runs, figures, out_dir / "report.html", errors)
    except Exception:  # noqa: BLE001 - the sweep's own outputs must still be logged
        print(f"analysis: no figures for {script}:\n{traceback.format_exc()}", file=sys.stderr)
        return paths
    paths += [p for f in figures for p in f.paths] + [report]
    if echo is not None:
        echo(closing_note(figures, report))
    return paths


def _write_table(table: list[dict[str, Any]], path: Path) -> Path:
    keys = list(dict.fromkeys(k for row in table for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(table)
    return atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))


def _tracking_uri(sweep_dir: Path) -> str | None:
    """The tracking URI the sweep logged to (its ``sweep.json``), for the prompt images."""
    meta = sweep_dir / "sweep.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("args", {}).get("tracking_uri")
    return None
