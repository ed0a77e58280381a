"""Hand back the model that fits: the most accurate trial of a sweep (on validation) within a
budget, its plain export copied where the user says.

    python -m vpns_core.pick --sweep NAME --budget latency_ms=120 --out model.pt
    python -m vpns_core.pick --sweep NAME --out model.pt          # the sweep's own --budget

Reads ``<storage>/NAME/trials.parquet`` (``sweeps/pareto.py``, ``sweeps/structured.py`` or any
sweep run with ``cost_record`` on, whose trials record ``latency_ms``, ``params_m``, ``flops_g``:
:mod:`vpns_core.costs`), keeps the finished trials that fit,
picks the best validation accuracy (ties: the later selected epoch, then the smaller trial id;
:func:`vpns_core.stats.selection_key`), prints it with its measured costs and its test accuracy,
and copies its ``model_export.pt`` (a state dict: loads with torch and the architecture's own
package, ``scripts/load_pruned.py``; vpns' tiny ResNet needs vpns) and its ``model_program.pt2``
(``torch.export``: loads with torch alone, ``torch.export.load(path).module()``; see
:mod:`vpns_core.export`) beside it, as ``<out>`` and ``<out stem>_program.pt2``. With a
latency cap it times the copy again here (``--no-remeasure`` skips it), loaded as a user loads it,
at the trial's batch size and thread count, and says whether it still fits. If no trial fits,
it says so, names the closest trial and exits with status 1. Status 2: a usage error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .pareto import ACCURACY, COSTS, Budget, closest, parse_budget
from .stats import pick

PROJECT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}")


class PickError(ValueError):
    """A flag or what it points at is wrong; the message names it."""


def default_storage() -> Path:
    """Where sweeps live unless told: ``$VPNS_STORAGE``, else ``<$VPNS_RESULTS or results>/sweeps``."""
    if os.environ.get("VPNS_STORAGE"):
        return Path(os.environ["VPNS_STORAGE"])
    return Path(os.environ.get("VPNS_RESULTS", PROJECT / "results")) / "sweeps"


def sweep_dir(storage: Path, name: str) -> Path:
    if not _NAME.fullmatch(name) or ".." in name:
        raise PickError(f"--sweep {name!r}: a sweep name is one folder name (letters, digits, ._=+-)")
    folder = Path(storage).expanduser().resolve() / name
    if not (folder / "trials.parquet").is_file():
        raise PickError(f"--sweep {name}: {folder / 'trials.parquet'} not found (did the sweep end? "
                        f"--storage-path names the folder the sweeps are in)")
    return folder


def read_trials(folder: Path) -> list[dict[str, Any]]:
    """The finished trials of the sweep at ``folder`` (rows of trials.parquet, every phase)."""
    import pyarrow.parquet as pq
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    return [r for r in rows if r.get("finished") and _known(r.get(ACCURACY))]


def sweep_budget(folder: Path) -> Budget:
    """The ``--budget`` the sweep ran with (its sweep.json), or none."""
    meta = folder / "sweep.json"
    if not meta.is_file():
        return Budget()
    saved = json.loads(meta.read_text()).get("args", {})
    return parse_budget(saved.get("budget") or [])


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def choose(rows: list[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """The most accurate row (validation) among those that fit ``budget``; None if none fits."""
    return pick([r for r in rows if budget.fits(r)], lambda r: r.get(ACCURACY),
                lambda r: r.get("selected_epoch"), lambda r: r.get("trial_id"))


def describe(row: dict[str, Any]) -> str:
    """One trial in a few lines: what it is, its accuracies, its measured costs."""
    method = row.get("config.method")
    sparsity = row.get("config.sparsity")
    head = f"trial {row.get('trial_id')} (phase {row.get('phase')}): {method}"
    if _known(sparsity) and method != "dense":
        head += f" at {100 * sparsity:.1f}% sparsity"
    if _known(row.get("config.pad_size")) and row.get("prompt_tunable"):
        head += f", pad {int(row['config.pad_size'])}"
    lines = [head, f"  validation accuracy {100 * row[ACCURACY]:.1f}% (selected epoch "
                   f"{row.get('selected_epoch')}), test accuracy {100 * row.get('selected_test_acc', math.nan):.1f}%"]
    if _known(row.get("latency_ms")):
        lines.append(f"  latency_ms {row['latency_ms']:.2f} (median of {row.get('latency_repeats', '?'):g} "
                     f"timed runs, {row.get('latency_ms_min', math.nan):.2f}-{row.get('latency_ms_max', math.nan):.2f}) "
                     f"at batch {row.get('latency_batch', '?'):g}, "
                     + (f"{row['latency_layout']} input, " if row.get("latency_layout") else "") + f"on "
                     f"{row.get('latency_device', '?')} with {row.get('latency_threads', '?'):g} thread(s), "
                     + (f"re-timed alone after training (IQR {row['latency_ms_spread']:.2f}; in the trial "
                        f"{row['latency_ms_in_trial']:.2f})" if _known(row.get("latency_ms_in_trial"))
                        and _known(row.get("latency_ms_spread")) else "measured in the trial"))
    sizes = [f"{name} {row[name]:.4g}" for name in ("latency_cpu_ms", "params_m", "flops_g", "flops_nonzero_g")
             if _known(row.get(name))]
    if sizes:
        lines.append("  " + ", ".join(sizes))
    return "\n".join(lines)


def export_path(folder: Path, row: dict[str, Any]) -> Path:
    checkpoint = row.get("checkpoint")
    if not checkpoint:
        raise PickError(f"trial {row.get('trial_id')}: trials.parquet records no checkpoint "
                        f"(a sweep exported before checkpoints were recorded)")
    path = Path(checkpoint)
    path = (path if path.is_absolute() else folder / path) / "model_export.pt"
    if not path.is_file():
        raise PickError(f"trial {row.get('trial_id')}: {path} not found")
    return path


def copy_programs(trial: Path, out: Path) -> list[Path]:
    """Copy the trial's ``torch.export`` programs (:mod:`vpns_core.export`) beside ``out``:
    ``<out stem>_program.pt2`` and, for a prompted trial, ``<out stem>_program_unprompted.pt2``.
    Returns the copies (none for a trial exported before the programs were written)."""
    from .export import PROGRAM, UNPROMPTED_PROGRAM
    copies = []
    for name, suffix in ((PROGRAM, "_program.pt2"), (UNPROMPTED_PROGRAM, "_program_unprompted.pt2")):
        if (trial / name).is_file():
            copies.append(out.with_name(out.stem + suffix))
            shutil.copyfile(trial / name, copies[-1])
    return copies


def channels_last(row: dict[str, Any], model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the trial timed its model on NHWC input: its ``latency_layout``, else (a sweep
    recorded before the layout was) the trial's own rule (``channels_last`` or the model's)."""
    from .models import prefers_channels_last
    recorded = {"NHWC": True, "NCHW": False}.get(row.get("latency_layout"))
    if recorded is None:
        recorded = row.get("config.channels_last")
    return bool(prefers_channels_last(model, device) if recorded is None else recorded)


