"""The training stages of the BioVITA method, declared once.

A `Stage` says what it reads from the store and how its epochs are planned, which batch
columns feed which encoder (and which come from a frozen tower's cache instead), which
parameter roles it trains (and from which step), its loss, its optimizer settings, what
happens when it starts, whether a full run trains it and whether the job benchmarks it. The
driver, the worker loop, the job, the sweep and the benchmark scripts only ask a Stage:
changing phase 2 means editing `PHASE2` below and the loss terms it names
(`biovita.train.schedules`); adding a stage means declaring one here and adding it to `STAGES`.

A loss returns its terms as tensors on the training device: a step reads nothing back to the
host (the loop averages them when it logs).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch

from biovita.config import Config, Stage2Config, StageConfig
from biovita.data import sampling
from biovita.models.registry import MODEL_CONFIGS
from biovita.train import losses, schedules

PromptMode = Literal["random", "levels", "fixed"]  # a template per sample | + bare genus/family | one per species
ScaleKind = Literal["model", "clip"]  # BioVITA's logit scale | open_clip's (stage 0's)
Table = Literal["audio", "image"]

# The batch columns an encoder reads; the *_emb ones are a frozen tower's cached embeddings.
FROZEN_COLUMNS = {"text": "text_emb", "image": "image_emb"}

# Phase 2's per-step scalars (MLflow keys).
GATE_OPEN, LAM_AV, LAM_VT, GUARD, ATC_EMA = (
    "phase2/gate_open", "phase2/lam_av", "phase2/lam_vt", "phase2/guard", "phase2/atc_ema")
BASELINE_ATC, GATE_OPEN_SHARE = "phase2/baseline_atc", "phase2/gate_open_share"


@dataclass
class LossInputs:
    """What a stage's loss sees for one optimizer step (or one micro-batch of it)."""

    feats: dict[str, torch.Tensor]  # L2-normalised embeddings by modality
    scale: torch.Tensor  # exp(logit scale); detached for every micro-batch but the first
    first: bool  # the first micro-batch of the step (updates step-level state once)
    step: int
    s2: Stage2Config
    gate: schedules.ATCGate


