"""Plotting shared by the figure modules: panels of mean ± std over seeds, markers for points
where seeds failed or are missing, a caption that says what is shown and tests its differences
(paired by seed, Holm over the figure: :func:`vpns_core.stats.paired`), and saving a figure as
PNG + SVG + the CSV of its plotted numbers.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

import pandas as pd  # noqa: E402

from vpns_core.checkpoint import atomic_write  # noqa: E402
from vpns_core.stats import paired  # noqa: E402

from .runs import Runs, aggregate  # noqa: E402

#: plotted accuracies: output name -> (trial column, factor to percent)
ACCURACY = {
    "test_prompt_pct": ("selected_test_acc_prompt", 100.0),
    "test_noprompt_pct": ("selected_test_acc_noprompt", 100.0),
    "mask_prompt_pct": ("mask_stage_test_acc_prompt", 100.0),
    "mask_noprompt_pct": ("mask_stage_test_acc_noprompt", 100.0),
    # the schedule's headline (without the prompt under reference, with it under paper): the
    # accuracy every caption's comparisons read
    "test_pct": ("selected_test_acc", 100.0),
}
LABELS = {
    "test_prompt_pct": "tested with prompt",
    "test_noprompt_pct": "tested without prompt",
    "mask_prompt_pct": "after mask finding, with prompt",
    "mask_noprompt_pct": "after mask finding, without prompt",
    "test_pct": "headline (reference: without prompt; paper: with prompt)",
}
ACCURACY_NOTE = ("Accuracy: test set, at the weight-tuning epoch with the best validation accuracy "
                 "(never chosen on test); 'after mask finding' is the test accuracy at the end of "
                 "stage 1, before weight tuning. Points: mean over seeds; error bars: ± 1 std "
                 "(a description, not a test). Differences are tested on the headline accuracy "
                 "(without the prompt under the reference schedule, with it under the paper "
                 "schedule), paired by seed: mean difference, 95% t-interval Holm-corrected over "
                 "the figure's comparisons; 'not resolved' means the interval contains zero (the "
                 "data cannot tell), not that there is no difference.")
MARKER_NOTE = "Hollow markers: fewer seeds finished than planned; ×: no finished trial at that point."
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "digits": "digits", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "tiny_imagenet": "Tiny-ImageNet", "food101": "Food-101",
                 "flowers102": "Flowers-102", "dtd": "DTD", "oxford_pets": "Oxford-IIIT Pets",
                 "stanford_cars": "Stanford Cars", "imagenet": "ImageNet"}


@dataclass
class Figure:
    """A drawn figure, the table of its plotted numbers, and its caption (sentences)."""

    name: str
    title: str
    fig: Any
    table: pd.DataFrame
    caption: list[str]
    paths: list[Path] = field(default_factory=list)
    #: names a row of ``table`` in text (the closing note); default: its key columns
    label: Callable[[dict], str] | None = None

    @property
    def png(self) -> Path | None:
        return next((p for p in self.paths if p.suffix == ".png"), None)


@dataclass
class Line:
    """One plotted quantity: ``stem`` names the table's ``<stem>_mean/_std/_n`` columns."""

    stem: str
    label: str
    linestyle: str = "-"
    marker: str = "o"


@dataclass
class Panel:
    title: str
    lines: list[Line]
    ylabel: str = "test accuracy (%)"
    from_zero: bool = False  # costs: a bar from zero reads honestly, an accuracy range need not


def has(table: pd.DataFrame, stem: str) -> bool:
    return f"{stem}_n" in table and bool((table[f"{stem}_n"] > 0).any())


def accuracy_panels(table: pd.DataFrame) -> list[Panel]:
    """After weight tuning (with / without prompt), and after mask finding where it was run."""
    panels = [Panel("after weight tuning", [Line("test_prompt_pct", LABELS["test_prompt_pct"]),
                                            Line("test_noprompt_pct", LABELS["test_noprompt_pct"], "--", "s")])]
    if has(table, "mask_prompt_pct") or has(table, "mask_noprompt_pct"):
        panels.append(Panel("after mask finding (stage 1)",
                            [Line("mask_prompt_pct", "tested with prompt"),
                             Line("mask_noprompt_pct", "tested without prompt", "--", "s")]))
    return panels


