import math

import pytest
import torch

from biovita.config import Stage2Config, StageConfig
from biovita.train import freeze, schedules
from biovita.train.stages import PHASE1, PHASE2, STAGE0, STAGE1, STAGES

S2 = Stage2Config()
ST = StageConfig(lr=1e-4, weight_decay=0.05)


def test_ramps_follow_method():
    assert schedules.linear_ramp(0, 600, 0.1) == 0
    assert schedules.linear_ramp(300, 600, 0.1) == pytest.approx(0.05)
    assert schedules.linear_ramp(600, 600, 0.1) == pytest.approx(0.1)
    assert schedules.linear_ramp(5000, 600, 0.1) == pytest.approx(0.1)
    w = schedules.phase2_weights(150, S2, gate_open=True)
    assert (w.lam_av, w.lam_vt) == (pytest.approx(0.025), pytest.approx(0.05))
    assert schedules.phase2_weights(150, S2, gate_open=False).lam_av == 0


def test_gate_closes_above_103_and_reopens_after_20_calm_steps():
    g = schedules.ATCGate(baseline=1.0)
    assert float(g.ema) == 1.0  # the EMA starts at the baseline
    assert g.update(torch.tensor(1.0)) and float(g.ema) == 1.0
    # EMA (alpha 0.2) crosses 1.03 after the first high step (1.04) and stays above
    opens = [bool(g.update(torch.tensor(1.2))) for _ in range(3)]
    assert float(g.ema) == pytest.approx(1.0 * 0.8 ** 3 + 1.2 * (1 - 0.8 ** 3))
    assert opens == [False, False, False]
    # back to baseline: EMA decays to <= 1.015, then 20 consecutive calm steps
    steps = 0
    while not g.update(1.0):
        steps += 1
        assert steps < 100
    calm_needed = 20
    assert steps >= calm_needed - 1
    # a calm streak broken by a spike restarts the count
    g2 = schedules.ATCGate(baseline=1.0, ema=1.5, open=False)
    for _ in range(15):
        g2.update(0.5)
    g2.update(3.0)
    assert not g2.open and int(g2.calm_steps) == 0
    state = g.state_dict()
    assert schedules.ATCGate.from_state(state).state_dict() == state


def test_gate_on_the_device_decides_as_the_host_rules_say():
    """The tensor gate against the rules written out on the host, over random ATC paths."""
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(50):
        base, patience = float(rng.uniform(0.5, 3)), int(rng.integers(1, 25))
        g = schedules.ATCGate(baseline=base, patience=patience)
        ema, is_open, calm = base, True, 0
        for x in base * (1 + rng.normal(0, 0.05, 200)).cumsum() / np.arange(1, 201):
            ema = 0.2 * x + 0.8 * ema
            if is_open:
                if ema > 1.03 * base:
                    is_open, calm = False, 0
            else:
                calm = calm + 1 if ema <= 1.015 * base else 0
                if calm >= patience:
                    is_open, calm = True, 0
            assert bool(g.update(torch.tensor(float(x), dtype=torch.float64))) == is_open
            assert int(g.calm_steps) == calm and float(g.ema) == pytest.approx(ema, abs=1e-12)


def test_guard_term():
    assert schedules.guard(torch.tensor(1.0), 1.0).item() == 0
    assert schedules.guard(torch.tensor(1.13), 1.0).item() == pytest.approx(2 * 0.1)


def test_phase2_loss_composition():
    w = schedules.Phase2Weights(0.1, 0.05, True)
    loss = schedules.phase2_loss(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0), 1.5, w, S2)
    assert loss.item() == pytest.approx(2.0 + 0.3 + 0.2 + 2 * (2.0 - 1.03 * 1.5))


