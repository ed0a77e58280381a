"""Visual prompts: resize-and-pad an image, add a learnable perturbation, clamp, normalise.

The prompt lives in pixel space ([0, 1]); normalisation with the source model's mean/std
happens after it (VPNs, Sec. 3, "data-model co-design"). Shapes: input ``[B, 3, in, in]``
in [0, 1], output ``[B, 3, out, out]`` normalised.

Variants (MISSION.md):
- ``pad``: the four border strips of width ``pad_size`` are tunable; ``delta`` is added
  directly. Tunable count ``3 * (out**2 - (out - 2 * pad)**2)``.
- ``fix``: a ``prompt_size`` square in the top-left corner; ``sigmoid(delta)`` is added.
- ``random``: a ``prompt_size`` square at a random location, redrawn every forward pass on
  the input's device; ``sigmoid(delta)`` is added.
- ``none``: only resize-and-pad and normalisation (the HYDRA / no-VP input pipeline).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

PROMPTS: Registry[type["Prompt"]] = Registry("prompt")


def equal_param_prompt_size(output_size: int, pad_size: int) -> int:
    """Side of a square prompt with (about) as many tunable pixels as a pad prompt.

    224 px with pad 16 gives 115, the reference code's ``mask_size``.
    """
    return max(1, round(math.sqrt(output_size**2 - (output_size - 2 * pad_size) ** 2)))


class Prompt(nn.Module):
    """Base class: centre zero-padding from ``input_size`` to ``output_size`` and normalisation."""

    def __init__(self, input_size: int, output_size: int, mean, std, plain_frame: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        #: whether an unprompted pass keeps the zero frame (``output_size``) or sees the bare
        #: ``input_size`` image, as the authors' unprompted steps and evaluation do
        self.plain_frame = plain_frame
        #: hand the network NHWC ("channels last") tensors: a layout, not a value change
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        lo = (output_size - input_size) // 2
        self._pad = (lo, output_size - input_size - lo, lo, output_size - input_size - lo)

    def resize(self, x: Tensor) -> Tensor:
        """``x`` resized to ``input_size`` if it is not already."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def place(self, x: Tensor) -> Tensor:
        """Resize ``x`` to ``input_size`` if needed and zero-pad it centrally to ``output_size``."""
        x = self.resize(x)
        return F.pad(x, self._pad) if self.output_size != self.input_size else x

    def perturbation(self, x: Tensor) -> Tensor | None:
        """The additive prompt ``delta * M`` broadcastable to ``[B, 3, out, out]``; None for none."""
        return None

    def forward(self, x: Tensor, enabled: bool = True) -> Tensor:
        """Prompt and normalise ``x``; ``enabled=False`` evaluates without the prompt: in the
        zero frame (``plain_frame``, the paper's equations) or the bare resized image (the
        authors' code); a prompt type without a perturbation is always a plain pass."""
        prompted = enabled and type(self).perturbation is not Prompt.perturbation
        if not prompted and not self.plain_frame:
            return self._layout((self.resize(x) - self.mean) / self.std)
        x = self.place(x)
        delta = self.perturbation(x) if prompted else None
        if delta is not None:
            # Clamp to [0, 1] with a straight-through gradient: torch's clamp has zero gradient
            # at the bounds, so a zero-initialised prompt over zero padding would never move.
            x = x + delta
            x = x + (x.clamp(0.0, 1.0) - x).detach()
        out = self._layout((x - self.mean) / self.std)
        if delta is not None and out.requires_grad:
            self._last_output = weakref.ref(out)
        return out

    def _layout(self, out: Tensor) -> Tensor:
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def share_input_gradient(self, layer: nn.Module) -> bool:
        """Let ``layer`` (the model's first convolution) hand this prompt's output a gradient
        summed over the batch instead of one per image.

        The prompt is the same for every image of a batch and the images themselves need no
        gradient, so the prompt's gradient only needs ``sum_b dL/dz_b``; for a convolution,
        ``sum_b conv^T(g_b) = conv^T(sum_b g_b)``: one image's worth of input gradient instead
        of a batch's (the input gradient of ResNet-18's first convolution was 10% of a 224 px
        training step on a CPU; benchmarks/masked_step.py). Exact up to float rounding. It acts
        only when the layer's input is this prompt's output, with a gradient; anything else
        (another input, evaluation, an unprompted pass) takes the usual path. Returns whether
        ``layer`` qualifies: an ``nn.Conv2d`` (subclasses such as TensorFlow-style "same"
        padding included: a convolution is affine in its input).
        """
        if not isinstance(layer, nn.Conv2d):
            return False
        ref = weakref.ref(self)

        def pre_hook(module: nn.Module, args):
            prompt = ref()
            last = prompt.__dict__.get("_last_output") if prompt is not None else None
            inp = args[0] if args else None
            if (last is not None and inp is last() and isinstance(inp, Tensor) and inp.requires_grad
                    and torch.is_grad_enabled()):
                module.__dict__["_vpns_shared_input"] = inp
                return (inp.detach(), *args[1:])
            return None

        def post_hook(module: nn.Module, _args, output: Tensor):
            inp = module.__dict__.pop("_vpns_shared_input", None)
            if inp is None:
                return None
            return _BatchSummedInputGrad.apply(output, inp, module)

        self._share_handles = (layer.register_forward_pre_hook(pre_hook),
                               layer.register_forward_hook(post_hook))
        return True

    @property
    def tunable_count(self) -> int:
        """Number of prompt values a gradient step can change."""
        return 0

    def is_identity(self) -> bool:
        """Whether ``forward(x)`` equals ``forward(x, enabled=False)`` bit for bit for images in
        [0, 1]: true when there is no perturbation (overridden where the perturbation can be
        zero)."""
        return type(self).perturbation is Prompt.perturbation

    def _same_frame(self) -> bool:
        """Whether prompted and plain passes place the image in the same frame."""
        return self.plain_frame or self.input_size == self.output_size

    def image(self) -> Tensor:
        """The prompt as a ``[3, out, out]`` picture in [0, 1] over a grey canvas, for logging."""
        canvas = torch.full((1, 3, self.output_size, self.output_size), 0.5,
                            device=self.mean.device)
        with torch.no_grad():
            delta = self.perturbation(canvas)
        return canvas[0] if delta is None else (canvas + delta).clamp(0, 1)[0]


