"""Symmetric InfoNCE with negatives from every worker (open_clip's local-loss pattern).

Each worker scores its B local samples against the gathered B*W samples of the other modality
(logits B x B*W, labels offset by B*rank), so memory is O(B^2 W), never O((B W)^2). The gather
keeps the gradient of every shard (torch.distributed.nn.all_gather), so with the usual
gradient averaging of DDP/DeepSpeed the gradients equal those of one process holding the whole
global batch (tests/test_losses.py checks this with two gloo processes).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOGIT_SCALE_MIN = math.log(1 / 100)
LOGIT_SCALE_MAX = math.log(100)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(values: list[float]) -> list[float]:
    """Mean over workers of host values (a host read: for once-per-stage decisions such as the
    gate's baseline, never inside a step)."""
    t = torch.tensor(values, dtype=torch.float64)
    _, ws = dist_info()
    if ws > 1:
        dist.all_reduce(t)
        t /= ws
    return t.tolist()


def all_min(value: int) -> int:
    """Minimum over workers (how many batches every worker has); a host read, like `all_mean`."""
    t = torch.tensor([value], dtype=torch.int64)
    _, ws = dist_info()
    if ws > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the workers, left on its device (one collective, no host read)."""
    _, ws = dist_info()
    if ws == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / ws


def gather_with_grad(x: torch.Tensor, world_size: int | None = None) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to every shard."""
    _, ws = dist_info()
    if (world_size or ws) == 1:
        return x
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


def contrastive_logits(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-vs-global logits: (B x B*W) for a->b and for b->a."""
    return _logits(a, b, gather_with_grad(a), gather_with_grad(b), logit_scale)


def _logits(a, b, a_all, b_all, logit_scale):
    return logit_scale * a @ b_all.T, logit_scale * b @ a_all.T


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between two batches of L2-normalised embeddings (row i <-> row i).

    As the authors compute it: in float32 whatever the towers ran in, and a logit matrix that
    is not finite (on any worker) makes the loss 0 for the step, with zero gradients. Decided
    on the device: every worker holds the same gathered features and scale, from which
    the logits' finiteness follows, so every worker decides alike without a collective."""
    a, b, scale = a.float(), b.float(), logit_scale.float()
    rank, _ = dist_info()
    a_all, b_all = gather_with_grad(a), gather_with_grad(b)
    finite = (torch.isfinite(a_all).all() & torch.isfinite(b_all).all()
              & torch.isfinite(scale).all())
    # computed on finite stand-ins, so that a masked step's gradients are zeros, not NaN
    a, b, a_all, b_all = (torch.nan_to_num(x) for x in (a, b, a_all, b_all))
    logits_ab, logits_ba = _logits(a, b, a_all, b_all, torch.nan_to_num(scale, posinf=1.0))
    labels = torch.arange(a.shape[0], device=a.device) + a.shape[0] * rank
    loss = 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
    return torch.where(finite, loss, torch.zeros_like(loss))


def atc(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Audio-text contrastive loss."""
    return contrastive_loss(audio, text, scale)


def aic(audio: torch.Tensor, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Audio-image contrastive loss."""
    return contrastive_loss(audio, image, scale)


def itc(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss."""
    return contrastive_loss(image, text, scale)


def batch_top1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """In-batch a->b retrieval Top-1 (the cheap retrieval metric of a training step), on the
    device."""
    with torch.no_grad():
        return (a @ b.T).argmax(1).eq(torch.arange(len(a), device=a.device)).float().mean()


@torch.no_grad()
def clamp_logit_scale(param: torch.Tensor) -> None:
    param.clamp_(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX)


def accumulate_contrastive(
    encoders: dict[str, Callable[[object], torch.Tensor]],
    micro_batches: Sequence[dict[str, object]],
    loss_fn: Callable[[dict[str, torch.Tensor], bool], torch.Tensor],
    backward: Callable[[torch.Tensor, bool], None] = lambda loss, last: loss.backward(),
) -> torch.Tensor:
    """Contrastive gradient accumulation (open_clip `--accum-freq`).

    1) embed every micro-batch without gradient and cache the features; 2) for each micro-batch
    j, re-embed it with gradient, splice it into the cached features and back-propagate the loss
    of the whole (k*B) batch. Summed over j this is exactly the big-batch gradient, with k*B
    negatives. `loss_fn(features, first)` gets `first=True` only for j=0, so parameters used
    directly by the loss (the logit scale) receive their gradient once, not k times.
    Exact when the towers compute the same features twice; with dropout in training mode
    (HTS-AT's MLPs) the two passes draw different masks, as in open_clip.
    Returns the big-batch loss (detached).
    """
    with torch.no_grad():
        cache = {m: [enc(mb[m]) for mb in micro_batches] for m, enc in encoders.items()}
    total = None
    for j, mb in enumerate(micro_batches):
        feats = {}
        for m, enc in encoders.items():
            parts = list(cache[m])
            parts[j] = enc(mb[m])
            feats[m] = torch.cat(parts, dim=0)
        loss = loss_fn(feats, j == 0)
        backward(loss, j == len(micro_batches) - 1)  # the last one ends the step's accumulation
        total = loss.detach()
    return total
