"""The training engine of the worker loop: DeepSpeed ZeRO over the model, with an AdamW over
the optimizer groups a stage asks for, some of which may start only at a later step.

A step reads nothing back to the host: torch's fused AdamW (one kernel over a group's flat
partition, its step counts on the device), no per-parameter overflow check in bf16, and
DeepSpeed's gradient norm, clipping and non-finite guard as multi-tensor work decided on the
device (`biovita.train.deepspeed_patches`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from biovita.config import Config
from biovita.errors import CheckpointError
from biovita.train import deepspeed_patches
from biovita.train.losses import LOGIT_SCALE_MAX, LOGIT_SCALE_MIN

deepspeed_patches.apply()

DS_TAG = "ds"
STATE_FILE = "biovita_state.json"


class StagedAdamW(torch.optim.AdamW):
    """AdamW that updates only the groups marked `active`.

    A group that is not active yet is skipped entirely: no update, no weight decay and no
    optimizer state, so that on its first active step it starts with fresh moments, as a group
    that `add_param_group` adds at that step does (docs/method.md, phase 2). Under DeepSpeed ZeRO
    the groups are flat fp32 partitions, one per group: skipping a group skips its partition."""

    @torch.no_grad()
    def step(self, closure=None):
        skipped = []
        for g in self.param_groups:
            if not g.get("active", True):
                skipped.append((g, g["params"]))
                g["params"] = []
        try:
            return super().step(closure)
        finally:
            for g, params in skipped:
                g["params"] = params


def _register_zero3_external_params(model) -> None:
    """ZeRO-3 gathers a module's parameters around its forward. nn.MultiheadAttention (open_clip's
    towers) reads its `out_proj` weights without calling `out_proj`: they must be gathered with
    the attention module itself."""
    import deepspeed

    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            for p in m.out_proj.parameters():
                deepspeed.zero.register_external_parameter(m, p)


def deepspeed_config(cfg: Config, micro_batch: int, grad_clip: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.accum_freq,
        "gradient_clipping": grad_clip,  # 0: none (the method clips in phase 2 only)
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # StagedAdamW is torch's AdamW underneath
        "bf16": {"enabled": cfg.train.bf16(), "check_grad_overflow": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Engine:
    """DeepSpeed around the model and a StagedAdamW over `groups`."""

    def __init__(self, model, groups: list[dict], cfg: Config, micro_batch: int, betas, eps: float,
                 grad_clip: float, device: torch.device | None = None, rank: int = 0):
        import deepspeed

        self.cfg, self.rank = cfg, rank
        self.device = device or torch.device("cpu")
        self.trained = [p for g in groups for p in g["params"]]  # (a role may start late)
        # ZeRO-3 hands the optimizer partitions that live on other devices between steps:
        # the fused kernel is for ZeRO 0-2, whose flat fp32 partitions stay put
        opt = StagedAdamW(groups, betas=betas, eps=eps, fused=cfg.train.zero_stage < 3)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=opt,
            config=deepspeed_config(cfg, micro_batch, grad_clip))
        self.module = self.engine.module
        self.dtype = torch.bfloat16 if cfg.train.bf16() else torch.float32
        if cfg.train.zero_stage == 3:
            _register_zero3_external_params(self.module)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """One micro-batch's backward pass; gradients are reduced across workers at the last
        micro-batch of the step (DeepSpeed's accumulation boundary)."""
        k = self.cfg.train.accum_freq
        self.engine.set_gradient_accumulation_boundary(last)
        # contrastive accumulation gives each micro-batch the loss of the whole k-batch and
        # sums their gradients; DeepSpeed divides every backward by k
        self.engine.backward(loss * k)

    def step(self) -> None:
        """The optimizer step (after the last micro-batch's backward), then the logit scale
        clamp on the value DeepSpeed stores, not only on the module's copy."""
        self.engine.step()

    def clamp(self, param: torch.Tensor) -> None:
        """Clamp a parameter to [ln(1/100), ln 100], in the fp32 master copy the optimizer
        updates (and checkpoints) as well as in the module. A clamp is elementwise: each rank
        clamps the part of the master it holds, on the device, with no collective."""
        from deepspeed import utils

        if self.cfg.train.zero_stage == 3:
            # (DeepSpeed 0.19.8's set_full_hp_param mis-slices parameters smaller than the ranks)
            local = utils.safe_get_local_fp32_param(param)
            if local is not None:
                utils.safe_set_local_fp32_param(param, local.clamp(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX))
        elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1-2 and bf16: a fragment here
            with torch.no_grad():
                param._hp_mapping.get_hp_fragment().clamp_(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX)
        with self.gathered([param]), torch.no_grad():
            param.clamp_(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX)

    def master_value(self, param: torch.Tensor) -> torch.Tensor:
        """The fp32 value the optimizer holds for a parameter (the module's when it has none)."""
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is None:
            with self.gathered([param]):
                master = param.detach().float().clone()
        return master

    def full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """A parameter's whole gradient after the step's last backward (before `step`)."""
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def groups_with_state(self) -> set[str]:
        """Names of the optimizer groups that hold optimizer state (have been updated)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        # (ZeRO 0-2: under ZeRO-3 the groups hold their partitions only during `step`)
        return {g["name"] for g in inner.param_groups
                if any(inner.state.get(p) for p in g["params"])}

    def gathered(self, params):
        """Context in which ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
        import contextlib

        if self.cfg.train.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
        return contextlib.nullcontext()

    def save(self, directory: str, state: dict) -> None:
        """Every rank writes its shard and a manifest of what it wrote (SHA-256 of each file);
        rank 0 the loop state (JSON) beside them. Frozen parameters are left out: they are the
        stage's starting model's, which every (re)start loads before its checkpoint (under
        ZeRO-2 they were written twice: stage 1 of `bioclip2_clap` freezes 428 M parameters)."""
        # DeepSpeed leaves out what does not require grad now, which includes the roles whose
        # start step has not come yet (`freeze.apply_delays`): those are trained, so kept
        flags = [p.requires_grad for p in self.trained]
        for p in self.trained:
            p.requires_grad_(True)
        try:
            self.engine.save_checkpoint(directory, tag=DS_TAG, client_state={"biovita": state},
                                        exclude_frozen_parameters=True)
        finally:
            for p, flag in zip(self.trained, flags):
                p.requires_grad_(flag)
        if self.rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps(state))
        write_manifest(directory, self.rank)

    def load(self, directory: str) -> dict:
        """Restore from a checkpoint folder; CheckpointError when it is damaged (a file its
        manifests list is missing, cut short or changed), before anything is loaded."""
        check_manifests(directory)
        self.engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False,
                                    custom_load_fn=self._load_module)
        return json.loads(Path(directory, STATE_FILE).read_text())

    def frozen_names(self) -> set[str]:
        """The parameters the stage never trains (left out of its checkpoints)."""
        trained = {id(p) for p in self.trained}
        return {n for n, p in self.module.named_parameters() if id(p) not in trained}

    def _load_module(self, src: dict, dst: torch.nn.Module) -> None:
        """A checkpoint's module state into the model: it may lack only the frozen parameters
        (`save` leaves them out); any other key missing or unknown is a CheckpointError."""
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - self.frozen_names())
        if missing or result.unexpected_keys:
            raise CheckpointError(f"the checkpoint's model does not fit the stage's: missing "
                                  f"{missing[:3]}, unknown {list(result.unexpected_keys)[:3]}")


MANIFEST = "manifest-rank{}.json"


def write_manifest(directory: str, rank: int) -> None:
    """The files this rank wrote into a checkpoint (every one but the other ranks'
    manifests), with their sizes and SHA-256."""
    root = Path(directory)
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not rel.startswith("manifest-rank"):
            files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (root / MANIFEST.format(rank)).write_text(json.dumps(files))


def check_manifests(directory: str) -> None:
    """Raise CheckpointError naming the first file of a checkpoint that is missing, cut short
    or changed (against every rank's manifest); a checkpoint without manifests passes."""
    root = Path(directory)
    for manifest in sorted(root.glob("manifest-rank*.json")):
        try:
            files = json.loads(manifest.read_text())
        except ValueError:
            raise CheckpointError(f"{manifest}: not valid JSON") from None
        for rel, want in files.items():
            f = root / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {manifest.name})")
            if f.stat().st_size != want["size"]:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {want['size']} written (cut short)")
            if _sha256(f) != want["sha256"]:
                raise CheckpointError(f"{f}: SHA-256 differs from the one written")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
