"""The training stages of the BioVITA method, declared once.

A `Stage` says what it reads from the store and how its epochs are planned, which batch
columns feed which encoder, which parameter roles it trains (and from which step), its loss,
its optimizer settings and what happens when it starts. The driver, the worker loop, the job
and the sweep only ask a Stage. Changing phase 2 means editing `PHASE2` below and the loss
terms it names (`biovita.train.schedules`); adding a stage means declaring one here and
adding it to `STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from biovita.config import Config, Stage2Config, StageConfig
from biovita.data import sampling
from biovita.train import losses, schedules


@dataclass
class LossInputs:
    """What a stage's loss sees for one optimizer step (or one micro-batch of it)."""

    feats: dict[str, torch.Tensor]  # L2-normalised embeddings by modality
    scale: torch.Tensor  # exp(logit scale); detached for every micro-batch but the first
    first: bool  # the first micro-batch of the step (updates step-level state once)
    step: int
    s2: Stage2Config
    gate: schedules.ATCGate


LossFn = Callable[[LossInputs], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class PlanInputs:
    """The store's training rows a stage plans from (metadata only)."""

    ids: list[str]
    species: list[int]
    image_ids: list[str] = field(default_factory=list)  # stage 2: the embedded images
    image_species: list[int] = field(default_factory=list)


def _stage0_loss(x: LossInputs):
    f = x.feats
    loss = losses.itc(f["image"], f["text"], x.scale)
    return loss, {"loss": loss.item(), "itc": loss.item(),
                  "top1_batch": losses.batch_top1(f["image"], f["text"])}


def _stage1_loss(x: LossInputs):
    f = x.feats
    atc = losses.atc(f["audio"], f["text"], x.scale)
    return atc, {"loss": atc.item(), "atc": atc.item(),
                 "top1_batch": losses.batch_top1(f["audio"], f["text"])}


def _phase1_loss(x: LossInputs):
    f = x.feats
    atc, aic = losses.atc(f["audio"], f["text"], x.scale), losses.aic(f["audio"], f["image"], x.scale)
    loss = x.s2.w_atc * atc + x.s2.w_aic * aic
    return loss, {"loss": loss.item(), "atc": atc.item(), "aic": aic.item(),
                  "top1_batch": losses.batch_top1(f["audio"], f["text"])}


def _phase2_loss(x: LossInputs):
    f, s2 = x.feats, x.s2
    atc = losses.atc(f["audio"], f["text"], x.scale)
    aic = losses.aic(f["audio"], f["image"], x.scale)
    itc = losses.itc(f["image"], f["text"], x.scale)
    atc_mean, = losses.all_mean([atc.item()])
    if x.first:
        x.gate.update(atc_mean)
    w = schedules.phase2_weights(x.step, s2, x.gate.open)
    loss = schedules.phase2_loss(atc, aic, itc, x.gate.baseline, w, s2)
    guard = schedules.guard(atc.detach(), x.gate.baseline, s2.guard_margin, s2.guard_weight)
    return loss, {"loss": loss.item(), "atc": atc.item(), "aic": aic.item(), "itc": itc.item(),
                  "top1_batch": losses.batch_top1(f["audio"], f["text"]),
                  "phase2/gate_open": float(w.gate_open), "phase2/lam_av": w.lam_av,
                  "phase2/lam_vt": w.lam_vt, "phase2/guard": float(guard),
                  "phase2/atc_ema": x.gate.ema or 0.0}


def _same_hparams(role: str, st: StageConfig, s2: Stage2Config) -> tuple[float, float]:
    """The stage's lr and weight decay for every role; scales never decay."""
    return (st.lr, 0.0) if role in ("logit_scale", "clip_scale") else (st.lr, st.weight_decay)


def _phase2_hparams(role: str, st: StageConfig, s2: Stage2Config) -> tuple[float, float]:
    """METHOD.md's phase-2 values: the text tower and the upper audio layers have their own."""
    return {
        "text": (s2.text_lr, s2.text_weight_decay),
        "audio_upper": (s2.upper_audio_lr, s2.upper_audio_weight_decay),
        "adapter": (st.lr, st.weight_decay),
        "logit_scale": (st.lr, 0.0),
    }[role]


def _balanced(cap: Callable[[Config], int]):
    def plans(cfg: Config, data: PlanInputs, epochs: range) -> list[dict]:
        return [sampling.balanced_counts(data.ids, data.species, cap(cfg), cfg.data.per_species_min,
                                         cfg.train.seed, e) for e in epochs]
    return plans


def _triplets(cfg: Config, data: PlanInputs, epochs: range) -> list[dict]:
    """Drawn once for stage 2 (both phases); each epoch reorders them."""
    plan = sampling.triplet_plan(data.ids, data.species, data.image_ids, data.image_species,
                                 cfg.data.triplets_per_species, cfg.train.seed)
    return [plan for _ in epochs]


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    table: str  # the store table the stage streams: audio | image
    inputs: Mapping[str, str]  # modality -> batch column fed to its encoder
    trainable: frozenset[str]  # parameter roles trained (biovita.train.freeze.ROLES)
    settings: Callable[[Config], StageConfig]  # epochs, batch size, lr, weight decay
    plans: Callable[[Config, PlanInputs, range], list[dict]]  # one plan per epoch
    loss: LossFn
    prompts: str = "random"  # a template drawn per sample | "levels": also bare genus/family
    #                          names | "fixed": one prompt per species
    scale: str = "model"  # the logit scale of the loss: BioVITA's ("model") or open_clip's ("clip")
    hparams: Callable[[str, StageConfig, Stage2Config], tuple[float, float]] = _same_hparams
    delayed: Mapping[str, str] = field(default_factory=dict)  # role -> Stage2Config step field
    reset_logit_scale: bool = False  # to log(1 / stage2.logit_reset_temperature) at the start
    measures_baseline: bool = False  # the gate's ATC baseline, measured before the first update
    image_embeddings: bool = False  # pairs clips with the frozen image tower's embeddings
    epoch_offset: Callable[[Config], int] = lambda cfg: 0  # seeds continue from an earlier stage
    betas: Callable[[Config], tuple[float, float]] = lambda cfg: (0.9, 0.999)  # AdamW's default
    grad_clip: Callable[[Config], float] = lambda cfg: 0.0  # gradient-norm clipping; 0: none
    per_step: tuple[str, ...] = ()  # logged scalars kept for every step (others: window means)

    def role_active(self, role: str, step: int, s2: Stage2Config) -> bool:
        """Whether a role is updated at `step` (its delayed start, if any, has come)."""
        if role not in self.trainable:
            return False
        return step >= getattr(s2, self.delayed[role]) if role in self.delayed else True


STAGE0 = Stage(
    name="stage0", description="image-text base model (embedded run only; BioCLIP 2 otherwise)",
    table="image", inputs={"image": "pixels", "text": "text"},
    trainable=frozenset({"image", "text", "clip_scale"}), settings=lambda cfg: cfg.stage0,
    plans=_balanced(lambda cfg: cfg.stage0.images_per_species), loss=_stage0_loss, scale="clip",
    prompts="levels")

STAGE1 = Stage(
    name="stage1", description="ATC: audio tower + adapter to the frozen text tower",
    table="audio", inputs={"audio": "mel", "text": "text"},
    trainable=frozenset({"audio", "audio_upper", "adapter", "logit_scale"}),
    settings=lambda cfg: cfg.stage1, plans=_balanced(lambda cfg: cfg.data.per_species_cap),
    loss=_stage1_loss)

PHASE1 = Stage(
    name="stage2.phase1", description="w_atc ATC + w_aic AIC, image and text frozen",
    table="audio", inputs={"audio": "mel", "text": "text", "image": "image_emb"},
    trainable=frozenset({"audio", "audio_upper", "adapter", "logit_scale"}),
    settings=lambda cfg: cfg.stage2.phase1, plans=_triplets, loss=_phase1_loss, prompts="fixed",
    image_embeddings=True)

PHASE2 = Stage(
    name="stage2.phase2", description="ATC + ramped AIC and ITC behind the ATC gate, + guard",
    table="audio", inputs={"audio": "mel", "text": "text", "image": "image_emb"},
    trainable=frozenset({"text", "audio_upper", "adapter", "logit_scale"}),
    settings=lambda cfg: cfg.stage2.phase2, plans=_triplets, loss=_phase2_loss, prompts="fixed",
    hparams=_phase2_hparams,
    delayed={"audio_upper": "upper_audio_unfreeze_step", "logit_scale": "logit_freeze_steps"},
    reset_logit_scale=True, measures_baseline=True, image_embeddings=True,
    epoch_offset=lambda cfg: cfg.stage2.phase1.epochs,
    betas=lambda cfg: cfg.stage2.betas, grad_clip=lambda cfg: cfg.train.grad_clip,
    per_step=("phase2/gate_open", "phase2/lam_av", "phase2/lam_vt", "phase2/guard",
              "phase2/atc_ema"))

STAGES: tuple[Stage, ...] = (STAGE0, STAGE1, PHASE1, PHASE2)
BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(BY_NAME)})")
    return BY_NAME[name]