def metric_panels(table: pd.DataFrame, stems: Sequence[str]) -> list[Panel]:
    """One panel per accuracy (for figures whose lines are methods or settings)."""
    return [Panel(LABELS[s], [Line(s, "")]) for s in stems if has(table, s)]


# --- drawing -------------------------------------------------------------------------------------


def ordered(values: Sequence, order: Sequence = ()) -> list:
    """Distinct values: those in ``order`` first (in that order), then the rest sorted."""
    distinct = list(dict.fromkeys(v for v in values if not _missing(v)))
    first = [v for v in order if v in distinct]
    rest = sorted((v for v in distinct if v not in first), key=lambda v: (isinstance(v, str), v))
    return first + rest


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def draw(table: pd.DataFrame, *, x: str, panels: list[Panel], xlabel: str, title: str,
         caption: list[str], categorical: bool = False, order: Sequence = (),
         tick_label: Callable[[Any], str] = str, series: str | None = None,
         series_order: Sequence = (), series_label: Callable[[Any], str] = str,
         rows: str | None = None, row_label: Callable[[Any], str] = str,
         refs: dict[tuple[Any, str], tuple[float, float, str]] | None = None):
    """A grid of panels (columns) × ``rows`` values, each plotting its lines against ``x``
    (numeric, or ``categorical`` in ``order``), one colour per ``series`` value.

    ``refs[(row value, stem)] = (mean, std, label)`` (or a list of ``(mean, std, label,
    linestyle)``) draws a horizontal reference line with a
    ± std band (the dense model). Returns the matplotlib figure.
    """
    if not categorical and len(ordered(table[x])) == 1:
        categorical = True  # one x value: spread the lines side by side around it
    row_values = ordered(table[rows], ()) if rows else [None]
    series_values = ordered(table[series], series_order) if series else [None]
    cats = ordered(table[x], order) if categorical else []
    ticks = [tick_label(v) for v in cats]
    slanted = sum(len(t) + 2 for t in ticks) > 45  # ~ characters that fit under one panel
    nrows, ncols = len(row_values), len(panels)
    nseries = len(series_values)
    palette = plt.get_cmap("tab10" if nseries <= 10 else "tab20").colors
    legend_items = nseries * max(len(p.lines) for p in panels) + 3
    legend_cols = min(legend_items, 5 if ncols > 1 else 3)
    legend_h = 0.24 * math.ceil(legend_items / legend_cols)
    width = max(7.0, 4.4 * ncols + 0.6)
    wrap = int((width - 0.8) * 17)
    text = textwrap.fill(" ".join(caption), wrap)
    caption_h = 0.16 * (text.count("\n") + 1) + 0.15
    height = (3.1 * nrows + 0.75 + (0.55 * nrows) + legend_h + caption_h + 0.35
              + (0.03 * max(map(len, ticks)) * nrows if slanted else 0.0))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    bottom = caption_h + legend_h + 0.75 + (0.03 * max(map(len, ticks)) if slanted else 0.0)
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, top=1 - 0.8 / height,
                        bottom=bottom / height, wspace=0.28, hspace=0.6)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    fig.text(0.5 / width, 0.08 / height, text, fontsize=7.5, va="bottom", ha="left", family="sans-serif")
    numeric = [] if categorical else [float(v) for v in ordered(table[x])]
    span = (max(numeric) - min(numeric)) if len(numeric) > 1 else 1.0
    handles: dict[str, Any] = {}
    hollow_used = missing_used = False
    for r, row_value in enumerate(row_values):
        sub = table if rows is None else table[table[rows] == row_value]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            nlines = nseries * len(panel.lines)
            # side by side, so that error bars of lines at the same x stay readable
            dodge = min(0.12, 0.7 / nlines) if categorical else 0.012 * span
            k = 0
            for si, series_value in enumerate(series_values):
                part = sub if series is None else sub[sub[series] == series_value]
                for li, line in enumerate(panel.lines):
                    color = palette[(si if series else li) % len(palette)]
                    offset = (k - (nlines - 1) / 2) * dodge
                    k += 1
                    label = ", ".join(s for s in (series_label(series_value) if series else "",
                                                  line.label) if s)
                    hollow, missing = _plot_line(ax, part, x, line, color, offset, cats, label,
                                                 connect=not categorical)
                    hollow_used |= hollow
                    missing_used |= missing
            for line in panel.lines:
                ref = (refs or {}).get((row_value, line.stem))
                for mean, std, label, *style in ([ref] if isinstance(ref, tuple) else ref or []):
                    if math.isnan(mean):
                        continue
                    ax.axhline(mean, color="black", ls=style[0] if style else ":", lw=1.2, label=label)
                    if not math.isnan(std):
                        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, lw=0)
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
            ax.set_title(panel.title + (f" — {row_label(row_value)}" if rows else ""), fontsize=9.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.grid(alpha=0.3)
            if panel.from_zero:
                ax.set_ylim(bottom=0)
            if categorical:
                ax.set_xticks(range(len(cats)), ticks, rotation=25 if slanted else 0,
                              ha="right" if slanted else "center", fontsize=8)
                ax.set_xlim(-0.6, len(cats) - 0.4)
            else:
                values = ordered(table[x])
                if len(values) <= 12:
                    ax.set_xticks(values, [tick_label(v) for v in values], fontsize=8)
    extra = []
    if hollow_used:
        extra.append(Line2D([], [], marker="o", ls="", color="grey", markerfacecolor="white",
                            label="fewer seeds finished than planned"))
    if missing_used:
        extra.append(Line2D([], [], marker="x", ls="", color="red", label="no finished trial"))
    if handles or extra:
        fig.legend(list(handles.values()) + extra, list(handles) + [e.get_label() for e in extra],
                   loc="lower center", ncol=legend_cols, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, (caption_h + 0.05) / height))
    return fig


