import json

import pytest
import torch

from biovita.errors import CheckpointError, PretrainedWeightsError
from biovita.models.checkpoint import load_model, save_model
from biovita.models.factory import create_model
from biovita.models.registry import list_models


def _inputs(model):
    fe = model.image_front_end
    return (torch.randn(2, 1, 1001, 64), torch.randn(2, 3, fe.image_size, fe.image_size),
            model.tokenizer()(["Aves Passeriformes", "a frog"]))


def test_tiny_model_encodes_normalised(tiny_model):
    mel, px, tok = _inputs(tiny_model)
    with torch.no_grad():
        out = tiny_model(mel, px, tok)
    for k in ("audio", "image", "text"):
        assert out[k].shape == (2, tiny_model.embed_dim)
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(2))
    assert tiny_model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert tiny_model.adapter.bias is None


def test_registry_lists_real_configs():
    names = list_models()
    assert {"tiny", "bioclip2-clap", "vit-l14-htsat-random"} <= set(names)
    assert list_models("*clap*") == ["bioclip2-clap"]


def test_clip_config_registration_leaves_no_file(tmp_path, monkeypatch):
    """Every process registers its open_clip configs; none may leave a folder behind."""
    import open_clip

    from biovita.models.factory import register_clip_config
    from biovita.models.registry import TINY_CLIP_CONFIG

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    register_clip_config("biovita-test-a", TINY_CLIP_CONFIG)
    register_clip_config("biovita-test-b", TINY_CLIP_CONFIG)  # open_clip rescans its paths
    assert {"biovita-test-a", "biovita-test-b"} <= set(open_clip.list_models())
    assert open_clip.get_model_config("biovita-test-a") == TINY_CLIP_CONFIG
    assert list(tmp_path.iterdir()) == []


def test_real_architecture_builds():
    """The published architecture (ViT-L/14 768-d + HTS-AT 512->768 adapter), random weights."""
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        m = create_model("vit-l14-htsat-random")
    assert m.embed_dim == 768 and m.adapter.weight.shape == (768, 512)
    n = sum(p.numel() for p in m.parameters())
    assert 440e6 < n < 470e6  # ViT-L/14 CLIP 427.6M + HTS-AT 28.2M + adapter 0.4M
    del m


def test_require_pretrained_raises_for_random_towers():
    from biovita.config import ModelConfig

    with pytest.raises(PretrainedWeightsError, match="require_pretrained"):
        create_model(ModelConfig(name="tiny", require_pretrained=True))


def test_towers_load_from_real_file_formats(tmp_path, tiny_model):
    """open_clip checkpoint folder (local-dir: layout) + transformers save_pretrained folder."""
    from biovita.config import ModelConfig
    from biovita.models.registry import TINY_CLIP_CONFIG

    oc = tmp_path / "openclip"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    sd = {k: v.reshape(()) if k == "logit_scale" else v for k, v in tiny_model.clip.state_dict().items()}
    torch.save(sd, oc / "open_clip_pytorch_model.bin")
    clap = tmp_path / "clap"
    tiny_model.audio.save_pretrained(clap)
    from transformers import ClapFeatureExtractor

    ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc").save_pretrained(clap)

    m = create_model(ModelConfig(name="tiny", clip_model=str(oc), audio_model=str(clap),
                                 require_pretrained=True))
    assert m.arch["sources"]["image+text"].startswith("local-dir:")
    assert m.arch["sources"]["audio"] == str(clap)
    assert m.image_front_end.mean == (0.5, 0.5, 0.5)
    assert m.audio_front_end.f_min == 50 and m.audio_front_end.truncation == "rand_trunc"
    for (k, a), b in zip(tiny_model.clip.state_dict().items(), m.clip.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    for a, b in zip(tiny_model.audio.state_dict().values(), m.audio.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_checkpoint_round_trip_identical_embeddings(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ck", metadata={"taxa": ["a"]})
    m2 = load_model(tmp_path / "ck")
    mel, px, tok = _inputs(tiny_model)
    tiny_model.eval()
    with torch.no_grad():
        a, b = tiny_model(mel, px, tok), m2(mel, px, tok)
    for k in ("audio", "image", "text"):
        assert torch.equal(a[k], b[k])
    assert m2.checkpoint_metadata == {"taxa": ["a"]}


def test_tampered_checkpoint_is_rejected(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "ck")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_model(path)
    with pytest.raises(CheckpointError, match="neither a biovita checkpoint"):
        load_model(tmp_path)
