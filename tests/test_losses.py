import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from biovita.train import losses

B, W, D = 4, 2, 8


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    # a tiny "model": two linear towers, so gradients reach parameters through the gather
    ta = torch.nn.Linear(6, D)
    tb = torch.nn.Linear(5, D)
    with torch.no_grad():
        for p in list(ta.parameters()) + list(tb.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    xa = torch.randn(B * W, 6, generator=g)
    xb = torch.randn(B * W, 5, generator=g)
    scale = torch.nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
    return ta, tb, xa, xb, scale


def _loss(ta, tb, xa, xb, scale):
    fa = torch.nn.functional.normalize(ta(xa), dim=-1)
    fb = torch.nn.functional.normalize(tb(xb), dim=-1)
    return losses.contrastive_loss(fa, fb, scale.exp())


def _grads(*mods):
    return [p.grad.clone() for m in mods for p in m.parameters()]


def _worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    ta, tb, xa, xb, scale = _features()
    sl = slice(rank * B, (rank + 1) * B)
    fa = torch.nn.functional.normalize(ta(xa[sl]), dim=-1)
    fb = torch.nn.functional.normalize(tb(xb[sl]), dim=-1)
    logits_ab, _ = losses.contrastive_logits(fa, fb, scale.exp())
    loss = losses.contrastive_loss(fa, fb, scale.exp())
    loss.backward()
    grads = [p.grad for m in (ta, tb) for p in m.parameters()] + [scale.grad]
    for g in grads:  # what DDP / DeepSpeed do: average gradients over workers
        dist.all_reduce(g)
        g /= W
    lt = loss.detach().clone()
    dist.all_reduce(lt)
    out.put((rank, (lt / W).item(), [g.numpy().copy() for g in grads], tuple(logits_ab.shape)))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_loss_equals_global_batch_reference():
    """Two real gloo processes: loss and every gradient == one process with the global batch."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(W)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in range(W))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    ta, tb, xa, xb, scale = _features()
    ref = _loss(ta, tb, xa, xb, scale)
    ref.backward()
    ref_grads = _grads(ta, tb) + [scale.grad]
    for rank, loss, grads, shape in results:
        assert shape == (B, B * W)  # local x global logits, never (B W) x (B W)
        assert abs(loss - ref.item()) < 1e-5
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(torch.from_numpy(g), r, atol=1e-5, rtol=0)


def test_single_process_logits_shape_and_symmetry():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    lab, lba = losses.contrastive_logits(a, b, torch.tensor(10.0))
    assert lab.shape == (5, 5)
    torch.testing.assert_close(lab, lba.T)
    # perfectly aligned pairs at a high scale give ~zero loss
    assert losses.contrastive_loss(a, a, torch.tensor(100.0)).item() < 0.05


def test_gradient_accumulation_equals_big_batch():
    """Cached-feature accumulation over k micro-batches == the single k*B batch gradient."""
    ta, tb, xa, xb, scale = _features(1)
    big = _loss(ta, tb, xa, xb, scale)
    big.backward()
    ref = _grads(ta, tb) + [scale.grad.clone()]
    for m in (ta, tb):
        m.zero_grad()
    scale.grad = None

    enc = {"a": lambda x: torch.nn.functional.normalize(ta(x), dim=-1),
           "b": lambda x: torch.nn.functional.normalize(tb(x), dim=-1)}
    mbs = [{"a": xa[i:i + 2], "b": xb[i:i + 2]} for i in range(0, B * W, 2)]

    def loss_fn(f, first):
        s = scale.exp() if first else scale.exp().detach()
        return losses.contrastive_loss(f["a"], f["b"], s)

    total = losses.accumulate_contrastive(enc, mbs, loss_fn)
    assert abs(total.item() - big.item()) < 1e-6
    for g, r in zip(_grads(ta, tb) + [scale.grad], ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_logit_scale_clamp():
    p = torch.nn.Parameter(torch.tensor([10.0]))
    losses.clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(100))
    p.data.fill_(-10)
    losses.clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(1 / 100))
