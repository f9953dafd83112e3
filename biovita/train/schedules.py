"""Stage-2 loss terms of the BioVITA method, each small and pure (no Ray, no DeepSpeed): the
phase-2 ramps, the ATC gate, the guard term and the composed phase-2 loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from biovita.config import Stage2Config


def linear_ramp(step: int, ramp_steps: int, maximum: float) -> float:
    """0 at step 0, `maximum` from `ramp_steps` on."""
    return maximum * min(1.0, max(0, step) / ramp_steps)


@dataclass
class ATCGate:
    """Switches AIC and ITC off while ATC drifts up.

    An EMA (alpha) of ATC, started at the baseline; above `off_ratio * baseline` the gate
    closes; it opens again after the EMA stays <= `on_ratio * baseline` for `patience`
    consecutive steps. The state is kept as tensors on the training device (float64, as the
    host arithmetic it replaces): a step decides without a host sync. `state_dict` reads it
    (at a checkpoint).
    """

    baseline: float
    alpha: float = 0.2
    off_ratio: float = 1.03
    on_ratio: float = 1.015
    patience: int = 20
    ema: Any = None
    open: Any = True
    calm_steps: Any = 0
    device: Any = None

    def __post_init__(self) -> None:
        dev = self.device
        self.ema = _t(self.baseline if self.ema is None else self.ema, torch.float64, dev)
        self.open = _t(self.open, torch.bool, dev)
        self.calm_steps = _t(self.calm_steps, torch.int64, dev)

    def update(self, atc) -> torch.Tensor:
        """One step's ATC (mean over workers) in; whether the gate is open after it out."""
        atc = _t(atc, torch.float64, self.ema.device)
        self.ema = self.alpha * atc + (1 - self.alpha) * self.ema
        closes = self.open & (self.ema > self.off_ratio * self.baseline)
        calm = torch.where(self.ema <= self.on_ratio * self.baseline, self.calm_steps + 1,
                           torch.zeros_like(self.calm_steps))
        reopens = ~self.open & (calm >= self.patience)
        # an open gate has no calm streak; a closed one counts it until it reopens
        self.calm_steps = torch.where(self.open | reopens, torch.zeros_like(calm), calm)
        self.open = torch.where(self.open, ~closes, reopens)
        return self.open

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "alpha": self.alpha, "off_ratio": self.off_ratio,
                "on_ratio": self.on_ratio, "patience": self.patience, "ema": float(self.ema),
                "open": bool(self.open), "calm_steps": int(self.calm_steps)}

    @classmethod
    def from_state(cls, d: dict, device=None) -> "ATCGate":
        return cls(**d, device=device)


def _t(x, dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device or x.device, dtype)
    return torch.tensor(x, dtype=dtype, device=device)


def guard(atc: torch.Tensor, baseline: float, margin: float = 1.03, weight: float = 2.0):
    """weight * relu(ATC - margin * baseline_ATC): keeps audio-text from degrading."""
    return weight * torch.relu(atc - margin * baseline)


@dataclass(frozen=True)
class Phase2Weights:
    lam_av: Any  # float, or a tensor when the gate is one
    lam_vt: Any
    gate_open: Any


def phase2_weights(step: int, cfg: Stage2Config, gate_open) -> Phase2Weights:
    """The ramps at `step`, switched off while the gate (a bool or a device tensor) is closed."""
    lam_av = linear_ramp(step, cfg.lam_av_ramp_steps, cfg.lam_av_max) * gate_open
    lam_vt = linear_ramp(step, cfg.lam_vt_ramp_steps, cfg.lam_vt_max) * gate_open
    return Phase2Weights(lam_av, lam_vt, gate_open)


def phase2_loss(atc, aic, itc, baseline: float, weights: Phase2Weights, cfg: Stage2Config):
    """ATC + lam_av AIC + lam_vt ITC + guard."""
    return (atc + weights.lam_av * aic + weights.lam_vt * itc
            + guard(atc, baseline, cfg.guard_margin, cfg.guard_weight))
