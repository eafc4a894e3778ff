"""Contrastive losses: CLIP's symmetric InfoNCE, with negatives gathered across processes.

With ``W`` processes of ``B`` samples each, every process scores its ``B`` images against all ``W * B`` texts and
its ``B`` texts against all ``W * B`` images (open_clip's ``local_loss=True, gather_with_grad=True``). Gathering
keeps the gradient, so after DDP averages the processes' gradients they equal those of one process holding the
whole global batch (``tests/test_train_clip.py`` checks it on two gloo processes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature so that logits are at most 100x cosines


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the gradient of its own rows, summed over processes.

    ``torch.distributed.nn.functional.all_gather`` does the same but is deprecated as of torch 2.14; an all-reduce
    of the whole gradient works on every backend (gloo has no reduce-scatter) and these tensors are small.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process concatenated in rank order (``x`` itself with one process); gradients flow back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over this process's pairs, with every process's pairs as negatives.

    Args:
        image_features: ``[B, D]``, L2-normalised (open_clip's model output).
        text_features: ``[B, D]``, L2-normalised; row ``i`` is image ``i``'s caption.
        logit_scale: the scale, already exponentiated (``model.logit_scale.exp()``).

    Returns:
        The mean of the image-to-text and text-to-image cross-entropies, computed in float32.
    """
    image, text = image_features.float(), text_features.float()
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    rank = dist.get_rank() if all_image.shape[0] > image.shape[0] else 0
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the learned temperature where CLIP keeps it: ``0 <= logit_scale <= log(100)``, after each step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