def remeasure(path: Path, row: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Latency of the export at ``path`` here, rebuilt as a user loads it, at the trial's batch
    size, input size and thread count, on the CPU (or CUDA if the trial ran there and it is here)."""
    from .costs import latency
    from .models import plain_model
    export = torch.load(path, map_location="cpu", weights_only=True)
    model = plain_model(export)
    device = torch.device("cuda" if str(row.get("latency_device", "")).startswith("cuda")
                          and torch.cuda.is_available() else "cpu")
    threads = row.get("latency_threads")
    previous = torch.get_num_threads()
    if _known(threads) and threads > 0:
        torch.set_num_threads(int(threads))
    try:
        return latency(model, export["output_size"], int(row.get("latency_batch") or 64), device=device,
                       repeats=repeats, channels_last=channels_last(row, model, device))
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_core.pick", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep's name (its folder under --storage-path)")
    parser.add_argument("--budget", action="append", default=None, metavar="COST=MAX",
                        help=f"cap a cost ({', '.join(COSTS)}), e.g. latency_ms=120 (repeatable or "
                             f"comma-separated); default: the sweep's own --budget")
    parser.add_argument("--out", type=Path, default=None, help="copy the chosen model_export.pt here")
    parser.add_argument("--storage-path", type=Path, default=default_storage(),
                        help="the folder the sweeps are in (default $VPNS_STORAGE or results/sweeps)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the re-measurement (default 20)")
    parser.add_argument("--no-remeasure", action="store_true", help="do not time the chosen model here")
    args = parser.parse_args(argv)
    try:
        folder = sweep_dir(args.storage_path, args.sweep)
        try:
            budget = parse_budget(args.budget) if args.budget is not None else sweep_budget(folder)
        except ValueError as err:
            raise PickError(f"--budget {','.join(args.budget or [])}: {err}") from None
        if args.repeats < 1:
            raise PickError(f"--repeats {args.repeats}: must be at least 1")
        rows = read_trials(folder)
        if not rows:
            raise PickError(f"--sweep {args.sweep}: no finished trial in {folder / 'trials.parquet'}")
        missing = sorted({name for name, _ in budget.limits if not any(_known(r.get(name)) for r in rows)})
        if missing:
            raise PickError(f"--budget: no trial of sweep {args.sweep} recorded {', '.join(missing)} (its "
                            f"trials ran without the cost record: sweeps/pareto.py and sweeps/structured.py "
                            f"turn it on; another sweep with --set cost_record=True)")
    except PickError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    within = f"within {budget.text}" if budget else "(no budget: the most accurate trial)"
    best = choose(rows, budget)
    if best is None:
        near = rows[closest(rows, budget)]
        over = ", ".join(f"{name} {near.get(name, math.nan):.4g} is {100 * v:+.0f}% over {cap:g}"
                         for (name, cap), v in zip(budget.limits, budget.violations(near).values()) if v > 0)
        print(f"Nothing fits {budget.text}: none of the {len(rows)} finished trials of sweep "
              f"{args.sweep}. The closest is\n{describe(near)}\n  ({over})")
        return 1
    print(f"Most accurate on validation {within}, of {len(rows)} finished trials:\n{describe(best)}")
    try:
        source = export_path(folder, best)
    except PickError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    target = source
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, args.out)
        target = args.out
        from .models import plain_model
        export = torch.load(source, map_location="cpu", weights_only=True)
        nhwc = channels_last(best, plain_model(export), torch.device("cpu"))
        layout = " --channels-last" if nhwc else ""
        package = export["builder"]["module"].split(".")[0]
        loads = ("needs vpns: its architecture is vpns' own" if package == "vpns_core" else
                 f"loads with torch and {package}, no vpns")
        print(f"copied its export to {args.out} (a state dict; {loads}; time it as the trial did: python "
              f"scripts/load_pruned.py {args.out} --latency-batch {int(best.get('latency_batch') or 64)}"
              f"{layout} --threads {int(best.get('latency_threads') or 1)})")
        programs = copy_programs(source.parent, args.out)
        if programs:
            print(f"copied its program to {', '.join(map(str, programs))} (loads with torch alone: "
                  f"torch.export.load(PATH).module()(images))")
    else:
        print(f"its export: {source} (--out PATH copies it and its program)")
    timed = {name: cap for name, cap in budget.limits if name in ("latency_ms", "latency_cpu_ms")}
    if timed and not args.no_remeasure:
        again = remeasure(target, best, args.repeats)
        print(f"re-measured here: latency_ms {again['latency_ms']:.2f} (median of {args.repeats}, "
              f"{again['latency_ms_min']:.2f}-{again['latency_ms_max']:.2f})"
              + (f", latency_cpu_ms {again['latency_cpu_ms']:.2f}" if "latency_cpu_ms" in again else "")
              + f" at batch {again['latency_batch']}, {again['latency_layout']} input, on "
              f"{again['latency_device']} with {again['latency_threads']} thread(s)")
        for name, cap in timed.items():
            if name in again:
                print(f"  {name} {again[name]:.2f}: {'fits' if again[name] <= cap else 'EXCEEDS'} the budget {name}<={cap:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
