"""The tri-modal BioVITA model: open_clip image/text towers + CLAP HTS-AT audio tower + adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biovita.frontends.audio import AudioFrontEnd
from biovita.frontends.image import ImageFrontEnd, normalize


class BioVITA(nn.Module):
    """Embeds audio (log-mel), images (pixels) and text (tokens) into one L2-normalised space.

    `arch` holds everything needed to rebuild the architecture without network access
    (open_clip model config, CLAP audio config, front ends); it travels with checkpoints.
    """

    def __init__(
        self,
        clip: nn.Module,
        audio: nn.Module,
        arch: dict[str, Any],
        init_temperature: float = 0.07,
    ):
        super().__init__()
        self.clip = clip
        self.audio = audio
        self.arch = arch
        audio_dim = int(arch["audio_config"]["projection_dim"])
        self.embed_dim = int(arch["clip_config"]["embed_dim"])
        self.adapter = nn.Linear(audio_dim, self.embed_dim, bias=False)
        # 1-element (not 0-dim) scalars: DeepSpeed cannot broadcast 0-dim parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        for name in ("logit_scale", "logit_bias"):
            p = getattr(clip, name, None)
            if isinstance(p, nn.Parameter) and p.ndim == 0:
                setattr(clip, name, nn.Parameter(p.detach().reshape(1)))

    # -- front ends -------------------------------------------------------------------------
    @property
    def audio_front_end(self) -> AudioFrontEnd:
        return AudioFrontEnd(**self.arch["audio_front_end"])

    @property
    def image_front_end(self) -> ImageFrontEnd:
        d = dict(self.arch["image_front_end"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return ImageFrontEnd(**d)

    def tokenizer(self):
        import open_clip

        text_cfg = self.arch["clip_config"].get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                         context_length=text_cfg.get("context_length", 77))
        return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))

    # -- encoders ---------------------------------------------------------------------------
    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Un-normalised 512-d (projection) CLAP embedding of (B, 1, T, mels) log-mels."""
        return self.audio(input_features=mel).audio_embeds

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.adapter(self.audio_features(mel)), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels`: uint8 as biovita decodes them (normalised here, in float32, then cast to
        the tower's dtype) or floats already normalised, as open_clip's preprocess returns."""
        if pixels.dtype == torch.uint8:
            dtype = next(self.clip.visual.parameters()).dtype
            pixels = normalize(pixels, self.image_front_end).to(dtype)
        return self._clip(image=pixels)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._clip(text=tokens)[1]

    def _clip(self, image=None, text=None):
        """(image features, text features, exp of open_clip's logit scale) through open_clip's
        `forward`, features L2-normalised: under ZeRO-3 a module's own parameters (CLIP's
        positional embedding, text projection, logit scale) are gathered only around its
        forward, not around a method like `encode_text`."""
        out = self.clip(image=image, text=text)
        if isinstance(out, dict):
            return out.get("image_features"), out.get("text_features"), out["logit_scale"]
        return out[0], out[1], out[2]

    def logit_scales(self) -> dict[str, torch.Tensor]:
        """exp of BioVITA's logit scale ("model") and of open_clip's ("clip", stage 0's), as a
        forward computes them (ZeRO-3 gathers them only there)."""
        return self(scales_only=True)

    def logit_scale_param(self, kind: str) -> nn.Parameter:
        """The parameter behind `logit_scales()[kind]`: BioVITA's ("model") or open_clip's ("clip")."""
        return {"model": self.logit_scale, "clip": self.clip.logit_scale}[kind]

    def embed_texts(self, texts: list[str], batch_size: int = 256):
        """L2-normalised embeddings (numpy, float32) of strings, tokenized here."""
        import numpy as np

        tok = self.tokenizer()
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                tokens = tok(texts[i:i + batch_size]).to(self.logit_scale.device)
                out.append(self.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def forward(self, mel=None, pixels=None, tokens=None, scales_only: bool = False
                ) -> dict[str, torch.Tensor]:
        if scales_only:
            return {"model": self.logit_scale.exp(), "clip": self._clip()[2]}
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if mel is not None:
            out["audio"] = self.encode_audio(mel)
        if pixels is not None:
            out["image"] = self.encode_image(pixels)
        if tokens is not None:
            out["text"] = self.encode_text(tokens)
        return out

    # -- parameter groups by tower (used by the freeze plan and the optimizer) --------------
    def image_parameters(self):
        return self.clip.visual.parameters()

    def text_parameters(self):
        visual = {id(p) for p in self.clip.visual.parameters()}
        # open_clip's own logit scale belongs to stage 0 (the image-text base model)
        return [p for n, p in self.clip.named_parameters() if id(p) not in visual]

    # What the released code unfreezes in phase 2: the parameters whose transformers ClapModel
    # name contains one of these (docs/method.md); on HTS-AT that is the audio projection and the
    # patch embedding's convolution, no Swin block.
    RELEASED_UPPER_AUDIO = ("proj", "final_layer", "layers.11")

    def upper_audio_parameters(self, selection: str = "released") -> list[nn.Parameter]:
        """The audio parameters phase 2 unfreezes: "released" (the authors' code, default) or
        "last_stage" (a deviation: projection, final norm and the last HTS-AT stage, the
        paper's "upper layers" read literally)."""
        if selection == "released":
            return [p for n, p in self.audio.named_parameters()
                    if any(k in n for k in self.RELEASED_UPPER_AUDIO)]
        if selection == "last_stage":
            enc = self.audio.audio_model.audio_encoder
            mods = [self.audio.audio_projection, enc.norm, enc.layers[-1]]
            return [p for m in mods for p in m.parameters()]
        raise ValueError(f"unknown upper-audio selection {selection!r} (released, last_stage)")