LossFn = Callable[[LossInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
    return loss, {"loss": loss.detach(), "itc": loss.detach(),
                  "top1_batch": losses.batch_top1(f["image"], f["text"])}


def _stage1_loss(x: LossInputs):
    f = x.feats
    atc = losses.atc(f["audio"], f["text"], x.scale)
    return atc, {"loss": atc.detach(), "atc": atc.detach(),
                 "top1_batch": losses.batch_top1(f["audio"], f["text"])}


def _phase1_loss(x: LossInputs):
    f = x.feats
    atc, aic = losses.atc(f["audio"], f["text"], x.scale), losses.aic(f["audio"], f["image"], x.scale)
    loss = x.s2.w_atc * atc + x.s2.w_aic * aic
    return loss, {"loss": loss.detach(), "atc": atc.detach(), "aic": aic.detach(),
                  "top1_batch": losses.batch_top1(f["audio"], f["text"])}


def _phase2_loss(x: LossInputs):
    f, s2 = x.feats, x.s2
    atc = losses.atc(f["audio"], f["text"], x.scale)
    aic = losses.aic(f["audio"], f["image"], x.scale)
    itc = losses.itc(f["image"], f["text"], x.scale)
    if x.first:  # the gate follows the workers' mean ATC, on the device
        x.gate.update(losses.mean_over_ranks(atc.detach()))
    w = schedules.phase2_weights(x.step, s2, x.gate.open)
    loss = schedules.phase2_loss(atc, aic, itc, x.gate.baseline, w, s2)
    guard = schedules.guard(atc.detach(), x.gate.baseline, s2.guard_margin, s2.guard_weight)
    return loss, {"loss": loss.detach(), "atc": atc.detach(), "aic": aic.detach(), "itc": itc.detach(),
                  "top1_batch": losses.batch_top1(f["audio"], f["text"]),
                  GATE_OPEN: x.gate.open.float(), LAM_AV: torch.as_tensor(w.lam_av).float(),
                  LAM_VT: torch.as_tensor(w.lam_vt).float(), GUARD: guard, ATC_EMA: x.gate.ema}


def _same_hparams(role: str, st: StageConfig, s2: Stage2Config) -> tuple[float, float]:
    """The stage's lr and weight decay for every role; scales never decay."""
    return (st.lr, 0.0) if role in ("logit_scale", "clip_scale") else (st.lr, st.weight_decay)


def _phase2_hparams(role: str, st: StageConfig, s2: Stage2Config) -> tuple[float, float]:
    """The method's phase-2 values: the text tower and the upper audio layers have their own."""
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


def needs_stage0(cfg: Config) -> bool:
    """Stage 0 (a tiny image-text base model) runs only when the image/text towers come
    without pretrained weights: BioCLIP 2 is the base model otherwise."""
    m = cfg.model
    pretrained = bool(m.clip_model.startswith("hf-hub:") or m.clip_pretrained or m.init_checkpoint
                      or (not m.clip_model and MODEL_CONFIGS[m.name].pretrained))
    return cfg.stage0.enabled and not pretrained


@dataclass(frozen=True)
class Stage:
    name: str  # as checkpoints, MLflow runs and `sweep.stages` name it
    section: str  # its settings' section of the config (`stage1`, `stage2.phase1`, ...)
    description: str
    table: Table  # the store table the stage streams
    inputs: Mapping[str, str]  # modality -> batch column fed to its encoder (FROZEN_COLUMNS: cached)
    trainable: frozenset[str]  # parameter roles trained (biovita.train.freeze.ROLES)
    plans: Callable[[Config, PlanInputs, range], list[dict]]  # one plan per epoch
    loss: LossFn
    prompts: PromptMode = "random"
    scale: ScaleKind = "model"
    hparams: Callable[[str, StageConfig, Stage2Config], tuple[float, float]] = _same_hparams
    delayed: Mapping[str, str] = field(default_factory=dict)  # role -> Stage2Config step field
    reset_logit_scale: bool = False  # to log(1 / stage2.logit_reset_temperature) at the start
    measures_baseline: bool = False  # the gate's ATC baseline, measured before the first update
    epoch_offset: Callable[[Config], int] = lambda cfg: 0  # seeds continue from an earlier stage
    betas: Callable[[Config], tuple[float, float]] = lambda cfg: (0.9, 0.999)  # AdamW's default
    grad_clip: Callable[[Config], float] = lambda cfg: 0.0  # gradient-norm clipping; 0: none
    per_step: tuple[str, ...] = ()  # logged scalars kept for every step (others: window means)
    runs: Callable[[Config], bool] = lambda cfg: True  # whether a full run trains it
    bench_name: str = ""  # the job scores this stage's model under this name ("": not scored)
    sweepable: bool = True  # a sweep trial may train it (stage 0 is shared by the trials)

    def settings(self, cfg: Config) -> StageConfig:
        """Its epochs, batch size, learning rate and weight decay."""
        return operator.attrgetter(self.section)(cfg)

    @property
    def frozen(self) -> frozenset[str]:
        """Modalities whose frozen tower ran once, before the stage: their embeddings come
        with the batches (`biovita.embed.cache`), the tower does not run in the steps."""
        return frozenset(m for m, col in self.inputs.items() if col == FROZEN_COLUMNS.get(m))

    @property
    def pairs_images(self) -> bool:
        """Whether each clip is paired with an image (stage 2's triplets)."""
        return "image" in self.inputs and self.table == "audio"

    def role_active(self, role: str, step: int, s2: Stage2Config) -> bool:
        """Whether a role is updated at `step` (its delayed start, if any, has come)."""
        if role not in self.trainable:
            return False
        return step >= getattr(s2, self.delayed[role]) if role in self.delayed else True


STAGE0 = Stage(
    name="stage0", section="stage0",
    description="image-text base model (embedded run only; BioCLIP 2 otherwise)",
    table="image", inputs={"image": "pixels", "text": "text"},
    trainable=frozenset({"image", "text", "clip_scale"}),
    plans=_balanced(lambda cfg: cfg.stage0.images_per_species), loss=_stage0_loss, scale="clip",
    prompts="levels", runs=needs_stage0, sweepable=False)

STAGE1 = Stage(
    name="stage1", section="stage1", description="ATC: audio tower + adapter to the frozen text tower",
    table="audio", inputs={"audio": "wave", "text": "text_emb"},
    trainable=frozenset({"audio", "audio_upper", "adapter", "logit_scale"}),
    plans=_balanced(lambda cfg: cfg.data.per_species_cap), loss=_stage1_loss, bench_name="stage1")

PHASE1 = Stage(
    name="stage2.phase1", section="stage2.phase1",
    description="w_atc ATC + w_aic AIC, image and text frozen",
    table="audio", inputs={"audio": "wave", "text": "text_emb", "image": "image_emb"},
    trainable=frozenset({"audio", "audio_upper", "adapter", "logit_scale"}),
    plans=_triplets, loss=_phase1_loss, prompts="fixed",
    runs=lambda cfg: cfg.stage2.phase1.epochs > 0)

PHASE2 = Stage(
    name="stage2.phase2", section="stage2.phase2",
    description="ATC + ramped AIC and ITC behind the ATC gate, + guard",
    table="audio", inputs={"audio": "wave", "text": "text", "image": "image_emb"},
    trainable=frozenset({"text", "audio_upper", "adapter", "logit_scale"}),
    plans=_triplets, loss=_phase2_loss, prompts="fixed", hparams=_phase2_hparams,
    delayed={"audio_upper": "upper_audio_unfreeze_step", "logit_scale": "logit_freeze_steps"},
    reset_logit_scale=True, measures_baseline=True,
    epoch_offset=lambda cfg: cfg.stage2.phase1.epochs,
    betas=lambda cfg: cfg.stage2.betas, grad_clip=lambda cfg: cfg.train.grad_clip,
    per_step=(GATE_OPEN, LAM_AV, LAM_VT, GUARD, ATC_EMA),
    runs=lambda cfg: cfg.stage2.phase2.epochs > 0, bench_name="stage2")

STAGES: tuple[Stage, ...] = (STAGE0, STAGE1, PHASE1, PHASE2)
BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(BY_NAME)})")
    return BY_NAME[name]


def stages_to_run(cfg: Config) -> list[Stage]:
    """A full run's stages, in order: those whose `runs` says so."""
    return [s for s in STAGES if s.runs(cfg)]


def benchmarked(stages) -> list[Stage]:
    """The stages among `stages` (objects or names) whose models the job scores, in order."""
    names = {s if isinstance(s, str) else s.name for s in stages}
    return [s for s in STAGES if s.bench_name and s.name in names]


def tables_needed(stages) -> set[str]:
    """The store tables training `stages` reads: each one's, the images stage 2 pairs clips
    with, and the taxa (every exported model records its species)."""
    return {"taxa"} | {s.table for s in stages} | {"image" for s in stages if s.pairs_images}


def sweepable() -> list[str]:
    return [s.name for s in STAGES if s.sweepable]
