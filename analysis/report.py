"""One self-contained HTML page per sweep: every available figure with its caption and table,
the learned prompts as images, and the trials (failed ones with their error).

    python -m analysis.report --experiment ablation_pad              # latest sweep in MLflow
    python -m analysis.report --trials results/sweeps/<sweep>/trials.parquet

Images are embedded (base64), so the page can be mailed or logged as one MLflow artifact.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

from vpns_core.checkpoint import atomic_write

from .artifacts import prompt_images
from .figures import build_figures, figures_for
from .plotting import Figure
from .runs import PROJECT, Runs, cell_state

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img.figure { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; } td.text { text-align: left; }
.caption { font-size: 0.9em; } .error { color: #a00; }
.prompts { display: flex; flex-wrap: wrap; gap: 12px; }
.prompts figure { margin: 0; width: 180px; font-size: 0.75em; }
.prompts img { width: 180px; image-rendering: pixelated; border: 1px solid #ccc; }
"""
# Marks the page once its images decoded (a headless browser test reads it back from the DOM).
CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const ok = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.rendered = ok + '/' + images.length;
});
</script>"""


def _img(data: bytes, alt: str, cls: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def html_table(frame: pd.DataFrame, max_rows: int = 200) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.head(max_rows).iterrows():
        cells = "".join(f'<td class="{"text" if isinstance(v, str) else ""}">{_cell(v)}</td>'
                        for v in row)
        body.append(f"<tr>{cells}</tr>")
    more = f"<p>… {len(frame) - max_rows} more rows</p>" if len(frame) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def _trial_label(row: pd.Series) -> str:
    axes = [f"{k[5:]}={row[k]}" for k in row.index if k.startswith("axis.") and k != "axis.seed"
            and isinstance(row[k], str)]
    return " ".join(axes + [f"seed={row['config.seed']}"])


def trials_table(runs: Runs) -> pd.DataFrame:
    trials = runs.trials
    frame = pd.DataFrame({"phase": trials.get("phase"), "trial": trials.get("trial_id"),
                          "point": [_trial_label(r) for _, r in trials.iterrows()],
                          "state": cell_state(trials), "epochs": trials.get("epochs_done")})
    for column, name in (("selected_test_acc_prompt", "test acc. with prompt (%)"),
                         ("selected_test_acc_noprompt", "test acc. without prompt (%)"),
                         ("mask_stage_test_acc_prompt", "after mask finding, with prompt (%)"),
                         ("mask_stage_test_acc_noprompt", "after mask finding, without prompt (%)")):
        if column in trials:
            frame[name] = 100 * trials[column].astype(float)
    for column, name in (("latency_ms", "latency (ms)"), ("params_m", "params / nonzeros (M)"),
                         ("pareto_rank", "Pareto rank"), ("feasible", "fits the budget")):
        if column in trials and trials[column].notna().any():
            frame[name] = trials[column]
    return frame


def write_report(runs: Runs, figures: list[Figure], path: str | Path,
                 errors: dict[str, str] | None = None, prompts: bool = True) -> Path:
    """Write the page to ``path`` (figures must be saved: their PNG is embedded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    states = cell_state(runs.trials).value_counts()
    parts = [f"<h1>{html.escape(runs.script)} — sweep {html.escape(runs.sweep)}</h1>",
             f"<p>Preset <b>{html.escape(runs.preset)}</b>; {len(runs.trials)} trials: "
             f"{int(states.get('ok', 0))} finished, {int(states.get('stopped', 0))} stopped early, "
             f"{int(states.get('failed', 0))} failed, {int(states.get('missing', 0))} never ended. "
             f"Read from {html.escape(runs.origin)}; written {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    if figures:
        parts.append("<ul>" + "".join(f'<li><a href="#{f.name}">{html.escape(f.title)}</a></li>'
                                      for f in figures) + "</ul>")
    for figure in figures:
        files = ", ".join(p.name for p in figure.paths)
        parts += [f'<h2 id="{figure.name}">{html.escape(figure.title)}</h2>',
                  _img(figure.png.read_bytes(), figure.name, "figure") if figure.png else "",
                  '<div class="caption">' + "".join(f"<p>{html.escape(s)}</p>" for s in figure.caption) + "</div>",
                  f"<details><summary>plotted numbers ({html.escape(files)})</summary>"
                  f"{html_table(figure.table)}</details>"]
    for name, error in (errors or {}).items():
        parts.append(f'<h2>{html.escape(name)}</h2><p class="error">figure not drawn: {html.escape(error)}</p>')
    if prompts:
        images, note = prompt_images(runs)
        parts.append("<h2>Learned prompts</h2>")
        if note:
            parts.append(f"<p>{html.escape(note)}.</p>")
        if images:
            tiles = []
            for image in images:
                row = image.trial
                acc = row.get("selected_test_acc_prompt")
                text = _trial_label(row) + (f"<br>test acc. with prompt {100 * acc:.1f}%"
                                            if isinstance(acc, float) and not math.isnan(acc) else "")
                tiles.append(f"<figure>{_img(image.png, 'prompt ' + _trial_label(row))}"
                             f"<figcaption>{text}</figcaption></figure>")
            parts.append('<div class="prompts">' + "".join(tiles) + "</div>")
    failed = runs.trials[cell_state(runs.trials) == "failed"]
    if len(failed):
        rows = "".join(f"<tr><td class=text>{html.escape(str(r['trial_id']))}</td><td class=text>"
                       f"{html.escape(_trial_label(r))}</td><td class='text error'>"
                       f"{html.escape(_last_line(r.get('error')))}</td></tr>" for _, r in failed.iterrows())
        parts.append(f"<h2>Failed trials</h2><table><tr><th>trial</th><th>point</th><th>error</th></tr>{rows}</table>")
    parts += ["<h2>Trials</h2>", html_table(trials_table(runs), max_rows=1000)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(runs.sweep)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}{CHECK}</body></html>")
    atomic_write(path, lambda handle: handle.write(page.encode("utf-8")))
    return path


def _last_line(error) -> str:
    lines = [line for line in str(error or "unknown error").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


# --- command line ----------------------------------------------------------------------------------


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--experiment", help="MLflow experiment (the sweep script's name, e.g. ablation_pad)")
    add("--sweep", help="sweep name within the experiment (default: its latest sweep)")
    add("--tracking-uri", default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db)")
    add("--trials", type=Path, help="read a Parquet export instead (trials.parquet of a sweep)")
    add("--epochs", type=Path, help="its epochs.parquet (default: next to --trials)")
    add("--out", type=Path, default=None, help="output folder (default results/figures/<sweep>)")
    add("--no-log", action="store_true", help="do not log the outputs to the sweep's MLflow parent run")


def load(args: argparse.Namespace) -> Runs:
    from .runs import read_mlflow, read_parquet
    if args.trials:
        return read_parquet(args.trials, args.epochs, tracking_uri=args.tracking_uri)
    if not args.experiment:
        raise SystemExit("give --experiment NAME (MLflow) or --trials PATH (Parquet)")
    return read_mlflow(args.experiment, args.sweep, args.tracking_uri)


def output_dir(args: argparse.Namespace, runs: Runs) -> Path:
    if args.out:
        return args.out
    results = Path(os.environ.get("VPNS_RESULTS", PROJECT / "results"))
    return results / "figures" / runs.sweep


def main(argv: list[str] | None = None) -> int:
    from .artifacts import log_to_parent

    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_flags(parser)
    args = parser.parse_args(argv)
    try:
        runs = load(args)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = output_dir(args, runs)
    figures, errors = build_figures(runs, figures_for(runs), out)
    report = write_report(runs, figures, out / "report.html", errors)
    outputs = [p for f in figures for p in f.paths] + [report]
    print(f"report: {report}")
    if not args.no_log and runs.tracking_uri:
        try:
            run_id = log_to_parent(runs, outputs)
            print(f"logged {len(outputs)} files to MLflow parent run {run_id}")
        except LookupError as err:
            print(f"not logged: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
