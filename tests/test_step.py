"""The training step itself, through the worker loop (`StageRun`) on in-memory batches: it
reads nothing back to the host between two logging steps, and `train.compile` compiles the
towers a stage runs."""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch

B = 4


@pytest.fixture(scope="module")
def init(tmp_path_factory, gloo) -> str:
    """A tiny model without dropout (HTS-AT's MLPs draw new masks per forward, and compiled
    code draws them from another generator): eager and compiled steps compute alike."""
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model

    model = create_model("tiny")
    model.arch["audio_config"]["hidden_dropout_prob"] = 0.0
    path = tmp_path_factory.mktemp("step") / "init"
    save_model(model, path)
    return str(path)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1)  # noqa: E731
    return [{"wave": (0.25 * torch.randn(B, 480_000, generator=g)).half(),
             "text": [f"Parus major {k}" for k in range(B)], "text_emb": unit(), "image_emb": unit(),
             "epoch": 0} for _ in range(n)]


def _run(init: str, stage: str, out: Path, *overrides: str, resume: str | None = None):
    from biovita.config import load_config
    from biovita.train.loop import LocalIO, StageJob, StageRun
    from biovita.train.stages import get_stage

    section = get_stage(stage).section
    cfg = load_config(None, ["data.synth_if_missing=true", f"{section}.batch_size={B}",
                             "stage2.upper_audio_unfreeze_step=0", "stage2.logit_freeze_steps=0",
                             "stage2.baseline_batches=1", *overrides])
    job = StageJob(config=cfg, stage=stage, steps_per_epoch=100, init_checkpoint=init,
                   export_to=str(out / "model"))
    return StageRun(job, LocalIO(_batches(14), out, resume))


# what reads a tensor back to the host (on a GPU: waits for the device)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("stage", ["stage1", "stage2.phase2"])
def test_no_host_sync_between_logging_steps(init, tmp_path, stage, monkeypatch):
    """Steps 6-9 of a stage logging every 5: no tensor is read back to the host and no
    host-valued collective runs (stage 1 and phase 2, whose gate decides on the device);
    the logging steps read their window's means once."""
    from biovita.train import losses
    from biovita.train.stages import get_stage

    run = _run(init, stage, tmp_path, f"{get_stage(stage).section}.max_steps=12", "train.log_every=5")
    counting, reads = [False], collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            if counting[0]:
                frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                             if "site-packages/torch/" not in f.filename)
                reads[(name, Path(frame.filename).name, frame.lineno)] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("all_mean", "all_min"):
        monkeypatch.setattr(losses, name, counted(name, getattr(losses, name)))
    monkeypatch.setattr(torch.distributed, "barrier", counted("barrier", torch.distributed.barrier))
    log = run._log

    def logging_step():
        step = run.state["step"]
        counting[0] = False
        log()
        counting[0] = step == 5  # from the end of step 5's log to the start of step 10's

    run._log = logging_step
    steps = []
    run.job.callbacks.append(lambda info: steps.append(info.step))
    run.run()
    assert steps == list(range(1, 13))
    assert not reads, dict(reads)
    assert run.last_metrics["loss"] > 0  # the logging steps did read the means


@pytest.mark.slow
def test_compile_runs_a_stage_on_cpu(init, tmp_path, capsys):
    """`train.compile=true` compiles the towers phase 2 runs (audio and text; the image
    tower's embeddings come cached) and trains: the same losses as eager within float32
    rounding, and what was compiled is said."""
    eager = _run(init, "stage2.phase2", tmp_path / "eager", "stage2.phase2.max_steps=3",
                 "train.log_every=1")
    eager.run()
    compiled = _run(init, "stage2.phase2", tmp_path / "compiled", "stage2.phase2.max_steps=3",
                    "train.log_every=1", "train.compile=true")
    assert compiled.compiled == ["audio", "text"]
    compiled.run()
    out = capsys.readouterr().out
    assert "train.compile: the audio, text tower(s) are compiled" in out
    assert "train.compile: compiled, " in out
    assert compiled.state["step"] == 3
    assert compiled.last_metrics["loss"] == pytest.approx(eager.last_metrics["loss"], rel=1e-4)


def test_compile_under_zero3_is_refused_before_training():
    from biovita.config import load_config
    from biovita.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile: torch.compile runs under ZeRO 0-2"):
        load_config(None, ["data.synth_if_missing=true", "train.compile=true", "train.zero_stage=3"])
    assert not load_config(None, ["data.synth_if_missing=true"]).train.compiles()  # off on CPUs
    assert load_config(None, ["data.synth_if_missing=true", "train.use_gpu=true"]).train.compiles()


@pytest.mark.parametrize("stage", ["stage1", "stage2.phase2"])
def test_checkpoints_leave_frozen_towers_out_and_resume_whole(init, tmp_path, stage):
    """A checkpoint holds what the stage trains, not its frozen towers (the starting model
    has them), and keeps a role whose start step has not come (phase 2's upper audio here);
    a run resumed from it has every parameter of the run that wrote it. A checkpoint that
    lacks a trained parameter is refused as damaged."""
    from biovita.errors import CheckpointError
    from biovita.train.engine import DS_TAG
    from biovita.train.stages import get_stage

    args = (f"{get_stage(stage).section}.max_steps=2", "stage2.upper_audio_unfreeze_step=50")
    first = _run(init, stage, tmp_path / "a", *args)
    first.run()
    ckpt = tmp_path / "a" / "checkpoint_1"
    saved = torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    names = dict(first.module.named_parameters())
    frozen = first.eng.frozen_names()
    assert any(n.startswith("clip.visual.") for n in frozen)
    assert not frozen & set(saved) and set(names) - frozen <= set(saved)
    if stage == "stage2.phase2":  # the upper audio waits for its step: no gradient yet, kept
        assert any(not p.requires_grad and n not in frozen for n, p in names.items())

    resumed = _run(init, stage, tmp_path / "b", *args, resume=str(ckpt))
    assert resumed.state["step"] == 2
    for n, p in resumed.module.named_parameters():
        assert torch.equal(p, names[n]), n
    trained = next(n for n in saved if n in names and n not in frozen)
    with pytest.raises(CheckpointError, match="missing"):
        resumed.eng._load_module({k: v for k, v in saved.items() if k != trained}, resumed.module)


def test_stream_fetches_its_first_batch_before_it_is_asked():
    """The first batch is fetched while the engine is built; a stream's error is raised where
    the batch is asked for, and an empty stream stays empty."""
    import threading

    from biovita.train.loop import started

    fetched = threading.Event()

    def stream():
        fetched.set()
        yield from (1, 2, 3)

    items = started(stream())
    assert fetched.wait(timeout=60)  # before anything asked for it
    assert list(items) == [1, 2, 3]

    def broken():
        raise OSError("shard unreadable")
        yield

    items = started(broken())
    with pytest.raises(OSError, match="shard unreadable"):
        next(items)
    assert list(started(iter(()))) == []
