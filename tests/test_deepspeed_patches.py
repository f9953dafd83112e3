"""biovita's DeepSpeed patches (`biovita/train/deepspeed_patches.py`) against DeepSpeed's own
code, on real ZeRO-2 engines over gloo: the same gradient norm, clipping and update; a
step with non-finite gradients applied with zero gradients; another version refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from biovita.train import deepspeed_patches


pytestmark = pytest.mark.usefixtures("gloo")


@pytest.fixture
def deepspeed_own(monkeypatch):
    """DeepSpeed's code, as shipped, for the length of a test."""
    from deepspeed.runtime import utils
    from deepspeed.runtime.zero import stage_1_and_2

    opt = stage_1_and_2.DeepSpeedZeroOptimizer
    monkeypatch.setattr(opt, "get_grad_norm_direct", deepspeed_patches._original_norm)
    monkeypatch.setattr(opt, "unscale_and_clip_grads", deepspeed_patches._original_clip)
    monkeypatch.setattr(stage_1_and_2, "is_invalid_grad_norm", utils.is_invalid_grad_norm)


def _engine(clip: float):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": clip,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30})
    return engine


def _train(engine, inputs: list[torch.Tensor]) -> list[float]:
    norms = []
    for x in inputs:
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return norms


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [10 * torch.randn(4, 16, generator=g) for _ in range(n)]


def _patched_run(clip: float):
    deepspeed_patches.apply()
    engine = _engine(clip)
    assert engine.optimizer.get_grad_norm_direct.__func__ is deepspeed_patches._grad_norm_foreach
    return _train(engine, _inputs(3)), _params(engine)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_patched_norm_clip_and_update_equal_deepspeed_own(clip, request):
    """Gradients large enough that clipping at 0.05 acts on every step."""
    patched_norms, patched = _patched_run(clip)
    request.getfixturevalue("deepspeed_own")
    engine = _engine(clip)
    own_norms = _train(engine, _inputs(3))
    assert patched_norms == pytest.approx(own_norms, rel=1e-5)
    assert min(own_norms) > 10 * 0.05
    for a, b in zip(patched, _params(engine)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_non_finite_step_is_applied_with_zero_gradients():
    """The validity decision stays on the device: the first step's gradients are NaN, so its
    Adam update is zero (no moments yet) and the weights stay as they were, finite; the next
    step trains as usual."""
    deepspeed_patches.apply()
    engine = _engine(clip=1.0)
    before = _params(engine)
    bad, good = _inputs(2)
    bad[0, 0] = float("nan")
    _train(engine, [bad])
    after = _params(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    _train(engine, [good])
    assert all(torch.isfinite(p).all() for p in _params(engine))
    assert any(not torch.equal(a, b) for a, b in zip(after, _params(engine)))


def test_another_deepspeed_version_is_refused():
    r = subprocess.run([sys.executable, "-c", "import deepspeed; deepspeed.__version__ = '9.9.9'; "
                        "import biovita.train.deepspeed_patches"], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"written for DeepSpeed {deepspeed_patches.DEEPSPEED_VERSION}; this environment has 9.9.9" \
        in r.stderr
