"""The released BioVITA layouts, written here with open_clip and transformers directly (never
through biovita), then read back through biovita: embeddings equal the ones computed directly
with open_clip + ClapModel + the adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

DIM, PROJ = 48, 32  # open_clip embed dim, CLAP projection dim
OC_CFG = {"embed_dim": DIM,
          "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
AUDIO_CFG = {"patch_embeds_hidden_size": 16, "hidden_size": 128, "depths": [1, 1, 1, 1],
             "num_attention_heads": [1, 2, 4, 8], "projection_dim": PROJ, "projection_hidden_size": 64}
TEXT_CFG = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 37, "projection_dim": PROJ, "max_position_embeddings": 40}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny model in the three layouts + its CLAP base folder, and the reference towers."""
    import open_clip
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(3)
    cfg_file = root / "test-tiny-oc.json"
    cfg_file.write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(cfg_file)
    oc = open_clip.create_model("test-tiny-oc", pretrained=None).eval()
    clap = ClapModel(ClapConfig(audio_config=AUDIO_CFG, text_config=TEXT_CFG, projection_dim=PROJ)).eval()
    base = root / "clap-base"  # what --clap points to: architecture + preprocessor config
    clap.save_pretrained(base)
    ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc").save_pretrained(base)
    adapter = torch.randn(DIM, PROJ)
    official = root / "official"
    official.mkdir()
    (official / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": PREPROCESS}))
    torch.save(oc.state_dict(), official / "open_clip_pytorch_model.bin")
    torch.save({"clap_audio": clap.state_dict(), "audio_adapter": {"weight": adapter}},
               official / "clap_weights.pth")
    training = root / "epoch_10.pth"
    state = {**{f"module.oc_model.{k}": v for k, v in oc.state_dict().items()},
             **{f"module.clap_audio.{k}": v for k, v in clap.state_dict().items()},
             "module.audio_adapter.weight": adapter, "module.logit_scale": torch.tensor(2.5)}
    torch.save({"state_dict": state, "epoch": 10}, training)
    oc_dir = root / "oc-config"  # the model config of a training checkpoint names its towers
    oc_dir.mkdir()
    (oc_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG, "preprocess_cfg": PREPROCESS}))
    return {"root": root, "official": official, "training": training, "base": base, "oc_dir": oc_dir,
            "oc": oc, "clap": clap, "adapter": adapter}


@pytest.fixture(scope="module")
def media(release):
    """A 12 s, 22.05 kHz stereo WAV that starts 3 s in, and a PNG photo."""
    from PIL import Image

    sr, rng = 22050, np.random.default_rng(0)
    t = np.arange(12 * sr) / sr
    x = np.where(t > 3, 0.4 * np.sin(2 * np.pi * 900 * t) * (np.sin(2 * np.pi * 4 * t) > 0), 0.0)
    x = (x + 0.005 * rng.standard_normal(len(t))).astype(np.float32)
    wav = release["root"] / "call.wav"
    sf.write(wav, np.stack([x, 0.8 * x], 1), sr, subtype="PCM_16")
    png = release["root"] / "frog.png"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(png)
    return wav, png


