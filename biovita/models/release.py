"""The BioVITA release's layouts (docs/method.md, "Released weights"), read and
written, so that the published model, the authors' checkpoints and models trained here go
wherever the other's tools expect them.

- official: `hf-hub:risashinoda/BioVITA`, or a folder of the same files: `open_clip_config.json`
  + `open_clip_pytorch_model.bin` (the ViT-L-14 image and text towers) + `clap_weights.pth`
  ({"clap_audio": a whole transformers ClapModel state dict, "audio_adapter": {"weight"}}).
- training: an authors' checkpoint `.pth`, one state dict (possibly under "state_dict", keys
  possibly prefixed "module.") with `oc_model.` / `clap_audio.` / `audio_adapter.` keys and
  `logit_scale`; the towers' architecture comes from a model config (`bioclip2-clap`).

Neither layout names its CLAP base: its architecture and `preprocessor_config.json` (the log-mel
settings) come from `clap` (a Hub id or a local transformers folder), `laion/clap-htsat-unfused`
by default, as in the authors' feature extractor. Weights are read with `weights_only=True`;
the text branch of the ClapModel (unused by BioVITA's audio tower) is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from biovita.errors import CheckpointError
from biovita.models.factory import (
    audio_config_dict,
    audio_front_end,
    clip_config,
    random_clip,
    resolve_clip_ref,
)
from biovita.models.model import BioVITA
from biovita.models.registry import resolve_model_config

log = logging.getLogger("biovita.models")
DEFAULT_CLAP = "laion/clap-htsat-unfused"
OFFICIAL_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "clap_weights.pth")
AUDIO_PREFIXES = ("audio_model.", "audio_projection.")  # ClapModel keys of the audio tower


def is_official(path: str | os.PathLike) -> bool:
    """A folder of the released layout (its config and its CLAP weights at least)."""
    return Path(path).is_dir() and all((Path(path) / f).is_file() for f in OFFICIAL_FILES[::2])


def _torch_load(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a checkpoint PyTorch can read without running code "
                              f"({str(e).splitlines()[0][:200]})") from None


def _load_strict(module: torch.nn.Module, state: dict, source: str, what: str) -> None:
    """Every tensor of `module` from `state`, with the same shape; one message names the file
    and the first key that is missing or mis-shaped."""
    own = module.state_dict()
    for key, want in own.items():
        if key not in state:
            raise CheckpointError(f"{source}: {what} lacks the tensor {key!r} "
                                  f"({len(state)} tensors there)")
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"{source}: {what} tensor {key!r} has shape {shape}, "
                                  f"the architecture needs {tuple(want.shape)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _clap_parts(clap: str):
    """(ClapConfig, audio front end) of the CLAP base: its config.json and preprocessor config."""
    from transformers import ClapConfig

    try:
        config = ClapConfig.from_pretrained(clap)
    except OSError as e:
        raise CheckpointError(f"CLAP base {clap!r}: no ClapModel config.json there (pass --clap "
                              f"with a Hub id or a local transformers folder): {str(e)[:200]}") from None
    return config, audio_front_end(clap)


def _audio_tower(state: dict, clap: str, source: str):
    """The audio tower and its front end from a ClapModel state dict; returns them with the
    number of text-branch tensors skipped."""
    from transformers import ClapAudioModelWithProjection

    config, fe = _clap_parts(clap)
    audio = ClapAudioModelWithProjection(config.audio_config)
    audio_state = {k: v for k, v in state.items() if k.startswith(AUDIO_PREFIXES)}
    _load_strict(audio, audio_state, source, "the ClapModel state dict")
    return audio, fe, len(state) - len(audio_state)


def _assemble(clip, clip_cfg, image_fe, audio, audio_fe, adapter_weight, logit_scale, sources, source):
    arch = {"name": "biovita-release", "clip_config": clip_cfg,
            "audio_config": audio_config_dict(audio.config), "image_front_end": asdict(image_fe),
            "audio_front_end": asdict(audio_fe), "sources": sources}
    model = BioVITA(clip, audio, arch)
    _load_strict(model.adapter, {"weight": adapter_weight}, source, "audio_adapter")
    with torch.no_grad():
        model.logit_scale.copy_(torch.as_tensor(logit_scale, dtype=torch.float32).reshape(1))
    model.checkpoint_metadata = {}
    return model.eval()


def load_official(folder: str | os.PathLike, clap: str | None = None):
    """A BioVITA model from the released layout (a folder, or `hf-hub:org/repo`)."""
    ref = str(folder)
    if ref.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        folder = Path(hf_hub_download(ref[len("hf-hub:"):], OFFICIAL_FILES[0])).parent
        for f in OFFICIAL_FILES[1:]:
            hf_hub_download(ref[len("hf-hub:"):], f)
    folder, clap = Path(folder), clap or DEFAULT_CLAP
    try:
        cfg = json.loads((folder / OFFICIAL_FILES[0]).read_text())
        model_cfg = cfg["model_cfg"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{folder / OFFICIAL_FILES[0]}: not an open_clip config ({e})") from None
    clip, image_fe = random_clip(model_cfg, cfg.get("preprocess_cfg", {}))
    oc_file = folder / OFFICIAL_FILES[1]
    state = _torch_load(oc_file)
    state = state.get("state_dict", state)
    _load_strict(clip, {k: (v.reshape(clip.state_dict()[k].shape) if k in ("logit_scale", "logit_bias")
                            and k in clip.state_dict() and v.numel() == 1 else v)
                        for k, v in state.items()}, str(oc_file), "the open_clip state dict")
    weights_file = folder / OFFICIAL_FILES[2]
    weights = _torch_load(weights_file)
    for key in ("clap_audio", "audio_adapter"):
        if not isinstance(weights, dict) or key not in weights:
            raise CheckpointError(f"{weights_file}: lacks {key!r} (expected keys clap_audio, audio_adapter)")
    audio, audio_fe, skipped = _audio_tower(weights["clap_audio"], clap, str(weights_file))
    if "weight" not in weights["audio_adapter"]:
        raise CheckpointError(f"{weights_file}: audio_adapter lacks the tensor 'weight'")
    log.info("%s: %d tensors of the CLAP text branch skipped (unused by the audio tower)", weights_file, skipped)
    # the release carries no audio-text logit scale: open_clip's stands in (predict's softmax)
    model = _assemble(clip, model_cfg, image_fe, audio, audio_fe, weights["audio_adapter"]["weight"],
                      clip.logit_scale.detach().reshape(-1)[0], {"image+text": ref, "audio": ref,
                                                                 "clap_base": clap}, str(weights_file))
    model.checkpoint_metadata = {"layout": "official", "clap_text_tensors_skipped": skipped}
    return model


def load_training_checkpoint(path: str | os.PathLike, model_cfg=None, clap: str | None = None):
    """A BioVITA model from an authors' training checkpoint; the open_clip architecture comes
    from `model_cfg` (a ModelConfig or registered name, default `bioclip2-clap`: only its
    `open_clip_config.json` is read), CLAP's from `clap` (default: the config's audio model)."""
    path = Path(path)
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    parts = {p: {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
             for p in ("oc_model.", "clap_audio.", "audio_adapter.")}
    for p, tensors in parts.items():
        if not tensors:
            raise CheckpointError(f"{path}: no {p}* tensors: not a BioVITA training checkpoint "
                                  f"(keys look like {sorted(state)[:3]})")
    if "logit_scale" not in state:
        raise CheckpointError(f"{path}: lacks the tensor 'logit_scale'")
    cfg = resolve_model_config(model_cfg or "bioclip2-clap")
    clip_ref = resolve_clip_ref(cfg.clip_model)
    clip_cfg, preprocess = clip_config(clip_ref)
    clip, image_fe = random_clip(clip_cfg, preprocess)
    oc = parts["oc_model."]
    _load_strict(clip, {k: (v.reshape(clip.state_dict()[k].shape) if k in clip.state_dict()
                            and v.numel() == clip.state_dict()[k].numel() else v) for k, v in oc.items()},
                 str(path), "oc_model")
    clap = clap or (cfg.audio_model if cfg.audio_model not in ("tiny", "htsat") else DEFAULT_CLAP)
    audio, audio_fe, skipped = _audio_tower(parts["clap_audio."], clap, str(path))
    model = _assemble(clip, clip_cfg, image_fe, audio, audio_fe, parts["audio_adapter."].get("weight"),
                      state["logit_scale"], {"image+text": str(path), "audio": str(path),
                                             "clap_base": clap}, str(path))
    model.checkpoint_metadata = {"layout": "training", "clap_text_tensors_skipped": skipped}
    return model


def export_official(model, out: str | os.PathLike, clap: str | None = None) -> Path:
    """Write `model` in the released layout. `clap_audio` is a whole ClapModel state dict, as
    the authors' extractor loads it: the audio branch is this model's; the text branch (unused
    by BioVITA) comes from the CLAP base `clap` when it can be loaded, else it is the base
    config's fresh initialisation (logged)."""
    from transformers import ClapConfig, ClapModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip_cfg = model.arch["clip_config"]
    fe = model.image_front_end
    (out / OFFICIAL_FILES[0]).write_text(json.dumps({"model_cfg": clip_cfg, "preprocess_cfg": {
        "size": fe.image_size, "mean": list(fe.mean), "std": list(fe.std),
        "interpolation": fe.interpolation, "resize_mode": fe.resize_mode}}, indent=1))
    torch.save({k: v.detach().cpu().clone() for k, v in model.clip.state_dict().items()},
               out / OFFICIAL_FILES[1])
    base = None
    if clap:
        try:
            base = ClapModel.from_pretrained(clap)
        except OSError as e:
            log.warning("CLAP base %s not loadable (%s): the exported text branch is a fresh one", clap, e)
    if base is None:  # transformers' default text branch has laion/clap-htsat-unfused's shapes
        from transformers import ClapAudioConfig

        audio_cfg = ClapAudioConfig(**model.arch["audio_config"])
        base = ClapModel(ClapConfig(audio_config=audio_cfg.to_dict(),
                                    projection_dim=audio_cfg.projection_dim))
    state = base.state_dict()
    state.update({k: v.detach().cpu().clone() for k, v in model.audio.state_dict().items()})
    torch.save({"clap_audio": state,
                "audio_adapter": {"weight": model.adapter.weight.detach().cpu().clone()}},
               out / OFFICIAL_FILES[2])
    return out
