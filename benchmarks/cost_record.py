"""What the cost record costs a trial (issue 28 §3): a trial with ``cost_record`` on against the
same trial with it off, side by side in one run.

- ``tiny``: the test suite's tiny trial (``tests/conftest.py`` TINY: tiny ResNet, 128 images,
  one epoch per stage, one thread) run whole with the record off and on, interleaved, and the
  record alone (:func:`vpns_core.costs.trial_costs` on the trial's export); for a weight method
  (``vpns``) and a channel method (``depgraph``, whose record adds the dense-vs-pruned
  comparison :func:`vpns_core.costs.compare`);
- ``default``: the record alone on the default model (EfficientNet-Lite0 with 90 % of its weights
  masked, as the default VPNs trial exports it) at the default ``latency_batch`` and
  ``measure_repeats``, at each ``--sizes`` frame, and the channel comparison (Lite0 against
  Lite0 with 30 % of its channels removed) that a default channel trial adds; a whole default
  trial (minutes) is not run: ``--trial-s`` is its time, to put the record in proportion.

    python -m benchmarks.cost_record                 # about 2 min on 1 thread
    python -m benchmarks.cost_record --quick         # tiny only, 1 round

Writes ``results/benchmarks/cost_record.json``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import summary, write_json
from sweeps.text_table import print_table
from vpns_core.config import Config
from vpns_core.costs import compare, cost_record, trial_costs
from vpns_core.train import run_trial

#: tests/conftest.py's tiny task (kept in step with it by hand: the benchmark must not import tests)
TINY = dict(model="tiny_resnet", pretrained=False, dataset="fashion_mnist", train_subset=128,
            test_subset=64, val_fraction=0.25, input_size=24, output_size=32, pad_size=4,
            batch_size=32, eval_batch_size=64, mask_epochs=1, tune_epochs=1, sparsity=0.8,
            label_mapping_samples=64, mask_lr=0.05, tune_lr=0.05, num_threads=1, measure_repeats=1,
            latency_batch=8)


def tiny_rows(rounds: int) -> list[dict]:
    from vpns_core.models import build_model
    from vpns_core.train import Trial
    rows = []
    for method in ("vpns", "depgraph"):
        whole: dict[bool, list[float]] = {False: [], True: []}
        record: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            run_trial(Config(**{**TINY, "method": method}), Path(tmp) / "warmup")  # untimed: first-use costs
            for r in range(rounds):
                for on in (False, True):  # interleaved: load changes hit both alike
                    cfg = Config(**{**TINY, "method": method, "cost_record": on})
                    folder = Path(tmp) / f"{method}-{on}-{r}"
                    start = time.perf_counter()
                    trial = Trial(cfg, folder)
                    trial.run()
                    whole[on].append(time.perf_counter() - start)
                    if on:  # the record alone: what Trial.finish and the channel method's final row add
                        export = torch.load(folder / "model_export.pt", weights_only=True)
                        start = time.perf_counter()
                        trial_costs(export, cfg, device="cpu")
                        if trial.method.structured:
                            compare(build_model(cfg.model, pretrained=False).module, trial.model,
                                    cfg.output_size, repeats=cfg.measure_repeats)
                        record.append(time.perf_counter() - start)
        off, on = statistics.median(whole[False]), statistics.median(whole[True])
        rows.append({"task": "tiny", "method": method, "trial_off_s": off, "trial_on_s": on,
                     "ratio_on_off": on / off, "record_s": statistics.median(record),
                     "record_share_of_trial": statistics.median(record) / on,
                     "off": summary(whole[False]), "on": summary(whole[True])})
    return rows


def default_rows(sizes: list[int], rounds: int, trial_s: float) -> list[dict]:
    from vpns_core.channel_pruning import ChannelPruner
    from vpns_core.models import build_model, head_layer
    cfg = Config()  # the defaults: Lite0, latency_batch 64, measure_repeats 5
    rows = []
    for size in sizes:
        plain = build_model(cfg.model, pretrained=False).module
        generator = torch.Generator().manual_seed(0)  # a random 90 % of every conv and linear weight
        masks = {name: torch.rand(m.weight.shape, generator=generator) >= 0.9
                 for name, m in plain.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            record = cost_record(plain, size, masks=masks, batch=cfg.latency_batch,
                                 repeats=cfg.measure_repeats, count_flops=cfg.count_flops)
            times.append(time.perf_counter() - start)
        rows.append({"task": f"default {cfg.model} {size} px", "method": "vpns (record)",
                     "record_s": statistics.median(times), "record_share_of_trial": statistics.median(times) / trial_s,
                     "latency_ms": record["latency_ms"], "latency_ms_spread": record["latency_ms_spread"],
                     "params_m": record["params_m"], "flops_g": record["flops_g"]})
        dense = build_model(cfg.model, pretrained=False).module
        pruned = build_model(cfg.model, pretrained=False).module
        channels = ChannelPruner(pruned, torch.zeros(1, 3, size, size), 0.3, method="depgraph",
                                 ignored=(head_layer(pruned)[1],))
        channels.remove(channels.plan())
        start = time.perf_counter()
        compared = compare(dense, pruned, size, repeats=cfg.measure_repeats)
        seconds = time.perf_counter() - start
        rows.append({"task": f"default {cfg.model} {size} px", "method": "depgraph 30% (comparison)",
                     "record_s": seconds, "record_share_of_trial": seconds / trial_s,
                     "speedup": compared["speedup"], "params_ratio": compared["params_ratio"]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="trials (or records) per variant")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="frames of the default model")
    p.add_argument("--trial-s", type=float, default=180.0,
                   help="seconds of one default trial, to put the record in proportion (default 180)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny only, one round")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    rows = tiny_rows(rounds)
    if not args.quick:
        rows += default_rows(args.sizes, rounds, args.trial_s)
    print_table("The cost record: trial time with it off and on, and the record alone",
                ["task", "method", "trial off (s)", "trial on (s)", "on ÷ off", "record (s)", "record ÷ trial"],
                [[r["task"], r["method"], r.get("trial_off_s"), r.get("trial_on_s"), r.get("ratio_on_off"),
                  r["record_s"], r["record_share_of_trial"]] for r in rows])
    write_json("cost_record", {"args": vars(args), "results": rows}, args.out)


if __name__ == "__main__":
    main()
