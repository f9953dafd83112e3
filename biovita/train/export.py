"""Consolidated model export at a stage end (the safetensors format of biovita.models)."""

from __future__ import annotations

import tempfile

import torch.distributed as dist

from biovita.data.store import upload_dir
from biovita.models.checkpoint import save_model


def export_consolidated(eng, module, export_to: str, stage: str, state: dict, metrics: dict,
                        taxa: list[dict] | None = None) -> None:
    """All ranks gather ZeRO-3 shards; rank 0 writes the model to `export_to` (path or URI)."""
    with eng.gathered(module.parameters()):
        if eng.rank == 0:
            meta = {"stage": stage, "step": state["step"],
                    "baseline_atc": state.get("baseline_atc"),
                    "metrics": {k: float(v) for k, v in metrics.items()}, "taxa": taxa or []}
            with tempfile.TemporaryDirectory() as d:
                save_model(module, d, metadata=meta)
                upload_dir(d, export_to)
    if dist.is_initialized():
        dist.barrier()
