"""The trial's model as ``torch.export`` programs that plain torch loads, without vpns and
without the architecture's package: ``torch.export.load(path).module()(images)``.

``model_export.pt`` is a state dict: loading it needs the architecture's code, which for the
tiny ResNet lives in vpns (``vpns_core.models.TinyResNet``). A program carries its code: the
whole prediction a trial evaluates (prompt and normalisation, the pruned network with its masks
applied, the label mapping onto the target classes), exported on the CPU in eval mode from the
exported (validation-selected) state, for any batch size:

- ``model_program.pt2``: target-class logits as the trial's ``test_acc_prompt`` measures them
  (with the learned prompt; a trial without a prompt: its plain pass);
- ``model_program_unprompted.pt2`` (trials that feed a prompt): as its ``test_acc_noprompt``.

``images`` are RGB floats in [0, 1], ``[N, 3, input_size, input_size]`` (``input_size`` is in
the export and in each program's ``extra_files["meta.json"]``), on the CPU. (TorchScript, the
older way, is deprecated in the torch this project pins.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import atomic_write
from .label_mapping import LabelMap
from .prompts import Prompt

PROGRAM = "model_program.pt2"
UNPROMPTED_PROGRAM = "model_program_unprompted.pt2"


class Predictor(nn.Module):
    """Images -> target-class logits: ``label_map(network(prompt(images)))``, the trial's
    :meth:`~vpns_core.train.Trial.forward` on one module."""

    def __init__(self, prompt: Prompt, network: nn.Module, label_map: LabelMap, prompted: bool) -> None:
        super().__init__()
        self.prompt, self.network, self.label_map = prompt, network, label_map
        self.prompted = prompted

    def forward(self, images: Tensor) -> Tensor:
        return self.label_map(self.network(self.prompt(images, enabled=self.prompted)))


def export_program(predictor: Predictor, input_size: int) -> torch.export.ExportedProgram:
    """``predictor`` (moved to the CPU, eval mode) as a ``torch.export`` program of
    ``images -> logits`` for any batch size."""
    predictor = predictor.cpu().eval()
    example = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.export.export(predictor, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def save_programs(predictor: Predictor, export: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``folder/model_program.pt2`` (with the prompt) and, for a trial that feeds one,
    ``folder/model_program_unprompted.pt2`` (without), atomically, each with the export's plain
    facts (sizes, classes, the prompt type) as ``extra_files["meta.json"]``. Returns the paths."""
    meta = {k: export[k] for k in ("model", "input_size", "output_size", "num_classes",
                                   "num_source_classes", "prompt_type", "head") if k in export}
    modules = {PROGRAM: predictor}
    if predictor.prompted:  # without a prompt the two passes are one
        modules[UNPROMPTED_PROGRAM] = Predictor(predictor.prompt, predictor.network, predictor.label_map,
                                                prompted=False)
    paths = []
    for name, module in modules.items():
        program = export_program(module, export["input_size"])
        files = {"meta.json": json.dumps({**meta, "prompted": module.prompted})}
        paths.append(atomic_write(Path(folder) / name,
                                  lambda handle, p=program, f=files: torch.export.save(p, handle, extra_files=f)))
    return paths
