"""The figure families, by name: which ones a sweep draws, drawing them, and the note a sweep
prints about them at its end.

Every family is a module with ``NAME``, ``TITLE``, ``applicable(runs)`` (do these runs hold the
figure's axis?) and ``build(runs) -> Figure``. The package (:func:`analysis.sweep_figure`), its
command lines and the report (:mod:`analysis.report`) all draw through :func:`build_figures`.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

from . import (architectures, confirmation, cost, input_size, learning_rates, nm, pad_size, pareto, pilot,
               prompt_effect, prompt_type, sparsity_curves, structured, transfer, vp_stage)
from .plotting import Figure, save
from .runs import Runs

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
