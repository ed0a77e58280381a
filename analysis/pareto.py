"""The accuracy × cost Pareto front of a multi-objective pruning search (``sweeps/pareto.py``).

One panel per cost (latency, parameters or nonzeros, FLOPs; log scale): every trial of the search
at its validation accuracy, one colour per method, a square for 2:4 weight masks (a circle
otherwise); filled if it fits the sweep's budget, hollow if not; on the latency panel a bar from
the fastest to the slowest of its timed runs (the sweep re-times every candidate alone after
training: ``latency_ms`` the median, ``latency_ms_spread`` the interquartile range); the trials no other fitting trial beats in both accuracy and that cost joined by a line
(the 2-D front of the panel); the search's own front (``pareto_rank`` 1 under its objectives)
ringed in black, with its test accuracy as a cross: test accuracy is shown for that
validation-selected front only. Dense fine-tuning is the reference star, the budget a dashed line.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from vpns_core.methods import METHODS
from vpns_core.pareto import (ACCURACY, COSTS, DEFAULT_OBJECTIVES, Budget, non_dominated_ranks,
                              parse_budget, pareto_ranks)

from .plotting import Figure, context, ordered
from .runs import Runs, cell_state
from .sparsity_curves import METHOD_ORDER, method_name

NAME = "pareto"
TITLE = "Accuracy against cost: the Pareto front of the search"
COLORS = dict(zip(METHOD_ORDER, plt.get_cmap("tab10").colors * 3))


def applicable(runs: Runs) -> bool:
    return "pareto_objectives" in runs.trials and runs.trials["pareto_objectives"].notna().any()


def _first(trials: pd.DataFrame, column: str, default=None):
    values = trials[column].dropna() if column in trials else pd.Series([], dtype=object)
    return values.iloc[0] if len(values) else default


def objectives(trials: pd.DataFrame) -> tuple[str, ...]:
    """The costs the search minimised, from its ``pareto_objectives`` column."""
    text = _first(trials, "pareto_objectives", "")
    costs = tuple(part.split(":")[0] for part in str(text).split(",") if part and not part.startswith(ACCURACY))
    return costs or DEFAULT_OBJECTIVES


def budget(trials: pd.DataFrame) -> Budget:
    """The sweep's budget, from its ``pareto_budget`` column (``"latency_ms<=40, params_m<=1.5"``)."""
    text = str(_first(trials, "pareto_budget", "") or "")
    return parse_budget(text.replace("<=", "=")) if text and text != "none" else Budget()


def _reference(trials: pd.DataFrame) -> pd.Series:
    if "pareto_reference" in trials:
        return trials["pareto_reference"].map(lambda v: v is True or str(v) == "True")
    return trials["config.method"] == "dense"


def front_table(runs: Runs) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...], Budget]:
    """(finished search trials with ``rank``, ``fits``, ``val_acc_pct``, ``test_acc_pct`` (front
    only) and the costs, sorted front first; the reference trials; the costs; the budget)."""
    trials = runs.trials[cell_state(runs.trials) == "ok"].copy()
    costs, limits = objectives(trials), budget(trials)
    reference = _reference(trials)
    search, dense = trials[~reference].copy(), trials[reference].copy()
    rows = search.to_dict("records")
    if "pareto_rank" in search and search["pareto_rank"].notna().all():
        ranks = [int(r) for r in search["pareto_rank"]]
    else:  # an older export: rank here, as the sweep does
        ranks = pareto_ranks(rows, costs, limits)
    search["rank"] = ranks
    for frame in (search, dense):
        frame["fits"] = [limits.fits(r) for r in frame.to_dict("records")]
        methods = [METHODS.get(m) if m in METHODS else None for m in frame["config.method"]]
        frame["pad"] = [p if m is not None and m.uses_prompt else math.nan
                        for p, m in zip(frame["config.pad_size"], methods)]
        frame["sparsity"] = [s if m is not None and m.prunes else math.nan
                             for s, m in zip(frame["config.sparsity"], methods)]
        frame["pattern"] = [pattern_label(m, p) for m, p in
                            zip(methods, frame["config.pattern"] if "config.pattern" in frame else [None] * len(frame))]
        frame["val_acc_pct"] = 100 * frame[ACCURACY].astype(float)
        frame["test_acc_pct"] = 100 * frame["selected_test_acc"].astype(float)
    search.loc[search["rank"] != 1, "test_acc_pct"] = math.nan  # test accuracy: the front only
    search = search.sort_values(["rank", costs[0]] if costs[0] in search else ["rank"])
    return search, dense, costs, limits


def pattern_label(method, pattern) -> str:
    """What a trial prunes: ``"2:4"`` (an N:M weight pattern), ``"unstructured"`` (other weight
    masks), ``"channels"`` (a channel method) or ``"-"`` (dense)."""
    if method is None or not method.prunes:
        return "-"
    if method.structured:
        return "channels"
    return pattern if isinstance(pattern, str) and pattern != "unstructured" else "unstructured"


