"""Which parameters a stage trains: every parameter of the model has one role, and a stage
(`biovita.train.stages`) names the roles it trains, their learning rates and decay, and the
roles that start training only at a later step."""

from __future__ import annotations

import math

import torch

# Parameter roles of the model.
ROLES = ("image", "text", "clip_scale", "audio", "audio_upper", "adapter", "logit_scale")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") or "ln_" in name


def named_roles(model, upper_audio: str = "released") -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Every parameter of the model, assigned to exactly one role of ROLES. `upper_audio`
    chooses the audio parameters of the `audio_upper` role (see `BioVITA.upper_audio_parameters`)."""
    upper = {id(p) for p in model.upper_audio_parameters(upper_audio)}
    image = {id(p) for p in model.image_parameters()}
    out: dict[str, list] = {g: [] for g in ROLES}
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


def param_groups(model, stage, settings, s2) -> list[dict]:
    """Optimizer groups of a stage: sets requires_grad by its trainable roles and returns one
    group per (role, decay/no-decay) with the stage's lr and weight decay for that role; norms
    and biases get no decay. Each group carries `name`, `role`, `base_lr` and
    `base_weight_decay` for the step schedules (`apply_group_schedule`)."""
    groups = []
    for role, params in named_roles(model, s2.upper_audio).items():
        on = role in stage.trainable
        for _, p in params:
            p.requires_grad_(on)
        if not on:
            continue
        g_lr, g_wd = stage.hparams(role, settings, s2)
        decay = [p for n, p in params if not _no_decay(n, p)]
        no_decay = [p for n, p in params if _no_decay(n, p)]
        for suffix, ps, w in (("decay", decay, g_wd), ("no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": g_lr, "weight_decay": w, "name": f"{role}.{suffix}",
                               "role": role, "base_lr": g_lr, "base_weight_decay": w})
    return groups


def apply_delays(model, optimizer, stage, step: int, s2) -> None:
    """Roles whose start step has not come yet get no gradient (so no share of the clipping
    norm either) and their optimizer groups are skipped (`StagedAdamW`: no update, no state);
    from their step on they train like the others. Called before every step: a restart
    resumes the right plan."""
    for role, params in named_roles(model, s2.upper_audio).items():
        if role in stage.trainable:
            on = stage.role_active(role, step, s2)
            for _, p in params:
                p.requires_grad_(on)
    for g in optimizer.param_groups:
        g["active"] = stage.role_active(g["role"], step, s2)


def reset_logit_scale(param: torch.Tensor, temperature: float) -> None:
    with torch.no_grad():
        param.fill_(math.log(1.0 / temperature))
