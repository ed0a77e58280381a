"""What a trial reads: batches of its splits on its device (:class:`Feed`).

Training batches are shuffled by a generator the loop seeds per epoch (exact resume); evaluation
batches come in order. Splits that fit are held on the device (``cfg.data_on_device``); in a
data-parallel trial each rank reads its shard of every batch (the collective's sampler).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .config import Config
from .data import DataSplits, DeviceBatches, device_copy_bytes, hold_on_device, stratified_sample

_DEVICE_COPY_BYTES = 2 * 2**30  # data_on_device=None: splits up to this size (stored) go to the GPU
MAX_AUTO_WORKERS = 8


def trial_cpus(cfg: Config) -> int:
    """CPUs this trial may use: its torch threads (a sweep sets one per reserved CPU), else the
    CPUs this process may run on."""
    if cfg.num_threads:
        return cfg.num_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SeededBatches:
    """The batch sampler of a training loader kept across epochs: each epoch it draws exactly
    what a :class:`~torch.utils.data.DataLoader` built that epoch with the epoch's generator
    draws (its workers' base seed, then the permutation; or a data-parallel rank's
    :class:`~vpns_core.distributed.ShardedBatches`), so keeping the loader and its worker
    processes changes no batch (tests/test_pipeline.py)."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, sharded=None) -> None:
        self.n, self.batch_size, self.drop_last, self.sharded = n, batch_size, drop_last, sharded
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        if self.sharded is not None:
            return len(self.sharded)
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        generator = self.generator
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # a new loader's base seed
        if self.sharded is not None:
            self.sharded.generator = generator
            yield from self.sharded
            return
        order = torch.randperm(self.n, generator=generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]