def test_freeze_plan_by_stage_and_step():
    assert "image" not in set().union(*(s.trainable for s in STAGES[1:]))
    assert "text" not in STAGE1.trainable
    assert "text" not in PHASE1.trainable
    assert "text" in PHASE2.trainable
    assert "audio" in STAGE1.trainable
    assert "audio" not in PHASE2.trainable
    assert not PHASE2.role_active("audio_upper", 299, S2)
    assert PHASE2.role_active("audio_upper", 300, S2)
    assert not PHASE2.role_active("logit_scale", 599, S2)
    assert PHASE2.role_active("logit_scale", 600, S2)
    assert PHASE1.role_active("audio_upper", 0, S2)
    assert STAGE0.trainable == {"image", "text", "clip_scale"}


def test_param_groups_lr_decay_and_requires_grad(tiny_model):
    model = tiny_model
    groups = freeze.param_groups(model, PHASE2, ST, S2)
    by = {g["name"]: g for g in groups}
    assert by["text.decay"]["lr"] == 5e-6 and by["text.decay"]["weight_decay"] == 0.01
    assert by["adapter.decay"]["lr"] == 1e-4 and by["adapter.decay"]["weight_decay"] == 0.05
    assert by["audio_upper.decay"]["lr"] == 1e-5 and by["audio_upper.decay"]["weight_decay"] == 0.02
    assert by["logit_scale.no_decay"]["weight_decay"] == 0
    assert all(g["weight_decay"] == 0 for n, g in by.items() if n.endswith("no_decay"))
    # norms and biases never decay
    nd = {id(p) for g in groups if g["name"].endswith("no_decay") for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad and (name.endswith(".bias") or "norm" in name):
            assert id(p) in nd, name
    assert not any(p.requires_grad for p in model.image_parameters())
    rest = [p for n, p in freeze.named_roles(model)["audio"]]
    assert rest and not any(p.requires_grad for p in rest)
    # every parameter is in exactly one role
    roles = freeze.named_roles(model)
    assert sum(len(v) for v in roles.values()) == len(list(model.parameters()))

    opt = torch.optim.AdamW(groups)
    freeze.apply_delays(model, opt, PHASE2, 10, S2)  # before both delayed starts
    active = {g["name"]: g["active"] for g in opt.param_groups}
    assert not active["audio_upper.decay"] and not active["logit_scale.no_decay"] and active["text.decay"]
    assert not model.logit_scale.requires_grad  # no gradient until its step
    upper = {id(p) for p in model.upper_audio_parameters("released")}
    assert upper and not any(p.requires_grad for p in model.audio.parameters() if id(p) in upper)
    freeze.apply_delays(model, opt, PHASE2, 600, S2)
    assert all(g["active"] for g in opt.param_groups) and model.logit_scale.requires_grad
    assert all(p.requires_grad for p in model.audio.parameters() if id(p) in upper)
    assert not any(p.requires_grad for p in model.audio.parameters() if id(p) not in upper)

    freeze.param_groups(model, STAGE1, ST, S2)
    assert all(p.requires_grad for p in model.audio.parameters())
    assert not any(p.requires_grad for p in model.text_parameters())


def test_released_upper_audio_set_is_the_authors(tiny_model):
    """The parameters whose ClapModel name contains proj / final_layer / layers.11: on HTS-AT
    the audio projection and the patch embedding's convolution, no Swin block (docs/method.md)."""
    names = {n for n, p in tiny_model.audio.named_parameters()
             if id(p) in {id(q) for q in tiny_model.upper_audio_parameters("released")}}
    assert names == {"audio_model.audio_encoder.patch_embed.proj.weight",
                     "audio_model.audio_encoder.patch_embed.proj.bias",
                     "audio_projection.linear1.weight", "audio_projection.linear1.bias",
                     "audio_projection.linear2.weight", "audio_projection.linear2.bias"}
    last = {id(p) for p in tiny_model.upper_audio_parameters("last_stage")}
    assert any(id(p) in last for p in tiny_model.audio.audio_model.audio_encoder.layers[-1].parameters())


def test_logit_scale_reset():
    p = torch.nn.Parameter(torch.tensor([4.6]))
    freeze.reset_logit_scale(p, 0.2)
    assert p.item() == pytest.approx(math.log(5))