def _plot_line(ax, part: pd.DataFrame, x: str, line: Line, color, offset: float, cats: list,
               label: str, connect: bool) -> tuple[bool, bool]:
    """Plot one line; returns (some point had fewer seeds, some point had no result)."""
    if part.empty or f"{line.stem}_mean" not in part:
        return False, False
    part = part.copy()
    part["_x"] = [cats.index(v) + offset if cats else float(v) for v in part[x]]
    part = part.sort_values("_x")
    done = part[part[f"{line.stem}_n"] > 0]
    if done.empty and not (part["ok"] == 0).any():
        return False, False  # this quantity does not exist here (e.g. no mask stage)
    xs, ys = done["_x"].to_numpy(float), done[f"{line.stem}_mean"].to_numpy(float)
    err = done[f"{line.stem}_std"].fillna(0.0).to_numpy(float)
    ax.errorbar(xs, ys, yerr=err, color=color, ls=line.linestyle if connect else "none",
                marker=line.marker, ms=5, capsize=3, lw=1.4, label=label or None)
    short = (done["ok"] < done["seeds"]).to_numpy()
    if short.any():
        ax.plot(xs[short], ys[short], ls="none", marker=line.marker, ms=5, color=color,
                markerfacecolor="white", zorder=5)
    empty = part[part["ok"] == 0]
    if len(empty):
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(empty["_x"].to_numpy(float), [0.04] * len(empty), ls="none", marker="x",
                color="red", ms=7, mew=2, transform=trans, zorder=6)
    return bool(short.any()), bool(len(empty))


# --- captions ------------------------------------------------------------------------------------


def context(runs: Runs, trials: pd.DataFrame, *, sparsity: bool = True) -> str:
    """"Fashion-MNIST · efficientnet_lite0 · 90% sparsity · preset default · 3 seeds (7, 9, 17)"."""
    datasets = ", ".join(DATASET_NAMES.get(d, d) for d in ordered(trials["config.dataset"]))
    models = ", ".join(map(str, ordered(trials["config.model"])))
    seeds = ordered(trials["config.seed"])
    parts = [datasets, models]
    levels = ordered(trials["config.sparsity"])
    if sparsity and len(levels) == 1:
        parts.append(f"{100 * levels[0]:g}% sparsity")
    parts.append(f"preset {runs.preset}")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})")
    return " · ".join(parts)


