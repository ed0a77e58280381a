"""One trial on several processes: data-parallel training over a ``torch.distributed`` group.

A :class:`vpns_core.train.Trial` built inside an initialised process group of N > 1 ranks (Ray
Train's ``TorchTrainer`` sets one up, see ``sweeps/data_parallel.py``) trains data-parallel;
without one (N = 1) nothing here runs and the trial is exactly the single-process one.

What makes N ranks train like one process at the same global batch ``B``:

- **Sharding** (:class:`ShardedBatches`): every rank draws the same permutation as the single
  process's loader (same generator, same draws); global batch ``k`` is split into N equal,
  contiguous chunks of ``B / N`` and rank ``r`` trains on chunk ``r``. The random crop and flip
  are drawn for the whole global batch and each rank takes its rows, so the N ranks together see
  exactly the images, crops and flips the single process sees.
- **Gradients** (:meth:`DataParallel.average_gradients`): after every backward pass the gradients
  of every parameter the stage's optimiser holds (scores, weights, a new head, the prompt) are
  averaged over the ranks in one flattened all-reduce per bucket, before the optimiser step.
  torch's ``DistributedDataParallel`` wrapper would cover only one module's parameters, fixed
  when it is wrapped; a VPNs step also trains the prompt (outside the model), changes its
  trainable set per stage (scores, then weights) and takes two backward passes per iteration
  under the reference schedule. Averaging the optimiser's gradients covers all of them.
- **BatchNorm** (:func:`sync_batchnorm`): statistics over the global batch, as SyncBatchNorm:
  every BatchNorm layer normalises with the mean and variance of all ``B`` images of the step,
  not of its rank's ``B / N``. Then N ranks compute what one process computes at batch ``B`` —
  the authors' single-GPU batch of 256 on the paper preset — and give the same masks (tested);
  with per-rank statistics (DDP's default) 10% of the tiny task's mask entries differed after
  one epoch. The price is two small all-reduces per BatchNorm layer and step. On CUDA it is
  torch's ``SyncBatchNorm``; torch has no CPU kernels for it, so on a CPU the same statistics
  come from two differentiable all-reduces (:class:`GlobalBatchNorm`). Evaluation uses the
  running statistics (no collective); they are identical on every rank, and checked.
- **Identical replicas, checked** (:meth:`DataParallel.check_replicas`): after every epoch the
  ranks compare digests of their masks, parameters, buffers (thresholds, BatchNorm statistics),
  prompt and label mapping; any difference stops the trial with :class:`ReplicaDivergenceError`.
- **Label mapping**: each rank counts (prediction, label) pairs on its shard of the mapping
  images, the counts are summed, rank 0 computes the mapping once and broadcasts it.
- **Evaluation**: each rank evaluates its shard; correct counts, loss sums and image counts are
  summed, and the image count must equal the split's size (every image counted exactly once).
- **Writes**: only rank 0 writes checkpoints and the trial's files; every rank reads the same
  checkpoint to resume, with any number of ranks (nothing in a checkpoint depends on N).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

_BUCKET = 1 << 26  # values per all-reduce (256 MB of fp32): bounds the flattened copy's memory


class ReplicaDivergenceError(RuntimeError):
    """The ranks of a data-parallel trial no longer hold the same model (masks, weights, ...)."""


def unsupported_reason(cfg: "Config") -> str | None:
    """Why ``cfg``'s method cannot train data-parallel (None: it can)."""
    from .methods import METHODS
    method = METHODS.get(cfg.method)
    if cfg.method == "bip":
        return ("its lower-level weight step and implicit gradient (the square of the weight "
                "gradient) are not linear in the batch, so averaging per-rank gradients is not "
                "the global step")
    if method.structured:
        return "channel methods remove channels during the trial (not data-parallel yet)"
    return None


def current_collective() -> "SingleProcess | DataParallel":
    """The collective of this process: :class:`DataParallel` inside a process group of several
    ranks, else :class:`SingleProcess`."""
    return DataParallel.current() or SingleProcess()


def check_data_parallel(cfg: "Config", world: int) -> None:
    """``cfg`` can run on ``world`` ranks at its global ``batch_size``.

    Raises:
        ConfigError: naming the field (``method`` or ``batch_size``) and what is allowed.
    """
    if world <= 1:
        return
    why = unsupported_reason(cfg)
    if why is not None:
        raise ConfigError(f"method: '{cfg.method}' cannot run on {world} workers per trial: {why}; "
                          f"use 1 worker per trial for it")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not split into {world} equal per-worker "
                          f"batches; use a multiple of {world} (the global batch stays batch_size)")