def _marker(pattern: str) -> str:
    return "s" if ":" in str(pattern) else "o"


def _panel_costs(search: pd.DataFrame, costs: tuple[str, ...]) -> list[str]:
    present = [c for c in COSTS if c in search and search[c].notna().any()]
    return [c for c in costs if c in present] + [c for c in present if c not in costs]


def build(runs: Runs) -> Figure:
    search, dense, costs, limits = front_table(runs)
    panels = _panel_costs(search, costs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    methods = ordered(search["config.method"], METHOD_ORDER)
    for ax, cost in zip(axes[0], panels):
        _panel(ax, search, dense, cost, limits, methods)
    handles = [Line2D([], [], ls="none", marker="o", color=COLORS.get(m, "grey"), label=method_name(m))
               for m in methods]
    nm = sorted({p for p in search["pattern"] if ":" in str(p)})
    handles += [Line2D([], [], ls="none", marker="s", color="grey", label=f"{p} weight pattern") for p in nm]
    handles += [Line2D([], [], ls="none", marker="o", mfc="none", mec="black", ms=9, mew=1.5,
                       label="search front (rank 1), validation"),
                Line2D([], [], ls="none", marker="x", color="black", label="its test accuracy"),
                Line2D([], [], color="black", ls="-", lw=1, label="2-D front of the panel")]
    if len(dense):
        handles.append(Line2D([], [], ls="none", marker="*", color="black", ms=12, label="dense fine-tuning"))
    if limits:
        handles += [Line2D([], [], ls="none", marker="o", mfc="none", color="grey", label="over the budget"),
                    Line2D([], [], color="red", ls="--", label="budget")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    trials_all = pd.concat([search, dense])
    fig.suptitle(f"{TITLE}\n{context(runs, trials_all, sparsity=False)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    caption = _caption(runs, search, dense, costs, limits)
    return Figure(NAME, TITLE, fig, _numbers(search, dense, panels, limits), caption, label=_label)


def _panel(ax, search: pd.DataFrame, dense: pd.DataFrame, cost: str, limits: Budget,
           methods: list) -> None:
    for method in methods:
        part = search[search["config.method"] == method]
        color = COLORS.get(method, "grey")
        for fits, face in ((True, color), (False, "none")):
            for pattern in ordered(part["pattern"]):
                sel = part[(part["fits"] == fits) & (part["pattern"] == pattern)]
                ax.plot(sel[cost], sel["val_acc_pct"], ls="none", marker=_marker(pattern), mfc=face,
                        mec=color, ms=6)
        if cost == "latency_ms" and {"latency_ms_min", "latency_ms_max"} <= set(part):
            timed = part[part["latency_ms_min"].notna() & part["latency_ms_max"].notna()]
            ax.errorbar(timed[cost], timed["val_acc_pct"], ls="none", color=color, lw=1, capsize=2,
                        xerr=[timed[cost] - timed["latency_ms_min"], timed["latency_ms_max"] - timed[cost]])
        ringed = part[part["rank"] == 1]
        ax.plot(ringed[cost], ringed["val_acc_pct"], ls="none", marker="o", mfc="none", mec="black",
                ms=10, mew=1.5)
        ax.plot(ringed[cost], ringed["test_acc_pct"], ls="none", marker="x", color=color, ms=7, mew=2)
    fitting = search[search["fits"]]
    if len(fitting):  # the panel's own 2-D front among the trials that fit
        ranks = non_dominated_ranks(fitting[["val_acc_pct", cost]].to_numpy(float).tolist(), [True, False])
        front = fitting[[r == 1 for r in ranks]].sort_values(cost)
        ax.plot(front[cost], front["val_acc_pct"], color="black", lw=1, zorder=0)
    if len(dense) and cost in dense:
        ax.plot(dense[cost], dense["val_acc_pct"], ls="none", marker="*", color="black", ms=13)
    cap = dict(limits.limits).get(cost)
    if cap is not None:
        ax.axvline(cap, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if _leading(value) in (2, 5) else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"{cost} ({COSTS[cost].unit})")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(COSTS[cost].label, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _leading(value: float) -> int:
    """The leading digit of a positive number (which minor log ticks get a label)."""
    return int(f"{value:e}"[0]) if value > 0 else 0


def _numbers(search: pd.DataFrame, dense: pd.DataFrame, panels: list[str], limits: Budget) -> pd.DataFrame:
    columns = ["trial_id", "config.method", "pattern", "sparsity", "pad", "rank", "fits",
               "val_acc_pct", "test_acc_pct", *panels, "latency_ms_spread", "latency_ms_min", "latency_ms_max",
               "latency_repeats", "latency_cpu_ms", "latency_ms_in_trial"]
    columns = list(dict.fromkeys(columns))
    frames = []
    for frame, role in ((search, "search"), (dense, "reference")):
        part = frame[[c for c in columns if c in frame]].copy()
        part.insert(0, "role", role)
        frames.append(part)
    table = pd.concat(frames, ignore_index=True)
    if not limits:
        table = table.drop(columns=["fits"], errors="ignore")
    return table


def _label(row: dict) -> str:
    pattern = row.get("pattern")
    return f"{row.get('config.method')} {pattern + ' ' if ':' in str(pattern) else ''}{row.get('sparsity')}"


def _caption(runs: Runs, search: pd.DataFrame, dense: pd.DataFrame, costs: tuple[str, ...],
             limits: Budget) -> list[str]:
    front = search[search["rank"] == 1]
    text = [f"{context(runs, pd.concat([search, dense]), sparsity=False)}.",
            f"Search: maximise validation accuracy, minimise {', '.join(costs)}; "
            f"{len(search)} finished trials, {len(front)} on the front (rank 1"
            + (" among the trials that fit the budget" if limits else "") + ")."]
    if limits:
        fits = int(search["fits"].sum())
        text.append(f"Budget {limits.text}: {fits} of {len(search)} trials fit (filled markers); "
                    f"hollow markers exceed it.")
    if "latency_ms" in front and front["latency_ms"].notna().any():
        low, high = front["latency_ms"].min(), front["latency_ms"].max()
        device = _first(search, "latency_device", "the trial's device")
        batch = _first(search, "latency_batch", "?")
        threads = _first(search, "latency_threads", "?")
        spread = ((search["latency_ms_max"] - search["latency_ms_min"]) / search["latency_ms"]).median() \
            if "latency_ms_max" in search else math.nan
        # the sweep's re-timing (sweeps/multiobjective.py retime) keeps the in-trial median beside
        retimed = "latency_ms_in_trial" in search and search["latency_ms_in_trial"].notna().all()
        if retimed:
            repeats = _first(search, "latency_repeats", "?")
            iqr = (search["latency_ms_spread"] / search["latency_ms"]).median() \
                if "latency_ms_spread" in search else math.nan
            text.append(f"Front latency {low:.1f}-{high:.1f} ms ({high / low:.1f}x range) at batch "
                        f"{batch:g} on {device} with {threads:g} thread(s), re-timed after training, "
                        f"one candidate at a time with no trial running: median of {repeats:g} timed "
                        f"runs (bars: fastest to slowest); their interquartile range is a median "
                        f"{100 * iqr:.0f}% of the median, the full range {100 * spread:.0f}%.")
            drift = (search["latency_ms_in_trial"] / search["latency_ms"]).median()
            text.append(f"Measured inside the trials (beside other training) the latencies read a "
                        f"median {drift:.2f}x the re-timed ones; the search was told those.")
        else:
            text.append(f"Front latency {low:.1f}-{high:.1f} ms ({high / low:.1f}x range) at batch "
                        f"{batch:g}, measured in each trial on {device} with {threads:g} thread(s); the "
                        f"timed runs of a trial spread by a median {100 * spread:.0f}% of their median "
                        f"(other trials and other work shared the machine).")
        if "latency_cpu_ms" in search and search["latency_cpu_ms"].notna().any():
            ratio = (search["latency_ms"] / search["latency_cpu_ms"]).median()
            text.append(f"Wall-clock latency over the passes' CPU time (the latency with the core to "
                        f"itself): median {ratio:.2f}x, up to {(search['latency_ms'] / search['latency_cpu_ms']).max():.1f}x.")
    nm = sorted({p for p in search["pattern"] if ":" in str(p)})
    if nm:
        text.append(f"Squares: {', '.join(nm)} weight patterns (exactly N of every M weights kept along a "
                    f"layer's inputs; the first conv and the head stay dense), which sparse tensor cores "
                    f"can run; their latency here is the dense kernels'.")
    weight = [m for m in ordered(search["config.method"]) if m in METHODS and not METHODS.get(m).structured]
    if weight:
        text.append(f"Weight-pruned methods ({', '.join(map(method_name, weight))}) keep the dense "
                    f"shape: their latency and FLOPs are the dense model's (dense kernels skip no "
                    f"zero); params_m counts their nonzero weights.")
    text.append("Accuracy: validation accuracy at the selected epoch (what the search optimised); "
                "test accuracy (crosses) only for the validation-selected front.")
    if len(dense):
        row = dense.iloc[0]
        text.append(f"Dense fine-tuning (star): validation {row['val_acc_pct']:.1f}%, test "
                    f"{row['test_acc_pct']:.1f}%" + "".join(
                        f", {c} {row[c]:.3g}" for c in costs if c in row and not pd.isna(row[c])) + ".")
    return text
