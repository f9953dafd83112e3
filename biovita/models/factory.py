"""`create_model`: build BioVITA from a registered name, the Hub, or local files.

Image/text towers (open_clip): a registered tiny config, an open_clip name (+ pretrained tag or
weights file), `hf-hub:org/repo`, `local-dir:/folder` or a plain folder holding
`open_clip_config.json`. Audio tower (transformers CLAP HTS-AT): "tiny", "htsat" (random, full
size), a Hub id or a `save_pretrained` folder (ClapModel or ClapAudioModelWithProjection).
Each tower's source is logged; a tower left random is warned about, or raises with
`require_pretrained`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from biovita.errors import PretrainedWeightsError
from biovita.frontends.audio import AudioFrontEnd
from biovita.frontends.image import ImageFrontEnd
from biovita.models.model import BioVITA
from biovita.models.registry import (
    CLAP_PREPROCESS,
    MODEL_CONFIGS,
    TINY_AUDIO_CONFIG,
    TINY_CLIP_CONFIG,
    TINY_CLIP_NAME,
    ModelConfig,
    resolve_model_config,
)

log = logging.getLogger("biovita.models")


class RandomTowerWarning(UserWarning):
    """A tower was built without pretrained weights (`require_pretrained` makes it an error)."""


def register_clip_config(name: str, cfg: dict) -> None:
    import open_clip

    if name in open_clip.list_models():
        return
    # open_clip registers configs from files only; it keeps the parsed config, so the file
    # goes at once (one left per process filled /tmp on long-lived clusters)
    with tempfile.TemporaryDirectory(prefix="biovita-oc-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def resolve_clip_ref(ref: str) -> str:
    """A plain folder with open_clip_config.json means `local-dir:`."""
    if not ref.startswith(("hf-hub:", "local-dir:")) and os.path.isdir(ref):
        return f"local-dir:{ref}"
    return ref


def clip_config(ref: str) -> tuple[dict, dict]:
    """(open_clip model_cfg, preprocess_cfg overrides) for a reference, without weights."""
    import open_clip

    if ref == TINY_CLIP_NAME:
        return TINY_CLIP_CONFIG, {}
    if ref.startswith("local-dir:"):
        d = json.loads((Path(ref[len("local-dir:"):]) / "open_clip_config.json").read_text())
        return d["model_cfg"], d.get("preprocess_cfg", {})
    if ref.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(ref[len("hf-hub:"):], "open_clip_config.json")
        d = json.loads(Path(path).read_text())
        return d["model_cfg"], d.get("preprocess_cfg", {})
    cfg = open_clip.get_model_config(ref)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {ref!r}")
    return cfg, {}


def create_clip(ref: str, pretrained: str = "") -> tuple[Any, dict, ImageFrontEnd, str]:
    """(open_clip model, model_cfg, image front end, description of the weights loaded)."""
    import open_clip

    ref = resolve_clip_ref(ref)
    if ref == TINY_CLIP_NAME:
        register_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG)
    model_cfg, _ = clip_config(ref)
    has_schema = ref.startswith(("hf-hub:", "local-dir:"))
    with quiet_open_clip(random_is_expected=True):  # create_model warns on its own, once
        model = open_clip.create_model(ref, pretrained=(pretrained or None) if not has_schema else None)
    if has_schema:
        source = ref
        if ref.startswith("local-dir:") and not open_clip.factory._find_checkpoint_in_dir(
            Path(ref[len("local-dir:"):])
        ):
            source = ""
    else:
        source = pretrained
    return model, model_cfg, image_front_end(model, model_cfg), source


def image_front_end(model, model_cfg: dict) -> ImageFrontEnd:
    """The image front end of an open_clip model: its own preprocess config."""
    import open_clip

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model_cfg["vision_cfg"].get("image_size", 224))
    return ImageFrontEnd(image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
                         mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                         interpolation=pp.get("interpolation", "bicubic"),
                         resize_mode=pp.get("resize_mode", "shortest"))


def random_clip(model_cfg: dict, preprocess_cfg: dict | None = None) -> tuple[Any, ImageFrontEnd]:
    """An open_clip model of this config with random weights (loaded right after, no
    network) and its image front end."""
    import open_clip

    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"biovita-arch-{digest}"
    register_clip_config(name, model_cfg)
    with quiet_open_clip(random_is_expected=True):  # the weights are loaded right after
        model = open_clip.create_model(name, pretrained=None, **(
            {"force_preprocess_cfg": preprocess_cfg} if preprocess_cfg else {}))
    return model, image_front_end(model, model_cfg)


def create_audio(ref: str) -> tuple[Any, dict, AudioFrontEnd, str]:
    """(ClapAudioModelWithProjection, config dict, front end, description of the weights)."""
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    if ref in ("tiny", "htsat"):
        config = ClapAudioConfig(**(TINY_AUDIO_CONFIG if ref == "tiny" else {}))
        return (ClapAudioModelWithProjection(config), audio_config_dict(config),
                AudioFrontEnd.from_preprocessor_config(CLAP_PREPROCESS), "")
    model = ClapAudioModelWithProjection.from_pretrained(ref)
    return model, audio_config_dict(model.config), audio_front_end(ref), ref


def audio_config_dict(config) -> dict:
    keep = ("window_size", "num_mel_bins", "spec_size", "hidden_act", "patch_size", "patch_stride",
            "num_classes", "hidden_size", "projection_dim", "depths", "num_attention_heads",
            "enable_fusion", "fusion_type", "patch_embed_input_channels", "flatten_patch_embeds",
            "patch_embeds_hidden_size", "enable_patch_layer_norm", "drop_path_rate", "qkv_bias",
            "mlp_ratio", "aff_block_r", "projection_hidden_act", "layer_norm_eps",
            "projection_hidden_size", "hidden_dropout_prob", "attention_probs_dropout_prob")
    d = config.to_dict()
    return {k: d[k] for k in keep if k in d}


def audio_front_end(ref: str) -> AudioFrontEnd:
    """The checkpoint's own preprocessor config is the ground truth (docs/method.md)."""
    from transformers import ClapFeatureExtractor

    try:
        fx = ClapFeatureExtractor.from_pretrained(ref)
        return AudioFrontEnd.from_preprocessor_config(fx.to_dict())
    except OSError:
        log.warning("no preprocessor_config.json with %s; using CLAP HTS-AT defaults", ref)
        return AudioFrontEnd.from_preprocessor_config(CLAP_PREPROCESS)


