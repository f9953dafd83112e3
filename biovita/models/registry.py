"""Named model configurations (timm-style registry), importable without torch.

A name fixes the image/text tower, the audio tower and the front ends; `biovita list-models`
prints them. A run's `model:` section is a `ModelConfig`; its empty fields are filled from here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    clip_model: str  # open_clip name or hf-hub:/local-dir: reference
    clip_pretrained: str  # open_clip pretrained tag / file, "" for none
    audio_model: str  # "tiny", "htsat" (random full size), hub id or folder
    pretrained: bool  # whether the image/text towers come with real weights
    audio_preprocess: dict = field(default_factory=dict)  # ClapFeatureExtractor-style settings


# CLAP HTS-AT front end as in laion/clap-htsat-unfused's preprocessor_config.json.
CLAP_PREPROCESS = {
    "sampling_rate": 48000,
    "feature_size": 64,
    "fft_window_size": 1024,
    "hop_length": 480,
    "frequency_min": 50,
    "frequency_max": 14000,
    "max_length_s": 10,
    "truncation": "rand_trunc",
}

# Tiny open_clip config, registered with open_clip under this name when first used. Patches of
# 8 px (64 tokens): with 16 px (16 tokens) the synthetic species' patterns were lost and the
# embedded run's image directions stalled at ~64 % Top-1 (I2T); 8 px costs 41 vs 34 ms a step.
TINY_CLIP_NAME = "biovita-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Tiny HTS-AT (transformers ClapAudioConfig kwargs); hidden = patch_embeds_hidden * 2**(depths-1).
TINY_AUDIO_CONFIG = {
    "patch_embeds_hidden_size": 16,
    "hidden_size": 128,
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 2, 4, 8],
    "projection_dim": 64,
    "projection_hidden_size": 64,
}

@dataclass
class ModelConfig:
    name: str = "tiny"  # a registered config (`biovita list-models`), filled into the fields below
    clip_model: str = ""  # open_clip name, hf-hub:org/repo, local-dir:/path or checkpoint folder
    clip_pretrained: str = ""  # open_clip pretrained tag or weights file ("" = random / from hub id)
    audio_model: str = ""  # "tiny", a hub id like laion/clap-htsat-unfused, or a save_pretrained folder
    require_pretrained: bool = False
    init_temperature: float = 0.07
    # start training from a trained model instead of the towers above: a biovita folder, the
    # released layout (hf-hub:risashinoda/BioVITA or a folder) or an authors' .pth
    init_checkpoint: str = ""
    clap: str = ""  # CLAP base of the released layouts ("" = laion/clap-htsat-unfused)


MODEL_CONFIGS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    MODEL_CONFIGS[spec.name] = spec
    return spec


register(
    ModelSpec(
        name="tiny",
        description="3.4M-param CLIP + 0.3M HTS-AT, random init: tests and the embedded run",
        clip_model=TINY_CLIP_NAME,
        clip_pretrained="",
        audio_model="tiny",
        pretrained=False,
        audio_preprocess=CLAP_PREPROCESS,
    )
)
register(
    ModelSpec(
        name="bioclip2-clap",
        description="BioVITA as published: BioCLIP 2 (ViT-L/14, 768-d) + CLAP HTS-AT unfused",
        clip_model="hf-hub:imageomics/bioclip-2",
        clip_pretrained="",
        audio_model="laion/clap-htsat-unfused",
        pretrained=True,
        audio_preprocess=CLAP_PREPROCESS,
    )
)
register(
    ModelSpec(
        name="vit-l14-htsat-random",
        description="The published architecture with random weights (shape and memory checks)",
        clip_model="ViT-L-14",
        clip_pretrained="",
        audio_model="htsat",
        pretrained=False,
        audio_preprocess=CLAP_PREPROCESS,
    )
)


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in MODEL_CONFIGS if fnmatch.fnmatch(n, pattern))


def resolve_model_config(cfg: ModelConfig | str) -> ModelConfig:
    """Fill empty fields of a ModelConfig from its registered name."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    spec = MODEL_CONFIGS[cfg.name]
    return replace(cfg, clip_model=cfg.clip_model or spec.clip_model,
                   clip_pretrained=cfg.clip_pretrained or spec.clip_pretrained,
                   audio_model=cfg.audio_model or spec.audio_model)