class ShardedBatches:
    """A batch sampler: rank ``rank``'s part of each global batch of ``batch_size * world``
    positions of a split of ``n`` items.

    Shuffled, it draws ``torch.randperm(n, generator)`` exactly as the single-process loader's
    ``RandomSampler`` does, so global batch ``k`` holds the same items as the single process's
    batch ``k``; rank ``r`` takes its ``r``-th contiguous chunk. In order (evaluation), the chunks
    of the last, partial global batch may be smaller or empty (empty ones are skipped): every
    item goes to exactly one rank.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, *, shuffle: bool,
                 drop_last: bool, generator: torch.Generator | None = None) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        n, g = self.n, self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = self.generator
            if generator is None:  # as RandomSampler: its own generator, seeded from the global one
                generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        g = self.global_batch
        for start in range(0, len(self) * g, g):
            chunk = torch.tensor_split(order[start:start + g], self.world)[self.rank]
            if len(chunk):
                yield chunk.tolist()


class SingleProcess:
    """The collective of a trial on one process: every operation is the identity, so the loop,
    evaluation and label mapping call it unconditionally and hold no branch on the rank.
    :class:`DataParallel` is the same interface over N ranks."""

    rank = 0
    world = 1
    is_main = True

    def check(self, cfg: "Config", train_images: int) -> None:
        """Nothing to check on one process."""

    def device(self, device: torch.device) -> torch.device:
        return device

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def batch_sampler(self, n: int, batch_size: int, *, train: bool, drop_last: bool,
                      generator: torch.Generator | None) -> "ShardedBatches | None":
        """None: the loader batches the whole split itself."""
        return None

    def crop_draws(self, batch_size: int, rows: int) -> dict[str, int]:
        """Arguments of :func:`vpns_core.data.random_crop_flip` for this process's rows of a
        global batch: none (its batch is the global one)."""
        return {}

    def average_gradients(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> Tensor:
        """The loss every rank decides on: this process's."""
        return loss

    def totals(self, *values: Tensor | float, device: torch.device) -> tuple:
        """Sums over the ranks of ``values``: the values."""
        return values

    def label_mapping(self, preds: list[Tensor], targets: list[Tensor], num_source: int,
                      num_target: int, device: torch.device) -> Tensor:
        """FLM of the predictions and labels this process saw."""
        from .label_mapping import frequency_label_mapping
        return frequency_label_mapping(torch.cat(preds), torch.cat(targets), num_source, num_target)

    def start_stage(self, modules: tuple[nn.Module, ...], refresh, digests, where: str) -> None:
        """Nothing to align."""

    def check_replicas_of(self, digests, where: str) -> None:
        """Nothing to compare (``digests`` is not even called)."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel trial: rank ``rank`` of ``world`` (> 1); the
    same interface as :class:`SingleProcess`."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> "DataParallel | None":
        """The initialised default process group if it has more than one rank, else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        return cls(dist.get_rank(), world) if world > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """This rank's share of a global training batch (``check_data_parallel`` made it exact)."""
        return batch_size // self.world

    # --- the collective interface (see SingleProcess) ---------------------------------------

    def check(self, cfg: "Config", train_images: int) -> None:
        """``cfg`` can train on these ranks (method, batch split, at least one global batch)."""
        check_data_parallel(cfg, self.world)
        if train_images < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {train_images} "
                              f"training images; a trial on {self.world} workers needs at least "
                              f"one full global batch")

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU when the config names CUDA without an index."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def prepare(self, model: nn.Module) -> nn.Module:
        """BatchNorm statistics over the global batch (:func:`sync_batchnorm`)."""
        return sync_batchnorm(model)

    def batch_sampler(self, n: int, batch_size: int, *, train: bool, drop_last: bool,
                      generator: torch.Generator | None) -> "ShardedBatches":
        """This rank's part of every global batch of a split of ``n`` (:class:`ShardedBatches`)."""
        local = self.local_batch(batch_size) if train else batch_size
        return ShardedBatches(n, local, self.rank, self.world, shuffle=train, drop_last=drop_last,
                              generator=generator)

    def crop_draws(self, batch_size: int, rows: int) -> dict[str, int]:
        """Crops and flips drawn for the whole global batch; this rank takes its rows."""
        return {"draws": batch_size, "offset": self.rank * rows}

    def totals(self, *values: Tensor | float, device: torch.device) -> Tensor:
        """``values`` summed over the ranks (float64, one all-reduce)."""
        return self.sum_scalars(*values, device=device)

    def label_mapping(self, preds: list[Tensor], targets: list[Tensor], num_source: int,
                      num_target: int, device: torch.device) -> Tensor:
        """Each rank counted its shard of the mapping images; rank 0 maps the summed counts once
        and every rank takes its mapping."""
        from .label_mapping import greedy_mapping, label_counts
        empty = torch.zeros(0, dtype=torch.long, device=device)
        counts = label_counts(torch.cat(preds) if preds else empty, torch.cat(targets) if targets else empty,
                              num_source, num_target)
        counts = self.sum(counts.to(device)).cpu()
        mapping = greedy_mapping(counts).to(device) if self.is_main else \
            torch.empty(num_target, dtype=torch.long, device=device)
        self.broadcast_(mapping)
        return mapping

    def start_stage(self, modules: tuple[nn.Module, ...], refresh, digests, where: str) -> None:
        """Every rank starts a stage from rank 0's state (DDP does the same), checked."""
        self.broadcast_state(*modules)
        refresh()
        self.check_replicas(digests(), where)

    def check_replicas_of(self, digests, where: str) -> None:
        """:meth:`check_replicas` of ``digests()``: one model on every rank, checked, not assumed."""
        self.check_replicas(digests(), where)

    # --- collectives ------------------------------------------------------------------------

    def average_gradients(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> Tensor:
        """Average the ``.grad`` of every parameter of ``optimizer`` over the ranks, in place, and
        return the ranks' mean ``loss`` (carried in the same all-reduce; every rank then takes
        the same decision on a non-finite loss). A gradient that is None (a parameter unused by
        this pass) is None on every rank and stays None, as in a single process."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        loss = loss.detach().float().reshape(1)
        buckets: dict[tuple, list[Tensor]] = {}
        for grad in grads:
            buckets.setdefault((grad.device, grad.dtype), []).append(grad)
        key = (loss.device, loss.dtype)
        mean_loss = None
        for (_, dtype), members in buckets.items():
            for part in _split(members, _BUCKET):
                carry = key == (part[0].device, dtype) and mean_loss is None
                flat = torch.cat([t.reshape(-1) for t in part] + ([loss] if carry else []))
                dist.all_reduce(flat)
                flat.div_(self.world)
                if carry:
                    mean_loss, flat = flat[-1], flat[:-1]
                for t, value in zip(part, flat.split([t.numel() for t in part])):
                    t.copy_(value.view_as(t))
        if mean_loss is None:
            dist.all_reduce(loss)
            mean_loss = loss[0] / self.world
        return mean_loss

    def sum(self, values: Tensor) -> Tensor:
        """The elementwise sum of ``values`` over the ranks (a new tensor)."""
        out = values.detach().clone()
        dist.all_reduce(out)
        return out

    def sum_scalars(self, *values: Tensor | float, device: torch.device) -> Tensor:
        """``values`` (scalar tensors or numbers, e.g. a loss sum, a count of correct answers, a
        count of images) summed over the ranks in float64, in one all-reduce."""
        return self.sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]))

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Overwrite ``tensor`` with rank 0's, in place."""
        target = tensor.data.view(torch.uint8) if tensor.dtype == torch.bool else tensor.data
        dist.broadcast(target, src=0)
        return tensor

    def broadcast_state(self, *modules: nn.Module) -> None:
        """Overwrite the parameters and buffers of ``modules`` with rank 0's."""
        with torch.no_grad():
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    self.broadcast_(t)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def check_replicas(self, digests: dict[str, str], where: str) -> None:
        """Compare this rank's ``digests`` (see :func:`replica_digests`) with every rank's.

        Raises:
            ReplicaDivergenceError: some rank differs from rank 0, naming what and where.
        """
        every = self.gather(digests)
        wrong = {r: sorted(k for k in every[0] if d.get(k) != every[0][k])
                 for r, d in enumerate(every) if d != every[0]}
        if wrong:
            detail = "; ".join(f"rank {r}: {', '.join(keys)}" for r, keys in wrong.items())
            raise ReplicaDivergenceError(f"the {self.world} ranks of this trial diverged {where} "
                                         f"(different from rank 0 — {detail})")


def _split(tensors: list[Tensor], limit: int) -> Iterable[list[Tensor]]:
    """``tensors`` in consecutive groups of at most ``limit`` values (one tensor may exceed it)."""
    group: list[Tensor] = []
    size = 0
    for t in tensors:
        if group and size + t.numel() > limit:
            yield group
            group, size = [], 0
        group.append(t)
        size += t.numel()
    if group:
        yield group


def digest(tensors: Iterable[Tensor]) -> str:
    """A hash of the tensors' bytes (and shapes, dtypes), in order."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _AllReduce(torch.autograd.Function):
    """A differentiable sum over the ranks: every rank's output is the sum of all inputs, so the
    gradient of each input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also runs on a CPU: training statistics over all ranks' images.

    On CUDA (and in evaluation, or outside a process group of several ranks) it is torch's
    ``SyncBatchNorm``. On a CPU, where torch has no kernels for it, the batch mean and then the
    centred sum of squares are all-reduced (two passes, for the same accuracy as a single
    process's BatchNorm) through differentiable all-reduces, so the backward pass sums the
    ranks' gradients of the statistics as ``SyncBatchNorm``'s does.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.is_cuda or not self.training or not (dist.is_available() and dist.is_initialized())
                or dist.get_world_size() == 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() // channels)
        totals = _AllReduce.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduce.apply(centred.pow(2).sum(dims)) / n  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1)).clamp_min(0)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding the
    same parameters and buffers (so state dicts, checkpoints and exports are unchanged);
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which builds torch's class."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, bias=module.bias is not None)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, sync_batchnorm(child))
    return out