def rng_untouched(device: torch.device):
    """A context in which the global RNGs are saved and restored: evaluation passes must not
    change training. Without it every evaluation loader draws its base seed from the global
    generator (as does a random prompt's location), so a method that evaluates one more pass
    (VPNs with and without its prompt, HYDRA once) trained later epochs with other dropout
    masks: VPNs with an immovable prompt differed from HYDRA by 6 points at one seed."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class Feed:
    """Loaders of ``data``'s splits for ``cfg`` on ``device``, sharded by ``collective``."""

    def __init__(self, cfg: Config, data: DataSplits, device: torch.device, collective: Any) -> None:
        self.cfg, self.data, self.device, self.collective = cfg, data, device, collective
        self._loaders: dict[tuple[int, bool, bool], DataLoader] = {}  # loaders kept with their workers
        self._device_splits: dict[int, tuple[Tensor, Tensor]] = {}  # splits held on the device

    def on_device(self, dataset) -> bool:
        """Whether ``dataset`` is served from a copy on the device (``cfg.data_on_device``)."""
        size = device_copy_bytes(dataset)
        if size is None:
            return False
        if self.cfg.data_on_device is not None:
            return self.cfg.data_on_device
        return self.device.type == "cuda" and size <= _DEVICE_COPY_BYTES

    def loader(self, dataset, train: bool, generator: torch.Generator | None = None,
               shard: bool = True) -> DataLoader:
        """Batches of uint8 images and labels of ``dataset`` (a split of ``data``): shuffled by
        ``generator`` to train, in order to evaluate; held on the device where it fits.

        In a data-parallel trial (``shard``), this rank's shard: its ``batch_size / N`` part of
        every global training batch, or its part of every ``eval_batch_size * N`` images in
        order (:class:`~vpns_core.distributed.ShardedBatches`). ``shard=False``: the whole split
        on every rank (the same batches everywhere, e.g. a method's scoring batches)."""
        cfg = self.cfg
        batch_size = cfg.batch_size if train else cfg.eval_batch_size
        drop_last = train and len(dataset) >= cfg.batch_size
        sampler = self.collective.batch_sampler(len(dataset), batch_size, train=train, drop_last=drop_last,
                                                generator=generator) if shard else None
        if self.on_device(dataset):
            if id(dataset) not in self._device_splits:
                self._device_splits[id(dataset)] = hold_on_device(dataset, self.device)
            return DeviceBatches(self._device_splits[id(dataset)], dataset.size, batch_size,
                                 shuffle=train, drop_last=drop_last, generator=generator,
                                 batch_sampler=sampler)
        workers = self.workers(dataset)
        # Loaders over the trial's splits keep their worker processes (starting them costs time
        # each pass; benchmarks/input_pipeline.py): evaluation loaders read in a fixed order;
        # training loaders are reshuffled each epoch from the loop's seeded generator
        # (SeededBatches), so a resumed trial still draws the batches it would have drawn.
        persistent = workers > 0 and any(dataset is d for d in (self.data.train, self.data.train_eval,
                                                                self.data.val, self.data.test))
        key = (id(dataset), sampler is not None, train)
        if persistent and key in self._loaders:
            loader = self._loaders[key]
            if train:
                loader.batch_sampler.generator = generator
            return loader
        if persistent and train:
            batching = dict(batch_sampler=SeededBatches(len(dataset), batch_size, drop_last, sampler))
            batching["batch_sampler"].generator = generator
            own = torch.Generator().manual_seed(0)  # the workers' seeds: never the global RNG
        else:
            batching = dict(batch_sampler=sampler) if sampler is not None else \
                dict(batch_size=batch_size, shuffle=train, drop_last=drop_last)
            own = generator
        loader = DataLoader(dataset, **batching, generator=own, num_workers=workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=persistent)
        if persistent:
            self._loaders[key] = loader
        return loader

    def workers(self, dataset) -> int:
        """Loader worker processes for ``dataset``: ``cfg.num_workers``, or (None) none for a
        split held in memory (nothing to decode) and, for one read from files, what the trial's
        CPUs allow beside the training process (at most 8)."""
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        if device_copy_bytes(dataset) is not None:
            return 0
        return max(0, min(MAX_AUTO_WORKERS, trial_cpus(self.cfg) - 1))

    def to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A batch from :meth:`loader` on the device, images as floats in [0, 1]."""
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return x, y.to(self.device, non_blocking=True)

    def first_images(self, n: int) -> Tensor:
        """The first ``n`` training images in evaluation order (test-time transform) on the
        device, e.g. to check that a change of the model kept its outputs; no effect on training."""
        with rng_untouched(self.device):
            x, _ = next(iter(self.loader(self.data.train_eval, train=False, shard=False)))
        return self.to_device(x, torch.zeros(0, dtype=torch.long))[0][:n]

    def scoring_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``n`` shuffled training batches (test-time transform) on the device, drawn
        from ``cfg.seed`` alone: the data of SNIP/GraSP-style scores."""
        batches: list[tuple[Tensor, Tensor]] = []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for x, y in self.loader(self.data.train_eval, train=True, generator=gen, shard=False):
            if len(batches) == n:
                break
            batches.append(self.to_device(x, y))
        return batches

    def label_mapping_indices(self) -> np.ndarray:
        """Positions in the training split whose images set the label mapping: all of them
        (``label_mapping_samples=None``, as the authors' code), or that many drawn from
        ``data_seed`` across the whole split, stratified by class. Never the first N: a dataset
        stored class by class would map most classes from no image at all. Fixed by the config,
        so a resumed trial maps from the same images."""
        data, n = self.data.train_eval, self.cfg.label_mapping_samples
        if n is None or n >= len(data):
            return np.arange(len(data))
        rng = np.random.default_rng([self.cfg.data_seed, 3])
        labels = getattr(data, "labels", None)
        if labels is None:  # labels unknown without decoding: a plain seeded draw
            return np.sort(rng.permutation(len(data))[:n])
        return stratified_sample(labels, n, rng)

    def steps_per_epoch(self) -> int:
        n = len(self.data.train) // self.cfg.batch_size or 1
        return min(n, self.cfg.max_steps_per_epoch or n)