def fmt(mean: float, std: float, unit: str = "%") -> str:
    if math.isnan(std):  # one seed: no spread to show (never "± nan")
        return f"{mean:.1f}{unit} (1 seed)"
    return f"{mean:.1f} ± {std:.1f}{unit}"


def paired_notes(groups: list[tuple[str, dict[Any, dict], list[tuple[Any, Any]]]]) -> list[str]:
    """One Holm family over every group's pairs (the figure's comparisons), one sentence per
    group: ``(heading, {name: {seed: value}}, [(arm, control), ...])``."""
    values, pairs, owner = {}, [], []
    for g, (_, vals, group_pairs) in enumerate(groups):
        values.update({(g, name): v for name, v in vals.items()})
        pairs += [((g, a), (g, c)) for a, c in group_pairs]
        owner += [g] * len(group_pairs)
    comparisons = paired(values, pairs)
    notes = []
    for g, (heading, _, _) in enumerate(groups):
        texts = [dataclasses.replace(c, arm=c.arm[1], control=c.control[1]).text()
                 for c, o in zip(comparisons, owner) if o == g]
        if texts:
            notes.append(f"{heading}: " + "; ".join(texts) + ".")
    return notes


def best_notes(table: pd.DataFrame, label: Callable[[dict], str], by: str | list[str] | None = None,
               heading: Callable[[Any], str] = lambda key: "Headline accuracy, highest point against the others",
               stem: str = "test_pct") -> list[str]:
    """Within each group of ``by`` (the whole table when None): the point with the highest mean
    against each other point, paired by seed (:func:`vpns_core.stats.paired`), one Holm family
    over the whole figure. A point with one seed gets "not tested", never a ± nan."""
    if not has(table, stem):
        return []
    parts = [(None, table)] if by is None else list(table.groupby(by, sort=False))
    groups = []
    for key, part in parts:
        rows = [r for r in part.to_dict("records") if r[f"{stem}_n"] > 0]
        if len(rows) < 2:
            continue
        best = max(rows, key=lambda r: r[f"{stem}_mean"])
        groups.append((heading(key), {label(r): r[f"{stem}_by_seed"] for r in rows},
                       [(label(best), label(r)) for r in rows if r is not best]))
    return paired_notes(groups)


def reference_notes(table: pd.DataFrame, references: dict[str, dict], label: Callable[[dict], str],
                    heading: str = "Headline accuracy against the controls",
                    stem: str = "test_pct") -> list[str]:
    """Every point of ``table`` against every reference (``{name: {seed: value}}``, e.g. the
    frozen pad and no prompt with as many updates), paired by seed, one Holm family."""
    if not has(table, stem) or not references:
        return []
    rows = [r for r in table.to_dict("records") if r[f"{stem}_n"] > 0]
    values = {**{label(r): r[f"{stem}_by_seed"] for r in rows}, **references}
    pairs = [(label(r), ref) for ref in references for r in rows]
    return paired_notes([(heading, values, pairs)])


def status_note(table: pd.DataFrame, label: Callable[[dict], str]) -> str:
    """Which points lack seeds and why (failed, stopped early, missing)."""
    rows = table.to_dict("records")
    short = [r for r in rows if r["ok"] < r["seeds"]]
    # a failed attempt at a seed that finished in another trial (a retry, or Optuna's other rates)
    extra = [r for r in rows if r.get("failed_trials", 0) > r["failed"]]
    if not short:
        seeds = max((int(r["seeds"]) for r in rows), default=0)
        at = "its one seed" if seeds == 1 else f"all {seeds} seeds"
        text = f"All {len(rows)} points finished at {at}." if len(rows) > 1 else f"The point finished at {at}."
    else:
        parts = []
        for row in short:
            why = ", ".join(f"{int(row[k])} {k if k != 'stopped' else 'stopped early'}"
                            for k in ("failed", "stopped", "missing") if row[k])
            parts.append(f"{label(row)}: {int(row['ok'])}/{int(row['seeds'])} seeds finished ({why})")
        text = "Incomplete points (shown, not dropped): " + "; ".join(parts) + "."
    if extra:
        text += " Failed trials at points that have a result from another trial: " + "; ".join(
            f"{label(r)}: {int(r['failed_trials'] - r['failed'])}" for r in extra) + "."
    return text


