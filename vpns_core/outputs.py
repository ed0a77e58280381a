"""What a finished trial leaves (:func:`finish`): its masks and per-layer statistics, the export of
the validation-selected model (``model_export.pt`` and the torch.export programs a plain torch
loads), and the final row of metrics. In a data-parallel trial only rank 0 writes and measures the
cost record (the other ranks' summaries, without it, are not reported: sweeps/data_parallel.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .assembly import Assembly
from .checkpoint import atomic_save
from .config import Config
from .costs import trial_costs
from .evaluation import Evaluation
from .export import save_programs
from .loop import Loop


@dataclass
class TrialResult:
    config: Config
    final: dict[str, Any]
    history: list[dict[str, Any]]
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    workdir: Path | None = None


def export_dict(assembly: Assembly, best: dict[str, Any], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model_export.pt``: the selected network's state, masks, prompt and label mapping, and
    what it takes to rebuild and feed it."""
    cfg, source = assembly.cfg, assembly.source
    return {"state_dict": best["model"], "masks": {k: v.cpu() for k, v in masks.items()},
            "model": cfg.model, "num_source_classes": source.num_source_classes,
            "head": cfg.head, "label_mapping": best["mapping"], "num_classes": assembly.num_classes,
            "prompt": best["prompt"], "prompt_type": cfg.prompt, "input_size": cfg.input_size,
            "dataset": cfg.dataset, "output_size": cfg.output_size, "mean": list(source.mean),
            "std": list(source.std)}


def costs(assembly: Assembly, export: dict[str, Any], test) -> dict[str, Any]:
    """The cost record of the model this trial exports, with ``cfg.cost_record`` (else ``{}``):
    :func:`vpns_core.costs.trial_costs` on the trial's device, input layout and autocast; a 2:4
    trial's semi-structured check runs on real unprompted test images."""
    device = assembly.device

    @torch.no_grad()
    def images() -> torch.Tensor:
        x = torch.stack([test[i][0] for i in range(min(64, len(test)))])
        return assembly.prompt(x.to(device).float().div(255), enabled=False)
    return trial_costs(export, assembly.cfg, device=device, amp_dtype=assembly.amp_dtype,
                       channels_last=assembly.channels_last, inputs=images)


def finish(workdir: Path, assembly: Assembly, loop: Loop, evaluation: Evaluation, method: Any,
           context: Any, dataset: dict[str, Any], test, writes: bool) -> TrialResult:
    """Write masks, per-layer stats, the exported model and its programs (where ``writes``);
    return the trial's result with its final row."""
    cfg, net = assembly.cfg, assembly.net
    stats = [dict(name=s.name, numel=s.numel, kept=s.kept, density=s.density, pruned=s.pruned)
             for s in net.layer_stats()] if net.mode != "dense" else []
    masks = assembly.masks()
    if writes:
        atomic_save({"masks": {k: v.cpu() for k, v in masks.items()}, "model": cfg.model,
                     "sparsity": cfg.sparsity}, workdir / "masks.pt")
        (workdir / "layer_stats.json").write_text(json.dumps(stats, indent=1))
    if evaluation.best_state is None:  # no tuning epoch selected one: the model as it ends
        evaluation.best_state = assembly.snapshot()
    best = evaluation.best_state
    export = export_dict(assembly, best, masks)
    export.update(method.export_entries(context))
    if writes:
        atomic_save(export, workdir / "model_export.pt")
        # the state dict needs the architecture's code (vpns' own for the tiny ResNet); the
        # torch.export programs carry it: plain torch loads them (vpns_core.export)
        save_programs(assembly.predictor(export, best), export, workdir)
    history = loop.history
    final = dict(history[-1]) if history else {}
    final["dataset"] = dict(dataset)
    final.update(evaluation.selected())
    mask_stage = [h for h in history if h["stage"] == "mask"]
    if mask_stage:
        final["mask_stage_test_acc_prompt"] = mask_stage[-1]["test_acc_prompt"]
        final["mask_stage_test_acc_noprompt"] = mask_stage[-1]["test_acc_noprompt"]
    final.update(method.final_metrics(context))
    if writes:  # one rank times the model; the others would only queue on the timing lock
        final.update(costs(assembly, export, test))
    final["trial_time_s"] = loop.wall_time + evaluation.eval_time  # training and evaluation
    final["prompt_tunable"] = assembly.prompt.tunable_count if assembly.uses_prompt else 0
    if cfg.nm is not None:  # the layers an N:M pattern leaves dense, by name
        final["nm_dense_layers"] = ", ".join(n for n, _ in net.excluded)
    pad = assembly.uses_prompt and cfg.prompt == "pad"
    final["prompt_input_fraction"] = cfg.prompt_input_fraction if pad else 0.0
    final["prompt_image_fraction"] = cfg.prompt_image_fraction if pad else 0.0
    return TrialResult(cfg, final, list(history), stats, workdir)
