"""Peak memory and time of the contrastive loss: local-vs-global logits (B x B*W, what
biovita.losses computes on each worker) vs full global logits ((B*W)^2).

One worker's share is simulated: it holds its B local rows and the gathered B*W rows.
Each measurement runs in a fresh subprocess so peak RSS is clean.

    python benchmarks/loss_memory.py [--workers 8] [--dim 768]
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(kind: str, global_batch: int, workers: int, dim: int) -> dict:
    import torch

    torch.manual_seed(0)
    b = global_batch // workers
    a_all = torch.nn.functional.normalize(torch.randn(global_batch, dim), dim=-1).requires_grad_()
    t_all = torch.nn.functional.normalize(torch.randn(global_batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(14.0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if kind == "local":  # rank 0's loss: local rows against all gathered rows
        la, lt = a_all[:b], t_all[:b]
        logits_at = scale * la @ t_all.T
        logits_ta = scale * lt @ a_all.T
        labels = torch.arange(b)
        shape = tuple(logits_at.shape)
    else:
        logits_at = scale * a_all @ t_all.T
        logits_ta = logits_at.T
        labels = torch.arange(global_batch)
        shape = tuple(logits_at.shape)
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits_at, labels)
                  + torch.nn.functional.cross_entropy(logits_ta, labels))
    loss.backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": dt, "peak_mb": (peak - base) / 1024, "logits": shape}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batches", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--max-full-gb", type=float, default=12.0,
                   help="skip full-logit runs whose logits alone would exceed this")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        kind, gb = a.one[0], int(a.one[1])
        print(json.dumps(_measure(kind, gb, a.workers, a.dim)))
        return
    print(f"W={a.workers} simulated workers, dim {a.dim}; per-worker cost (forward + backward)")
    print(f"{'global B':>9} {'local logits':>16} {'MB':>8} {'s':>7} | {'full logits':>16} {'MB':>8} {'s':>7} | mem ratio")
    for gb in map(int, a.batches.split(",")):
        res = {}
        for kind in ("local", "full"):
            if kind == "full" and gb * gb * 4 * 3 / 1e9 > a.max_full_gb:
                res[kind] = None
                continue
            out = subprocess.run([sys.executable, __file__, "--workers", str(a.workers), "--dim", str(a.dim),
                                  "--one", kind, str(gb), "0"], capture_output=True, text=True)
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        lo, fu = res["local"], res["full"]
        full = (f"{str(fu['logits']):>16} {fu['peak_mb']:8.0f} {fu['seconds']:7.2f}" if fu
                else f"{'skipped (>' + str(int(a.max_full_gb)) + ' GB)':>33}")
        ratio = f"{fu['peak_mb'] / max(lo['peak_mb'], 1):.1f}x" if fu else "-"
        print(f"{gb:>9} {str(lo['logits']):>16} {lo['peak_mb']:8.0f} {lo['seconds']:7.2f} | {full} | {ratio}")


if __name__ == "__main__":
    main()
