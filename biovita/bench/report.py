"""Results: the terminal table, the JSON file, a 6x3 heatmap and per-class bars (PNG)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from biovita.bench.build import CODES
from biovita.bench.score import chance
from biovita.taxonomy import LEVELS

ORDER = ("A2T", "T2A", "A2I", "I2A", "I2T", "T2I")


def format_table(result: dict, bench: str | Path | None = None, title: str = "") -> str:
    """Rows = directions, columns = levels; Top-1 / Top-5 in %, chance level in brackets."""
    head = f"{'task':<6}" + "".join(f"{lvl + ' top1/top5 (chance)':>34}" for lvl in LEVELS)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for code in ORDER:
        cells = []
        for lvl in LEVELS:
            e = result.get(lvl, {}).get(code)
            if not e:
                cells.append(f"{'-':>34}")
                continue
            ch = f" ({100 * chance(bench, lvl, CODES[code]):.1f})" if bench else ""
            missing = e.get("missing_query", 0) + e.get("missing_gallery", 0)
            n = f"n={e['n']}" + (f" ({missing} missing)" if missing else "")
            cells.append(f"{100 * e['top1']:>12.1f} / {100 * e['top5']:5.1f}{ch:>9} {n:<6}")
        lines.append(f"{code:<6}" + "".join(cells))
    avg = [sum(result[lvl][c]["top1"] for c in ORDER) / 6 for lvl in LEVELS if lvl in result]
    lines.append(f"{'avg':<6}" + "".join(f"{100 * a:>12.1f}{'':>22}" for a in avg))
    return "\n".join(lines)


def print_skipped(result: dict, out=None) -> None:
    """One line per task with skipped queries (to stderr): how many, and why."""
    for level, tasks in result.get("skipped_detail", {}).items():
        for code, reasons in tasks.items():
            print(f"skipped {level}/{code}: " + ", ".join(f"{k}={v}" for k, v in reasons.items()),
                  file=out or sys.stderr)


def mean_top1(result: dict, level: str = "species") -> float:
    return sum(result[level][c]["top1"] for c in ORDER) / len(ORDER)


def format_summary(scored: dict[str, dict[str, dict]]) -> str:
    """One line per split and stage: the mean Top-1 over the six directions at each level."""
    head = f"{'split':<8}{'stage':<16}" + "".join(f"{lvl + ' avg top1':>20}" for lvl in LEVELS)
    lines = ["summary (mean Top-1 of the six directions, %)", head, "-" * len(head)]
    for split, by_stage in scored.items():
        for stage, result in by_stage.items():
            lines.append(f"{split:<8}{stage:<16}" + "".join(
                f"{100 * mean_top1(result, lvl):>20.1f}" for lvl in LEVELS))
    return "\n".join(lines)


def plot_heatmap(result: dict, path: str | Path, title: str = "Top-1") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([[result[lvl][c]["top1"] * 100 for lvl in LEVELS] for c in ORDER])
    fig, ax = plt.subplots(figsize=(5, 5))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(LEVELS)), LEVELS)
    ax.set_yticks(range(len(ORDER)), ORDER)
    for i in range(len(ORDER)):
        for j in range(len(LEVELS)):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center",
                    color="white" if m[i, j] < 60 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_class(result: dict, path: str | Path, level: str = "species") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per = result["per_class"][level]
    classes = sorted({c for code in ORDER for c in per.get(code, {})})
    x = np.arange(len(ORDER))
    w = 0.8 / max(1, len(classes))
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, c in enumerate(classes):
        vals = [per.get(code, {}).get(c, {}).get("top1", 0) * 100 for code in ORDER]
        ax.bar(x + k * w - 0.4 + w / 2, vals, w, label=c)
    ax.set_xticks(x, ORDER)
    ax.set_ylabel("Top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Top-1 per class ({level} level)")
    ax.legend(ncol=len(classes), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(result: dict, out_json: str | Path, logger=None, prefix: str = "bench") -> list[Path]:
    """JSON + the two plots next to it; logged to MLflow (metrics + artifacts) when given."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    stem = out_json.with_suffix("")
    files = [out_json, plot_heatmap(result, f"{stem}_heatmap.png"),
             plot_per_class(result, f"{stem}_per_class.png")]
    if logger is not None:
        metrics = {f"{prefix}/{lvl}/{c}/top{k}": result[lvl][c][f"top{k}"]
                   for lvl in LEVELS for c in ORDER for k in (1, 5)}
        metrics[f"{prefix}/species/avg_top1"] = mean_top1(result)
        logger.metrics(metrics, step=0)
        for f in files:
            logger.artifact(f, prefix)
        logger.table([{"direction": c, "level": lvl, **{f"top{k}": result[lvl][c][f"top{k}"] for k in (1, 5, 10)},
                       "n": result[lvl][c]["n"]} for lvl in LEVELS for c in ORDER],
                     f"{prefix}/results_table.json")
    return files
