import subprocess
import sys
from pathlib import Path

import pytest

from biovita.config import DEFAULT_CONFIG, load_config
from biovita.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_loads_and_overrides_apply(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["train.num_workers=3", "stage1.lr=2e-4",
                                       "stage2.phase2.batch_size=8", f"data.root={tmp_path}"])
    assert cfg.train.num_workers == 3
    assert cfg.stage1.lr == pytest.approx(2e-4)
    assert cfg.stage2.phase2.batch_size == 8
    # untouched nested defaults survive a partial override
    import yaml

    assert cfg.stage2.phase2.epochs == yaml.safe_load(DEFAULT_CONFIG.read_text())["stage2"]["phase2"]["epochs"]
    assert cfg.flat()["train.num_workers"] == 3


def test_paper_recipe_has_method_numbers():
    cfg = load_config("bioclip2_clap", ["data.synth_if_missing=true"])
    assert cfg.model.name == "bioclip2-clap"
    assert (cfg.stage1.epochs, cfg.stage1.batch_size, cfg.stage1.lr, cfg.stage1.weight_decay) == (30, 64, 1e-4, 0.05)
    assert (cfg.stage2.phase1.epochs, cfg.stage2.phase2.epochs, cfg.stage2.phase2.batch_size) == (10, 10, 32)
    s2 = cfg.stage2
    assert (s2.w_atc, s2.w_aic, s2.text_lr, s2.text_weight_decay) == (0.8, 0.2, 5e-6, 0.01)
    assert (s2.upper_audio_lr, s2.upper_audio_weight_decay, s2.upper_audio_unfreeze_step) == (1e-5, 0.02, 300)
    assert (s2.logit_reset_temperature, s2.logit_freeze_steps) == (0.2, 600)
    assert (s2.lam_av_max, s2.lam_av_ramp_steps, s2.lam_vt_max, s2.lam_vt_ramp_steps) == (0.1, 600, 0.1, 300)
    assert (s2.gate_alpha, s2.gate_off_ratio, s2.gate_on_ratio, s2.gate_patience, s2.baseline_batches) == (0.2, 1.03, 1.015, 20, 20)
    assert s2.betas == (0.9, 0.98) and s2.eps == 1e-8 and cfg.train.grad_clip == 1.0
    assert (cfg.data.per_species_cap, cfg.data.per_species_min, cfg.data.triplets_per_species) == (20, 5, 20)
    assert cfg.train.num_workers == 8 and cfg.train.use_gpu


@pytest.mark.parametrize("override, key", [
    ("train.nope=1", "train.nope"),
    ("stage1.batch_size=-4", "stage1.batch_size"),
    ("stage1.batch_size=abc", "stage1.batch_size"),
    ("data.per_species_cap=2", "data.per_species_cap"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("model.name=resnet", "model.name"),
    ("train.use_gpu=maybe", "train.use_gpu"),
    ("stage2.gate_on_ratio=1.5", "stage2.gate_on_ratio"),
    ("data.decode_ahead_mb=0", "data.decode_ahead_mb"),
])
def test_bad_values_name_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, [override, f"data.root={tmp_path}"])
    assert str(e.value).startswith(key)


def test_missing_data_path_is_reported():
    with pytest.raises(ConfigError, match="data.root: path /nonexistent/store does not exist"):
        load_config(DEFAULT_CONFIG, ["data.root=/nonexistent/store", "data.synth_if_missing=false"])


def test_config_by_packaged_name_or_path(tmp_path):
    assert load_config("bioclip2_clap", ["data.synth_if_missing=true"]).model.name == "bioclip2-clap"
    with pytest.raises(ConfigError, match="packaged configs: bioclip2_clap, default"):
        load_config("nope")


def test_bad_config_fails_before_ray_starts():
    """The main job exits 2 with the key named, and never starts Ray."""
    r = subprocess.run([sys.executable, str(ROOT / "ray_jobs" / "train.py"), "stage1.batch_size=-1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert "stage1.batch_size: must be >= 2" in r.stderr
    assert "Ray" not in r.stdout + r.stderr.replace("stage1", "")
    assert "Started a local Ray instance" not in r.stdout + r.stderr
