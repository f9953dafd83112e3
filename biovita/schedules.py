"""Stage-2 schedule pieces of the BioVITA method, each small and pure (no Ray, no DeepSpeed).

The training loop composes them: loss weights and ramps, the ATC gate, the guard term, the
freeze plan, optimizer parameter groups and the logit-scale reset/freeze.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from biovita.config import Stage2Config


def linear_ramp(step: int, ramp_steps: int, maximum: float) -> float:
    """0 at step 0, `maximum` from `ramp_steps` on."""
    return maximum * min(1.0, max(0, step) / ramp_steps)


@dataclass
class BaselineMeter:
    """baseline_ATC: mean ATC over the last `n` batches before phase 2."""

    n: int = 20
    values: list[float] = field(default_factory=list)

    def add(self, atc: float) -> None:
        self.values.append(float(atc))
        self.values = self.values[-self.n:]

    @property
    def value(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


@dataclass
class ATCGate:
    """Switches AIC and ITC off while ATC drifts up.

    An EMA (alpha) of ATC; above `off_ratio * baseline` the gate closes; it opens again after
    the EMA stays <= `on_ratio * baseline` for `patience` consecutive steps.
    """

    baseline: float
    alpha: float = 0.2
    off_ratio: float = 1.03
    on_ratio: float = 1.015
    patience: int = 20
    ema: float | None = None
    open: bool = True
    calm_steps: int = 0

    def update(self, atc: float) -> bool:
        self.ema = atc if self.ema is None else self.alpha * atc + (1 - self.alpha) * self.ema
        if self.open:
            if self.ema > self.off_ratio * self.baseline:
                self.open, self.calm_steps = False, 0
        else:
            self.calm_steps = self.calm_steps + 1 if self.ema <= self.on_ratio * self.baseline else 0
            if self.calm_steps >= self.patience:
                self.open, self.calm_steps = True, 0
        return self.open

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "ATCGate":
        return cls(**d)


def guard(atc: torch.Tensor, baseline: float, margin: float = 1.03, weight: float = 2.0):
    """weight * relu(ATC - margin * baseline_ATC): keeps audio-text from degrading."""
    return weight * torch.relu(atc - margin * baseline)


@dataclass(frozen=True)
class Phase2Weights:
    lam_av: float
    lam_vt: float
    gate_open: bool


def phase2_weights(step: int, cfg: Stage2Config, gate_open: bool) -> Phase2Weights:
    lam_av = linear_ramp(step, cfg.lam_av_ramp_steps, cfg.lam_av_max)
    lam_vt = linear_ramp(step, cfg.lam_vt_ramp_steps, cfg.lam_vt_max)
    if not gate_open:
        lam_av = lam_vt = 0.0
    return Phase2Weights(lam_av, lam_vt, gate_open)


def phase2_loss(atc, aic, itc, baseline: float, weights: Phase2Weights, cfg: Stage2Config):
    """ATC + lam_av AIC + lam_vt ITC + guard."""
    return (atc + weights.lam_av * aic + weights.lam_vt * itc
            + guard(atc, baseline, cfg.guard_margin, cfg.guard_weight))


# ----------------------------------------------------------------------------- freeze plan

# Parameter groups of the model, by role.
GROUPS = ("image", "text", "clip_scale", "audio", "audio_upper", "adapter", "logit_scale")
STAGES = ("stage0", "stage1", "stage2.phase1", "stage2.phase2")


def trainable_groups(stage: str) -> set[str]:
    """Which groups train in a stage/phase ("stage1", "stage2.phase1", "stage2.phase2").

    Image tower: always frozen. Text: frozen in stage 1 and phase 1, trained in phase 2.
    Audio: whole tower in stage 1 and phase 1; in phase 2 only the upper layers, and those
    from `upper_audio_unfreeze_step` on (see `group_active`).
    """
    if stage == "stage0":  # the embedded run's image-text base model (stands in for BioCLIP 2)
        return {"image", "text", "clip_scale"}
    if stage in ("stage1", "stage2.phase1"):
        return {"audio", "audio_upper", "adapter", "logit_scale"}
    if stage == "stage2.phase2":
        return {"text", "audio_upper", "adapter", "logit_scale"}
    raise ValueError(f"unknown stage {stage!r}")


def group_active(group: str, stage: str, step: int, cfg: Stage2Config) -> bool:
    """Whether a trainable group is updated at `step` (delayed unfreezes of phase 2)."""
    if group not in trainable_groups(stage):
        return False
    if stage == "stage2.phase2":
        if group == "audio_upper":
            return step >= cfg.upper_audio_unfreeze_step
        if group == "logit_scale":
            return step >= cfg.logit_freeze_steps
    return True


def reset_logit_scale(param: torch.Tensor, temperature: float) -> None:
    with torch.no_grad():
        param.fill_(math.log(1.0 / temperature))


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or "ln_" in name


def named_groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Every parameter of the model, assigned to exactly one group of GROUPS."""
    upper = {id(p) for m in model.upper_audio_modules() for p in m.parameters()}
    image = {id(p) for p in model.image_parameters()}
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if name == "logit_scale":
            g = "logit_scale"
        elif name in ("clip.logit_scale", "clip.logit_bias"):
            g = "clip_scale"
        elif name.startswith("adapter."):
            g = "adapter"
        elif name.startswith("audio."):
            g = "audio_upper" if id(p) in upper else "audio"
        elif id(p) in image:
            g = "image"
        else:
            g = "text"
        out[g].append((name, p))
    return out


def group_hparams(group: str, stage: str, lr: float, wd: float, cfg: Stage2Config) -> tuple[float, float]:
    """(lr, weight decay) of a group in a stage; METHOD.md's phase-2 values for phase 2."""
    if stage == "stage2.phase2":
        return {
            "text": (cfg.text_lr, cfg.text_weight_decay),
            "audio_upper": (cfg.upper_audio_lr, cfg.upper_audio_weight_decay),
            "adapter": (lr, wd),
            "logit_scale": (lr, 0.0),
        }[group]
    return (lr, 0.0) if group in ("logit_scale", "clip_scale") else (lr, wd)


def param_groups(model, stage: str, lr: float, wd: float, cfg: Stage2Config) -> list[dict]:
    """Optimizer groups for a stage: sets requires_grad by the freeze plan and returns one
    group per (role, decay/no-decay) with per-group lr and weight decay; norms and biases get
    no decay. Each group carries `name`, `base_lr` and `role` for the schedules."""
    trainable = trainable_groups(stage)
    groups = []
    for role, params in named_groups(model).items():
        on = role in trainable
        for _, p in params:
            p.requires_grad_(on)
        if not on:
            continue
        g_lr, g_wd = group_hparams(role, stage, lr, wd, cfg)
        decay = [p for n, p in params if not _no_decay(n, p)]
        no_decay = [p for n, p in params if _no_decay(n, p)]
        for suffix, ps, w in (("decay", decay, g_wd), ("no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": g_lr, "weight_decay": w, "name": f"{role}.{suffix}",
                               "role": role, "base_lr": g_lr, "base_weight_decay": w})
    return groups


def apply_group_schedule(optimizer, stage: str, step: int, cfg: Stage2Config) -> None:
    """Zero lr/decay (and gradients) of groups whose delayed unfreeze has not come yet."""
    for g in optimizer.param_groups:
        active = group_active(g["role"], stage, step, cfg)
        g["lr"] = g["base_lr"] if active else 0.0
        g["weight_decay"] = g["base_weight_decay"] if active else 0.0

