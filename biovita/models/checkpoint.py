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

from biovita.errors import CheckpointError
from biovita.frontends.audio import AudioFrontEnd
from biovita.frontends.image import ImageFrontEnd
from biovita.locations import is_remote
from biovita.models import release
from biovita.models.factory import build_from_arch

WEIGHTS = "model.safetensors"
META = "biovita.json"
FORMAT_VERSION = 1


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
            "towers": tower_digests(tensors), "metadata": metadata or {}}
    os.replace(tmp, out / WEIGHTS)
    (out / (META + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(out / (META + ".tmp"), out / META)
    return out


TOWERS = ("image", "text", "audio")


def tower_of(key: str) -> str | None:
    """Which tower a state-dict key belongs to: the image tower (open_clip's visual), the text
    tower (the rest of open_clip but its logit scale and bias), the audio tower with its
    adapter; None for the logit scales."""
    if key.startswith("clip.visual."):
        return "image"
    if key.startswith(("audio.", "adapter.")):
        return "audio"
    if key.startswith("clip.") and key not in ("clip.logit_scale", "clip.logit_bias"):
        return "text"
    return None


def tower_digests(tensors: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each tower's tensors (names, shapes and float32 values): what a cached
    embedding of that tower is keyed by (`biovita.embed.cache`)."""
    import torch

    hashes = {t: hashlib.sha256() for t in TOWERS}
    for key in sorted(tensors):
        tower = tower_of(key)
        if tower is None:
            continue
        v = tensors[key].detach().cpu()
        v = (v.float() if v.is_floating_point() else v).contiguous()
        hashes[tower].update(f"{key}:{tuple(v.shape)}:{v.dtype}".encode())
        hashes[tower].update(v.reshape(-1).view(torch.uint8).numpy())
    return {t: h.hexdigest() for t, h in hashes.items()}


def towers(path: str | os.PathLike) -> dict[str, str]:
    """The tower digests of a checkpoint folder: recorded in its JSON, else computed from
    its weights (checkpoints written before they were recorded)."""
    meta = read_meta(path)
    if "towers" in meta:
        return meta["towers"]
    from safetensors.torch import load_file

    return tower_digests(load_file(str(Path(path) / WEIGHTS)))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise CheckpointError(f"{p} is not a biovita checkpoint (needs {WEIGHTS} and {META})")
    try:
        return json.loads((p / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / META} is not valid JSON: {e}") from None


def front_ends(path: str | os.PathLike) -> tuple[AudioFrontEnd, ImageFrontEnd]:
    """(audio, image) front ends of a checkpoint folder, from its JSON alone (no weights read)."""
    arch = read_meta(path)["arch"]
    img = dict(arch["image_front_end"])
    img["mean"], img["std"] = tuple(img["mean"]), tuple(img["std"])
    return AudioFrontEnd(**arch["audio_front_end"]), ImageFrontEnd(**img)


def load_biovita(path: str | os.PathLike, device: str = "cpu"):
    """Load a biovita checkpoint folder; checks the weights' hash before reading them."""
    from safetensors.torch import load_file

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


def is_biovita(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file() and (Path(path) / WEIGHTS).is_file()


def load_model(ref: str | os.PathLike, clap: str | None = None, model=None, device: str = "cpu"):
    """A model from whatever users bring: a biovita checkpoint folder (safetensors), the
    released layout (`hf-hub:risashinoda/BioVITA` or a folder of its files) or an authors'
    training checkpoint (`.pth`). `clap` names the CLAP base of the two released layouts (Hub id
    or local folder; default laion/clap-htsat-unfused); `model` the model config (name or
    ModelConfig) whose towers a training checkpoint fills (default bioclip2-clap)."""
    ref = str(ref)
    if ref.startswith("hf-hub:") or release.is_official(ref):
        return release.load_official(ref, clap).to(device)
    if is_biovita(ref):
        return load_biovita(ref, device)
    if Path(ref).is_file():
        return release.load_training_checkpoint(ref, model, clap).to(device)
    if Path(ref).is_dir():
        raise CheckpointError(f"{ref} is neither a biovita checkpoint ({WEIGHTS} + {META}) nor the "
                              f"released layout ({', '.join(release.OFFICIAL_FILES)})")
    raise CheckpointError(f"{ref}: no such checkpoint file or folder")


def resolve_checkpoint(ref: str | os.PathLike, clap: str | None = None, model=None,
                       cache: str | os.PathLike | None = None) -> str:
    """A biovita checkpoint folder for `ref`: itself when it is one, else the model converted
    once into a cache folder (`~/.cache/biovita/checkpoints`), so that Ray workers load fast
    safetensors and object-store paths work the same way."""
    ref = str(ref)
    if is_remote(ref) or is_biovita(ref):
        return ref
    key_parts = [ref if ref.startswith("hf-hub:") else str(Path(ref).resolve()), clap or "",
                 str(getattr(model, "name", model) or "")]
    if not ref.startswith("hf-hub:") and Path(ref).exists():
        files = [Path(ref)] if Path(ref).is_file() else sorted(Path(ref).iterdir())
        key_parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    out = Path(cache or Path.home() / ".cache" / "biovita" / "checkpoints") / key
    if not is_biovita(out):
        loaded = load_model(ref, clap=clap, model=model)
        save_model(loaded, out, metadata={**loaded.checkpoint_metadata, "converted_from": ref})
    return str(out)