class _BatchSummedInputGrad(torch.autograd.Function):
    """Identity on a layer's output (computed from the detached input); the backward pass gives
    the input ``J^T(sum_b g_b) / B`` for every image, ``J`` the layer's input Jacobian (the same
    for every input: the layer is affine in it), taken through the layer's own ``forward`` on one
    zero image. Its sum over the batch, all a batch-shared prompt receives, equals the exact
    ``sum_b J^T g_b``."""

    @staticmethod
    def forward(ctx, output: Tensor, inp: Tensor, layer: nn.Module):
        ctx.shape, ctx.dtype, ctx.layer = inp.shape, inp.dtype, layer
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        weight = layer.weight
        probe = torch.zeros((1, *ctx.shape[1:]), dtype=weight.dtype, device=grad.device, requires_grad=True)
        with torch.enable_grad():
            out = type(layer).forward(layer, probe)  # no hooks: the layer's own computation
            # summed over the batch in fp32 (an fp16 gradient summed over 256 images overflows
            # or loses the small terms)
            summed = grad.sum(0, keepdim=True, dtype=torch.float32)
            (grad_in,) = torch.autograd.grad(out, probe, summed.to(out.dtype))
        grad_in = (grad_in / ctx.shape[0]).to(ctx.dtype).expand(ctx.shape)
        return grad, grad_in, None


@PROMPTS.register("none")
class NoPrompt(Prompt):
    pass


@PROMPTS.register("pad")
class PadPrompt(Prompt):
    """Tunable border of width ``pad_size`` over a full-size ``delta`` (zero init)."""

    def __init__(self, input_size: int, output_size: int, mean, std, pad_size: int,
                 plain_frame: bool = True) -> None:
        super().__init__(input_size, output_size, mean, std, plain_frame)
        self.pad_size = pad_size
        mask = torch.ones(1, 1, output_size, output_size)
        inner = output_size - 2 * pad_size
        if inner > 0:
            mask[..., pad_size:pad_size + inner, pad_size:pad_size + inner] = 0
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros(1, 3, output_size, output_size))

    def perturbation(self, x: Tensor) -> Tensor:
        return self.delta * self.mask

    def is_identity(self) -> bool:
        """An all-zero border adds nothing (its zero init, kept by every method without VP),
        unless the plain pass drops the frame the prompted pass has."""
        return self._same_frame() and not bool((self.delta * self.mask).any())

    @property
    def tunable_count(self) -> int:
        return 3 * int(self.mask.sum().item())


class _PatchPrompt(Prompt):
    """A ``prompt_size`` square patch ``sigmoid(delta)`` placed on an ``out x out`` canvas."""

    def __init__(self, input_size: int, output_size: int, mean, std, prompt_size: int,
                 plain_frame: bool = True) -> None:
        super().__init__(input_size, output_size, mean, std, plain_frame)
        self.prompt_size = prompt_size
        self.delta = nn.Parameter(torch.zeros(1, 3, prompt_size, prompt_size))

    def offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column of the patch's top-left corner, as 0-d tensors on ``x.device``."""
        raise NotImplementedError

    def perturbation(self, x: Tensor) -> Tensor:
        # Build the canvas by gathering from the patch with index tensors, so a random
        # location needs no host synchronisation on CUDA.
        out, size = self.output_size, self.prompt_size
        row0, col0 = self.offsets(x)
        grid = torch.arange(out, device=x.device)
        rows, cols = grid - row0, grid - col0
        inside = ((rows >= 0) & (rows < size))[:, None] & ((cols >= 0) & (cols < size))[None, :]
        patch = torch.sigmoid(self.delta)
        canvas = patch[:, :, rows.clamp(0, size - 1)][:, :, :, cols.clamp(0, size - 1)]
        return canvas * inside.to(patch.dtype)

    @property
    def tunable_count(self) -> int:
        return self.delta.numel()


@PROMPTS.register("fix")
class FixPrompt(_PatchPrompt):
    def offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        zero = torch.zeros((), dtype=torch.long, device=x.device)
        return zero, zero


@PROMPTS.register("random")
class RandomPrompt(_PatchPrompt):
    def offsets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        corner = torch.randint(0, self.output_size - self.prompt_size + 1, (2,), device=x.device)
        return corner[0], corner[1]


def build_prompt(kind: str, *, input_size: int, output_size: int, mean, std,
                 pad_size: int = 0, prompt_size: int | None = None, plain_frame: bool = True) -> Prompt:
    """Create a prompt by name; ``prompt_size`` None means equal tunable count to ``pad_size``;
    ``plain_frame=False`` feeds unprompted passes the bare ``input_size`` image."""
    cls = PROMPTS.get(kind, "prompt")
    if cls is PadPrompt:
        return cls(input_size, output_size, mean, std, pad_size=pad_size, plain_frame=plain_frame)
    if issubclass(cls, _PatchPrompt):
        size = prompt_size or equal_param_prompt_size(output_size, pad_size)
        return cls(input_size, output_size, mean, std, prompt_size=size, plain_frame=plain_frame)
    return cls(input_size, output_size, mean, std, plain_frame=plain_frame)
