"""The trained-model format: a folder with `model.safetensors` + `biovita.json`.

`biovita.json` holds the architecture (so loading needs no network), the SHA-256 of the weights
(a tampered or truncated file is rejected) and free-form metadata (the taxa trained on, the
run). Loading never unpickles: weights come from safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
META = "biovita.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the folder atomically (temp names, then rename) and return it."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    # clone: under DeepSpeed the parameters are views into flat buffers
    tensors = {k: v.detach().float().cpu().clone().contiguous() if v.is_floating_point()
               else v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp))
    meta = {"format_version": FORMAT_VERSION, "arch": model.arch, "sha256": _sha256(tmp),
            "metadata": metadata or {}}
    os.replace(tmp, out / WEIGHTS)
    (out / (META + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(out / (META + ".tmp"), out / META)
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise CheckpointError(f"{p} is not a biovita checkpoint (needs {WEIGHTS} and {META})")
    try:
        return json.loads((p / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / META} is not valid JSON: {e}") from None


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """Load a checkpoint folder; checks the weights' hash before reading them."""
    from safetensors.torch import load_file

    from biovita.models.factory import build_from_arch

    p = Path(path)
    meta = read_meta(p)
    digest = _sha256(p / WEIGHTS)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{p / WEIGHTS} does not match the SHA-256 recorded in {p / META} "
            "(the file was modified or truncated); refusing to load it"
        )
    model = build_from_arch(meta["arch"])
    try:
        model.load_state_dict(load_file(str(p / WEIGHTS), device=device), strict=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {p / WEIGHTS}: {e}") from None
    model.checkpoint_metadata = meta.get("metadata", {})
    return model.eval()


def export_release(model, out: str | os.PathLike) -> Path:
    """Audio tower + adapter in the official release's layout: a transformers CLAP folder
    (`clap/`) and the adapter state dict (`audio_adapter.pt`, plain tensors)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.audio.save_pretrained(out / "clap")
    torch.save({k: v.detach().cpu() for k, v in model.adapter.state_dict().items()},
               out / "audio_adapter.pt")
    (out / "front_end.json").write_text(json.dumps(model.arch["audio_front_end"], indent=1))
    return out