def create_model(cfg: ModelConfig | str = "tiny"):
    """Build the tri-modal model; logs which tower got which weights."""
    cfg = resolve_model_config(cfg)
    clip, clip_cfg, image_fe, clip_source = create_clip(cfg.clip_model, cfg.clip_pretrained)
    audio, audio_cfg, audio_fe, audio_source = create_audio(cfg.audio_model)
    sources = {"image+text": clip_source, "audio": audio_source}
    for tower, src in sources.items():
        if src:
            log.info("%s tower: pretrained weights from %s", tower, src)
        else:
            msg = f"{tower} tower of model {cfg.name!r} is RANDOMLY INITIALISED (no pretrained weights)"
            if cfg.require_pretrained:
                raise PretrainedWeightsError(msg + "; require_pretrained is set")
            warnings.warn(msg, RandomTowerWarning, stacklevel=2)
    log.info("audio adapter + logit scale: new parameters (trained by BioVITA)")
    arch = {
        "name": cfg.name,
        "clip_config": clip_cfg,
        "audio_config": audio_cfg,
        "image_front_end": asdict(image_fe),
        "audio_front_end": asdict(audio_fe),
        "sources": sources,
    }
    return BioVITA(clip, audio, arch, init_temperature=cfg.init_temperature)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def quiet_open_clip(random_is_expected: bool = False):
    """open_clip narrates model creation on the root logger (six INFO lines per model in
    every Ray worker) and warns that a model built without a pretrained tag is random, also
    when trained weights are loaded right after."""
    root = logging.getLogger()
    level, f = root.level, _DropRandomInitWarning()
    root.setLevel(max(level, logging.WARNING))
    if random_is_expected:
        root.addFilter(f)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeFilter(f)


def build_from_arch(arch: dict):
    """Rebuild the architecture (random weights) from a checkpoint's `arch`; no network."""
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    clip, _ = random_clip(arch["clip_config"])
    audio = ClapAudioModelWithProjection(ClapAudioConfig(**arch["audio_config"]))
    return BioVITA(clip, audio, arch)