def _reference(release, wav, png):
    """Embeddings as the authors' extractor computes them: decode, mono, 48 kHz, onset crop to
    10 s, the CLAP checkpoint's feature extractor, ClapModel, the adapter; the image with
    open_clip's own preprocess."""
    import open_clip
    import torchaudio
    from PIL import Image
    from transformers import ClapFeatureExtractor

    x, sr = sf.read(wav, dtype="float32", always_2d=True)
    w = torchaudio.functional.resample(torch.from_numpy(x.mean(1)), sr, 48000).numpy()
    first = int(np.flatnonzero(np.abs(w) > 0.01 * np.abs(w).max())[0])
    start = max(0, first - int(0.2 * 48000))
    clip = np.zeros(480000, np.float32)
    piece = w[start:start + 480000]
    clip[:len(piece)] = piece
    fx = ClapFeatureExtractor.from_pretrained(release["base"])
    feats = fx(clip, sampling_rate=48000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        a = release["clap"].get_audio_features(input_features=feats).pooler_output
        audio = torch.nn.functional.normalize(a @ release["adapter"].T, dim=-1)[0]
        pre = open_clip.image_transform(64, is_train=False, mean=PREPROCESS["mean"], std=PREPROCESS["std"])
        image = release["oc"].encode_image(pre(Image.open(png).convert("RGB"))[None], normalize=True)[0]
    return audio, image


def _embed(model, wav, png):
    from biovita.frontends.audio import load_clip, log_mel
    from biovita.frontends.image import load_image

    fe = model.audio_front_end
    with torch.no_grad():
        audio = model.encode_audio(log_mel(fe)(load_clip(Path(wav).read_bytes(), fe, "onset")))[0]
        px = torch.from_numpy(load_image(Path(png).read_bytes(), model.image_front_end))[None]
        return audio, model.encode_image(px)[0]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_official_training_and_biovita_layouts_embed_as_the_reference(release, media, tmp_path):
    from biovita.config import ModelConfig
    from biovita.models.checkpoint import load_model, save_model

    ref_audio, ref_image = _reference(release, *media)
    official = load_model(release["official"], clap=str(release["base"]))
    assert official.audio_front_end.f_min == 50 and official.audio_front_end.truncation == "rand_trunc"
    assert official.image_front_end.mean == tuple(PREPROCESS["mean"])
    assert official.checkpoint_metadata["clap_text_tensors_skipped"] > 0  # counted, not errors
    cfg = ModelConfig(name="tiny", clip_model=str(release["oc_dir"]), audio_model=str(release["base"]))
    training = load_model(release["training"], model=cfg)
    assert training.logit_scale.item() == pytest.approx(2.5)
    save_model(official, tmp_path / "bv")
    own = load_model(tmp_path / "bv")
    for model in (official, training, own):
        audio, image = _embed(model, *media)
        assert _cos(audio, ref_audio) >= 0.9999 and _cos(image, ref_image) >= 0.9999


def test_export_official_round_trip_is_identical(release, media, tmp_path):
    from biovita.models.checkpoint import load_model
    from biovita.models.release import export_official

    model = load_model(release["official"], clap=str(release["base"]))
    out = export_official(model, tmp_path / "exported", clap=str(release["base"]))
    assert sorted(p.name for p in out.iterdir()) == ["clap_weights.pth", "open_clip_config.json",
                                                     "open_clip_pytorch_model.bin"]
    weights = torch.load(out / "clap_weights.pth", weights_only=True)
    assert any(k.startswith("text_model.") for k in weights["clap_audio"])  # a whole ClapModel
    back = load_model(out, clap=str(release["base"]))
    for a, b in zip(_embed(model, *media), _embed(back, *media)):
        assert torch.equal(a, b)


def test_bad_checkpoints_fail_naming_file_and_key(release, tmp_path):
    import shutil

    from biovita.errors import CheckpointError
    from biovita.models.checkpoint import load_model

    broken = tmp_path / "broken"
    shutil.copytree(release["official"], broken)
    (broken / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="open_clip_pytorch_model.bin: file not found"):
        load_model(broken, clap=str(release["base"]))
    shutil.copy(release["official"] / "open_clip_pytorch_model.bin", broken)
    torch.save({"clap_audio": release["clap"].state_dict(), "audio_adapter": {"weight": torch.zeros(3, 3)}},
               broken / "clap_weights.pth")
    with pytest.raises(CheckpointError, match=r"clap_weights.pth: audio_adapter tensor 'weight' has shape \(3, 3\)"):
        load_model(broken, clap=str(release["base"]))
    state = {k: v for k, v in release["clap"].state_dict().items() if "patch_embed.proj.weight" not in k}
    torch.save({"clap_audio": state, "audio_adapter": {"weight": release["adapter"]}}, broken / "clap_weights.pth")
    with pytest.raises(CheckpointError, match="lacks the tensor 'audio_model.audio_encoder.patch_embed.proj.weight'"):
        load_model(broken, clap=str(release["base"]))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth: not a checkpoint"):
        load_model(junk)


@pytest.mark.slow
def test_cli_embed_and_predict_with_an_official_folder(release, media, tmp_path):
    import pyarrow.parquet as pq

    wav, png = media
    out = tmp_path / "emb.parquet"
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "embed", str(release["official"]), "--clap",
                        str(release["base"]), "--files", str(wav), str(png), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t = pq.read_table(out).to_pylist()
    assert sorted(row["modality"] for row in t) == ["audio", "image"]
    ref_audio, ref_image = _reference(release, wav, png)
    got = {row["modality"]: torch.tensor(row["embedding"]) for row in t}
    assert _cos(got["audio"], ref_audio) >= 0.9999 and _cos(got["image"], ref_image) >= 0.9999
    taxa = tmp_path / "taxa.csv"
    taxa.write_text("class,order,family,genus,scientific_name,common_name\n"
                    "Amphibia,Anura,Hylidae,Hyla,Hyla arborea,tree frog\n"
                    "Aves,Passeriformes,Paridae,Parus,Parus major,great tit\n")
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "predict", str(release["official"]), "--clap",
                        str(release["base"]), str(wav), "--taxa", str(taxa), "--k", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and {lines[1].split()[2], lines[2].split()[2]} == {"1", "2"}
