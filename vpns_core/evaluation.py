"""Evaluation of a trial (:class:`Evaluation`): what is evaluated when, the test-set policy, the
label mapping and BatchNorm recalibration, and the validation-selected (best) epoch.

Validation is evaluated every epoch, with and without the prompt; the test set only where a
result reads it (``cfg.test_every_epoch`` False): at the end of mask finding and at each tuning
epoch that becomes the validation-selected one. Nothing is ever selected on the test set.
Every pass here leaves the global RNGs as they were (:func:`vpns_core.feed.rng_untouched`).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from .assembly import Assembly
from .feed import Feed, rng_untouched


class Evaluation:
    """Evaluation passes of ``assembly`` on ``feed``'s splits, totalled by ``collective``."""

    def __init__(self, assembly: Assembly, feed: Feed, collective: Any) -> None:
        self.assembly, self.feed, self.collective = assembly, feed, collective
        self.cfg, self.device = assembly.cfg, assembly.device
        self.eval_time = 0.0  # validation, test and label mapping passes (cumulative)
        #: the validation-selected epoch's accuracies, and its snapshot (``Assembly.snapshot``)
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, Any] | None = None
        self.mapping_done = False

    @torch.no_grad()
    def evaluate(self, dataset, prompted: bool) -> tuple[float, float]:
        """Top-1 accuracy and mean loss on ``dataset`` (eval mode); no effect on training."""
        a = self.assembly
        a.model.eval()
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        seen = 0
        with rng_untouched(self.device):
            for x, y in self.feed.loader(dataset, train=False):
                x, y = self.feed.to_device(x, y)
                with a.autocast():
                    logits = a.forward(x, prompted).float()
                loss += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
        n = len(dataset)
        correct, loss, seen = self.collective.totals(correct, loss, seen, device=self.device)
        if int(seen) != n:  # each rank evaluated its shard: every image counts once
            raise RuntimeError(f"evaluate: the {self.collective.world} ranks evaluated {int(seen)} images "
                               f"of a split of {n}")
        return correct.item() / n, loss.item() / n

    @torch.no_grad()
    def compute_label_mapping(self, prompted: bool) -> Tensor:
        """FLM over the training images of :meth:`Feed.label_mapping_indices` (test-time
        transform); on N ranks each counts its shard and rank 0 maps the sum."""
        a = self.assembly
        if a.label_map.identity:
            return a.label_map.mapping
        data = self.feed.data.train_eval
        indices = self.feed.label_mapping_indices()
        a.model.eval()
        preds, targets = [], []
        subset = data if len(indices) == len(data) else Subset(data, indices.tolist())
        with rng_untouched(self.device):
            for x, y in self.feed.loader(subset, train=False):
                x, y = self.feed.to_device(x, y)
                with a.autocast():
                    preds.append(a.model(a.prompt(x, enabled=prompted)).argmax(1))
                targets.append(y)
        mapping = self.collective.label_mapping(preds, targets, a.source.num_source_classes,
                                                a.num_classes, self.device)
        a.label_map.mapping.copy_(mapping.to(self.device))
        return mapping.cpu()

    def map_labels_once(self) -> None:
        """The first label mapping of the trial: after the threshold is set, with the
        zero-initialised prompt (the frame a prompted pass sees, as the authors' code), or the
        plain input for a method without a prompt."""
        if not self.mapping_done:
            self.compute_label_mapping(prompted=self.assembly.uses_prompt)
            self.mapping_done = True

    @torch.no_grad()
    def recalibrate_bn(self, prompted: bool) -> None:
        """Re-estimate BatchNorm running statistics for the (sparse) model on training images."""
        a = self.assembly
        bns = [m for m in a.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns or self.cfg.bn_recalibrate_batches == 0:
            return
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        a.model.train()
        with rng_untouched(self.device):
            for i, (x, y) in enumerate(self.feed.loader(self.feed.data.train_eval, train=False, shard=False)):
                if i >= self.cfg.bn_recalibrate_batches:
                    break
                a.model(a.prompt(self.feed.to_device(x, y)[0], enabled=prompted))
        for m, momentum in zip(bns, saved):
            m.momentum = momentum

    def epoch(self, stage: str, epoch_row: int, prompted: bool, last_of_stage: bool) -> dict[str, Any]:
        """The evaluation columns of an epoch row (``epoch_row``: its 1-based number in the
        trial), and the selection: a tuning epoch whose validation accuracy is the best so far
        becomes the selected one (its test accuracies and snapshot are kept)."""
        cfg, a = self.cfg, self.assembly
        if a.net.mode == "score":
            a.net.refresh()
        t0 = time.perf_counter()
        # A method without a prompt has one (plain) pass; a prompt that adds nothing (a pad
        # prompt still at its zero init, in the same frame) gives the same numbers with and
        # without it: one pass, not two.
        if not a.uses_prompt:
            passes = (False,)
        else:
            passes = (True,) if a.prompt.is_identity() else (True, False)
        data = self.feed.data
        val = {p: self.evaluate(data.val, prompted=p)[0] if len(data.val) else math.nan for p in passes}
        val_p, val_n = val[passes[0]], val[passes[-1]]
        # Headline accuracy: prompted when this stage trains with the prompt under the paper
        # schedule; the reference code measures without the prompt.
        headline_prompted = prompted and cfg.schedule == "paper"
        val_acc = val_p if headline_prompted else val_n
        selected = stage == "tune" and (self.best is None or val_acc > self.best["val_acc"])
        tested = cfg.test_every_epoch or selected or (stage == "mask" and last_of_stage)
        test_metrics: dict[str, float] = {}
        if tested:
            test = {p: self.evaluate(data.test, prompted=p) for p in passes}
            (test_p, test_loss), test_n = test[passes[0]], test[passes[-1]][0]
            test_metrics = {"test_loss": test_loss, "test_acc_prompt": test_p,
                            "test_acc_noprompt": test_n,
                            "test_acc": test_p if headline_prompted else test_n}
        eval_time = time.perf_counter() - t0
        self.eval_time += eval_time
        if selected:
            self.best = {"val_acc": val_acc, "epoch": epoch_row, "test_acc": test_metrics["test_acc"],
                         "test_acc_prompt": test_metrics["test_acc_prompt"],
                         "test_acc_noprompt": test_metrics["test_acc_noprompt"]}
            self.best_state = a.snapshot()
        return {"test": test_metrics, "val_acc_prompt": val_p, "val_acc_noprompt": val_n,
                "val_acc": val_acc, "eval_time_s": eval_time}

    def selected(self) -> dict[str, Any]:
        """The final row's columns of the validation-selected epoch (none before one exists)."""
        if self.best is None:
            return {}
        return {"selected_epoch": self.best["epoch"], "selected_val_acc": self.best["val_acc"],
                "selected_test_acc": self.best["test_acc"],
                "selected_test_acc_prompt": self.best["test_acc_prompt"],
                "selected_test_acc_noprompt": self.best["test_acc_noprompt"]}
