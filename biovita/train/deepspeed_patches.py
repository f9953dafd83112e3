"""Every change biovita makes to DeepSpeed's internals, in one place, for one DeepSpeed version.

DeepSpeed 0.19.8's ZeRO-1/2 optimizer computes the gradient norm with one kernel per
parameter, and reads the norm's validity back to the host every step (to skip a step whose
norm is not finite, in fp32, and when it clips). The patches keep its arithmetic but make the
norm multi-tensor work and the decision a device one: a step whose gradient norm is not
finite is applied with zero gradients instead of skipped (biovita trains in bf16 or fp32,
never with fp16's loss scaling, where skipping is how the scale adapts). A configuration the
patch does not cover (pipeline-replicated or model-parallel parameters, the infinity norm)
takes DeepSpeed's own path. `tests/test_deepspeed_patches.py` fails when
an upgrade changes the behaviour patched; importing this module on another DeepSpeed version
raises with what to do.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero import stage_1_and_2
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.utils import get_norm_dtype

DEEPSPEED_VERSION = "0.19.8"
if deepspeed.__version__ != DEEPSPEED_VERSION:
    raise ImportError(
        f"biovita's DeepSpeed patches (biovita/train/deepspeed_patches.py) were written for "
        f"DeepSpeed {DEEPSPEED_VERSION}; this environment has {deepspeed.__version__}. Install "
        f"deepspeed=={DEEPSPEED_VERSION} (the pin in pyproject.toml), or port the patches and "
        "their tests to the new version.")

_original_norm = DeepSpeedZeroOptimizer.get_grad_norm_direct
_original_clip = DeepSpeedZeroOptimizer.unscale_and_clip_grads


def _grad_norm_foreach(self, gradients, params, norm_type=2):
    """The L2 norm of this rank's gradient partition, summed over the data-parallel group:
    one `_foreach_norm` (in the same dtype as DeepSpeed's per-parameter norms) instead of a
    norm per parameter."""
    plain = all(not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated) for p in params)
    if float(norm_type) != 2.0 or not plain or (
            self.model_parallel_rank != 0 and not all(is_model_parallel_parameter(p) for p in params)):
        return _original_norm(self, gradients, params, norm_type)
    grads = [g.data.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=get_norm_dtype())
        total = torch.stack(norms).to(self.device).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    deepspeed.comm.all_reduce(total, op=deepspeed.comm.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=deepspeed.comm.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _clip_on_device(self, grad_groups_flat, total_norm):
    """Unscale and clip with the factor computed on the device, and zero the gradients of a
    step whose norm is not finite (DeepSpeed's -1 sentinel or inf/NaN): where DeepSpeed reads
    the norm's validity to the host first."""
    if not torch.is_tensor(total_norm):
        return _original_clip(self, grad_groups_flat, total_norm)
    invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
    scale = torch.full_like(total_norm, 1.0 / self.loss_scale)
    if self.clip_grad > 0.0:
        norm = torch.where(invalid, torch.ones_like(total_norm), total_norm)
        clip = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        scale = 1.0 / (clip * self.loss_scale)
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.copy_(torch.where(invalid, torch.zeros_like(g), g * scale))


def _never_skip(norm) -> bool:
    """The step's own validity check, decided on the device by `_clip_on_device` instead."""
    return False


def apply() -> None:
    """Install the patches (idempotent)."""
    DeepSpeedZeroOptimizer.get_grad_norm_direct = _grad_norm_foreach
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = _clip_on_device
    stage_1_and_2.is_invalid_grad_norm = _never_skip  # the name step() calls, in its module