def marker_note(table: pd.DataFrame) -> list[str]:
    """The marker legend sentence, where some point lacks seeds."""
    return [MARKER_NOTE] if len(table) and (table["ok"] < table["seeds"]).any() else []


def accuracy_figure(runs: Runs, trials: pd.DataFrame, *, name: str, title: str, x: str,
                    xlabel: str, setting: str, categorical: bool = False, order: Sequence = (),
                    tick_label: Callable[[Any], str] = str,
                    references: dict[str, pd.DataFrame] | None = None) -> Figure:
    """The ablation figure: accuracy (with / without prompt, after tuning / after mask finding)
    against one axis ``x`` of ``trials``, seeds aggregated; ``setting`` names what is fixed.

    ``references`` (label -> trials of one setting, e.g. the frozen pad, no prompt with as many
    updates) are drawn in every panel as lines with a ± std band, and the caption tests every
    point against every reference, paired by seed (one Holm family). Without references the
    caption tests the highest point against the others."""
    table = aggregate(trials, [x], ACCURACY)
    def label(row: dict) -> str:
        return f"{xlabel.split(' (')[0]} {tick_label(row[x])}"
    refs, ref_values, ref_tables = {}, {}, []
    styles = (":", "-.", "--")
    for i, (ref_label, ref_trials) in enumerate((references or {}).items()):
        if ref_trials is None or not len(ref_trials):
            continue
        ref_table = aggregate(ref_trials.assign(**{x: ref_label}), [x], ACCURACY)
        ref = ref_table.iloc[0]
        for stem in ("test_prompt_pct", "mask_prompt_pct"):  # one band per panel (a control
            # without a learned prompt scores the same with and without it)
            if ref.get(f"{stem}_n", 0) > 0:
                refs.setdefault((None, stem), []).append(
                    (ref[f"{stem}_mean"], ref[f"{stem}_std"], ref_label, styles[i % len(styles)]))
        ref_values[ref_label] = ref["test_pct_by_seed"]
        ref_tables.append(ref_table)
    notes = (reference_notes(table, ref_values, label) if ref_values else best_notes(table, label))
    everything = pd.concat([trials, *(t for t in (references or {}).values() if t is not None)])
    caption = [f"{context(runs, everything)}. {setting}", ACCURACY_NOTE, *notes,
               status_note(table, label), *marker_note(table)]
    fig = draw(table, x=x, panels=accuracy_panels(table), xlabel=xlabel,
               title=f"{title}\n{context(runs, everything)}", caption=caption,
               categorical=categorical, order=order, tick_label=tick_label, refs=refs or None)
    if ref_tables:  # the references' numbers travel with the plotted ones (CSV, closing note)
        table = pd.concat([*ref_tables, table], ignore_index=True)
    return Figure(name, title, fig, table, caption, label=label)


# --- saving --------------------------------------------------------------------------------------


def save(figure: Figure, out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<name>.png``, ``.svg`` and ``.csv`` (the plotted numbers); closes the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{figure.name}.png", out / f"{figure.name}.svg", out / f"{figure.name}.csv"]
    atomic_write(paths[0], lambda handle: figure.fig.savefig(handle, format="png", dpi=110))
    atomic_write(paths[1], lambda handle: figure.fig.savefig(handle, format="svg"))
    plt.close(figure.fig)
    plotted = figure.table.drop(columns=[c for c in figure.table if c.endswith("_by_seed")])
    atomic_write(paths[2], lambda handle: handle.write(plotted.to_csv(index=False).encode()))
    figure.paths = paths
    return paths
