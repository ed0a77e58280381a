"""Figures of the paper rebuilt from logged sweeps, and a readable report per sweep.

Every figure family is a module with ``NAME``, ``TITLE``, ``applicable(runs)`` (do these runs
hold the figure's axis?) and ``build(runs) -> Figure``; runs come from the Parquet export or from
MLflow (:mod:`analysis.runs`), never from Ray's files. Every sweep script ends in
:func:`sweep_figure`; ``python -m analysis FIGURE --experiment NAME`` rebuilds one figure and
``python -m analysis.report --experiment NAME`` the whole page.
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

from . import (architectures, confirmation, cost, input_size, learning_rates, nm, pad_size, pareto, pilot,
               prompt_effect, prompt_type, sparsity_curves, structured, transfer, vp_stage)
from vpns_core.checkpoint import atomic_write

from .plotting import Figure, save
from .runs import Runs, read_parquet

FIGURES = {m.NAME: m for m in (pad_size, input_size, prompt_type, vp_stage, sparsity_curves, cost,
                               architectures, transfer, pilot, structured, learning_rates,
                               prompt_effect, pareto, confirmation, nm)}
#: the figures each sweep script draws (others are added when its runs hold their axis)
SCRIPT_FIGURES = {
    "ablation_pad": ["pad_size"], "ablation_input_size": ["input_size"],
    "ablation_prompt": ["prompt_type"], "ablation_stage": ["vp_stage"],
    "sparsity_curves": ["sparsity_curves", "cost"], "architectures": ["architectures"],
    "transfer": ["transfer"], "learning_rates": ["learning_rates"], "pilot": ["pilot"],
    "structured": ["structured"], "prompt_effect": ["prompt_effect"], "pareto": ["pareto"],
    "confirm_prompt": ["confirmation"], "ablation_nm": ["nm"],
}
#: scripts whose settings mix several axes at once: only their own figure is meaningful
_OWN_ONLY = {"prompt_effect", "pareto", "confirm_prompt", "ablation_nm"}
#: learning rates vary in every Optuna sweep (searched alongside its axis): their scatter is
#: drawn for the learning-rate sweep only
_NOT_BY_AXIS = {"learning_rates"}


def figures_for(runs: Runs, script: str | None = None) -> list[str]:
    """The script's figures, then every other figure whose axis varies in these runs."""
    script = script or runs.script
    names = list(SCRIPT_FIGURES.get(script, []))
    if script in _OWN_ONLY:
        return names
    for name, module in FIGURES.items():
        if name not in names and name not in _NOT_BY_AXIS and _applicable(module, runs):
            names.append(name)
    return names


def _applicable(module, runs: Runs) -> bool:
    try:
        return bool(module.applicable(runs))
    except (KeyError, TypeError, ValueError):
        return False


def build_figures(runs: Runs, names: list[str], out_dir: str | Path) -> tuple[list[Figure], dict[str, str]]:
    """Draw and save each named figure under ``out_dir``; a figure that fails is reported in
    the returned errors (name -> message) instead of stopping the others."""
    figures, errors = [], {}
    for name in names:
        try:
            figure = FIGURES[name].build(runs)
            save(figure, out_dir)
            figures.append(figure)
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the rest
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"analysis: figure '{name}' failed:\n{traceback.format_exc()}", file=sys.stderr)
    return figures, errors


def closing_note(figures: list[Figure], report: Path | None = None) -> str:
    """What a sweep prints at its end: each figure's path, its plotted numbers and caption."""
    from .plotting import ACCURACY_NOTE, MARKER_NOTE
    lines = []
    for figure in figures:
        lines.append(f"\nfigure {figure.name}: {figure.png}  (numbers: {figure.paths[-1]})")
        lines += ["  " + line for line in numbers(figure).splitlines()]
        lines += [f"  {s}" for s in figure.caption if s not in (ACCURACY_NOTE, MARKER_NOTE)]
    if report is not None:
        lines.append(f"report: {report}")
    return "\n".join(lines)


def numbers(figure: Figure) -> str:
    """The plotted numbers as text: the point's columns, then mean ± std (n) of each quantity."""
    from .plotting import LABELS, fmt
    table = figure.table
    stems = [c[:-5] for c in table.columns if c.endswith("_mean")]
    if not stems:
        return table.head(10).to_string(index=False)
    counts = ("seeds", "trials", "ok", "failed", "stopped", "missing", "failed_trials")
    keys = [c for c in table.columns if not c.endswith(("_mean", "_std", "_n", "_by_seed")) and c not in counts]
    rows = []
    for row in table.to_dict("records"):
        point = figure.label(row) if figure.label else \
            " ".join(f"{k.removeprefix('config.')}={row[k]}" for k in keys)
        values = "; ".join(f"{LABELS.get(s, s)} {fmt(row[s + '_mean'], row[s + '_std'], '%' if s.endswith('_pct') else '')}"
                           for s in stems if row.get(s + "_n", 0) > 0)
        rows.append(f"{point}: {values or 'no result'} [{int(row['ok'])}/{int(row['seeds'])} seeds]")
    return "\n".join(rows)


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
