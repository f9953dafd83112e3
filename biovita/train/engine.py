"""The few operations the worker loop needs from its training engine: DeepSpeed ZeRO (or DDP)
over the model, with the optimizer groups a stage asks for."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from biovita.config import Config

DS_TAG = "ds"
STATE_FILE = "biovita_state.json"


def deepspeed_config(cfg: Config, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.accum_freq,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bool(cfg.train.use_gpu)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Engine:
    """DeepSpeed (or DDP) around the model and an AdamW over `groups`."""

    def __init__(self, model, groups: list[dict], cfg: Config, micro_batch: int, betas, eps,
                 device: torch.device | None = None, rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.strategy = cfg.train.strategy
        opt = torch.optim.AdamW(groups, betas=betas, eps=eps)
        self.device = device or torch.device("cpu")
        if self.strategy == "deepspeed":
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model.to(self.device), optimizer=opt, config=deepspeed_config(cfg, micro_batch))
            self.module = self.engine.module
        else:
            self.module = model.to(self.device)
            self.optimizer = opt
            self.engine = (torch.nn.parallel.DistributedDataParallel(self.module)
                           if dist.is_initialized() and dist.get_world_size() > 1 else self.module)
        use_bf16 = cfg.train.use_gpu and self.strategy == "deepspeed"
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            # contrastive accumulation sums k micro-batch gradients; DeepSpeed divides by k
            self.engine.backward(loss * self.cfg.train.accum_freq)
        else:
            loss.backward()

    def step(self) -> None:
        if self.strategy == "deepspeed":
            for _ in range(self.cfg.train.accum_freq):
                self.engine.step()
        else:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, params):
        """Context in which ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
        if self.strategy == "deepspeed" and self.cfg.train.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
        return contextlib.nullcontext()

    def save(self, directory: str, state: dict) -> None:
        """Every rank writes its shard; rank 0 the loop state (JSON) beside it."""
        if self.strategy == "deepspeed":
            self.engine.save_checkpoint(directory, tag=DS_TAG, client_state={"biovita": state})
        elif self.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       os.path.join(directory, "ddp.pt"))
        if self.rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps(state))

    def load(self, directory: str) -> dict:
        if self.strategy == "deepspeed":
            self.engine.load_checkpoint(directory, tag=DS_TAG)
        else:
            ck = torch.load(os.path.join(directory, "ddp.pt"), map_location="cpu", weights_only=True)
            self.module.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        return json.loads(Path(directory, STATE_FILE).read_text())
