"""Post-pruning prompt pilot: plain pruners with no prompt, a prompt learned on the frozen sparse
model ("zero-shot"), or a prompt learned while fine-tuning (``post_prompt``)."""
from __future__ import annotations

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, best_notes, context, draw, marker_note,
                       metric_panels, status_note)
from .runs import Runs, aggregate
from .sparsity_curves import METHOD_ORDER, method_name

NAME = "pilot"
TITLE = "Post-pruning prompts (pilot study)"
ORDER = ("none", "zero_shot", "fine_tune")
NAMES = {"none": "no prompt", "zero_shot": "zero-shot prompt", "fine_tune": "fine-tuning prompt"}


def applicable(runs: Runs) -> bool:
    return "config.post_prompt" in runs.trials and (runs.trials["config.post_prompt"] != "none").any()


def build(runs: Runs) -> Figure:
    trials = runs.trials
    table = aggregate(trials, ["config.method", "config.post_prompt"], ACCURACY)

    def label(row) -> str:
        return NAMES.get(row["config.post_prompt"], row["config.post_prompt"])
    # tested with the prompt: the pilot study's question is what a post-pruning prompt recovers
    notes = best_notes(table, label, by="config.method", stem="test_prompt_pct",
                       heading=lambda method: f"{method_name(method)}, tested with prompt, highest "
                                              f"setting against the others")
    caption = [f"{context(runs, trials)}.",
               "Zero-shot: the pruned weights are frozen and only a prompt is learned (BatchNorm "
               "statistics still adapt); fine-tuning: the prompt is learned together with the "
               "weights; no prompt: plain prune-then-fine-tune. " + ACCURACY_NOTE, *notes,
               status_note(table, lambda r: f"{method_name(r['config.method'])} / {label(r)}"),
               *marker_note(table)]
    fig = draw(table, x="config.method", panels=metric_panels(table, ("test_prompt_pct", "test_noprompt_pct")),
               xlabel="pruning method", title=f"{TITLE}\n{context(runs, trials)}", caption=caption,
               categorical=True, order=METHOD_ORDER, tick_label=method_name,
               series="config.post_prompt", series_order=ORDER,
               series_label=lambda v: NAMES.get(v, v))
    return Figure(NAME, TITLE, fig, table, caption)
