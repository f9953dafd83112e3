"""Stage-2 loss terms of the BioVITA method, each small and pure (no Ray, no DeepSpeed): the
phase-2 ramps, the ATC gate, the guard term and the composed phase-2 loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    consecutive steps.
    """

    baseline: float
    alpha: float = 0.2
    off_ratio: float = 1.03
    on_ratio: float = 1.015
    patience: int = 20
    ema: float | None = None
    open: bool = True
    calm_steps: int = 0

    def __post_init__(self) -> None:
        if self.ema is None:
            self.ema = self.baseline

    def update(self, atc: float) -> bool:
        self.ema = self.alpha * atc + (1 - self.alpha) * self.ema
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
