"""Training curves as a PNG: loss, draft accuracy and held-out tokens per iteration by step,
drawn from a run's ``metrics.jsonl``.

    python -m train.curves RUN/metrics.jsonl [RUN/curves.png]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from orthrus_jax.cli import run_command


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line cut off by a kill is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(metrics_path: str | Path, png_path: str | Path | None = None) -> Path:
    """Draw the curves of ``metrics_path`` into ``png_path`` (default: ``curves.png``
    beside it), replacing it only once written. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metrics_path = Path(metrics_path)
    png = Path(png_path) if png_path else metrics_path.with_name("curves.png")
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    steps = [r["step"] for r in train]
    window = max(1, len(train) // 30)
    for ax, key, title in ((axes[0], "loss", "loss (KL or CE per drafted position)"),
                           (axes[1], "accuracy", "draft accuracy (argmax = teacher's)")):
        values = [r[key] for r in train]
        ax.plot(steps, values, color="0.8", lw=0.8, label="per step")
        if values:
            ax.plot(steps, _smooth(values, window), color="C0", lw=1.5,
                    label=f"mean of {window}")
        ax.set(title=title, xlabel="step")
        ax.legend(loc="best")
    ax = axes[2]
    if evals:
        ax.plot([r["step"] for r in evals], [r["tokens_per_iteration"] for r in evals], "o-",
                color="C1")
    else:
        ax.text(0.5, 0.5, "no evaluation in this run\n(train.main --eval-prompts)",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set(title="held-out tokens / iteration", xlabel="step")
    fig.suptitle(f"{metrics_path.parent.name}: {len(train)} steps logged")
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.partial-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m train.curves METRICS.jsonl [OUT.png]", file=sys.stderr)
        return 2

    def body() -> None:
        if not Path(args[0]).is_file():
            raise FileNotFoundError(f"{args[0]}: no such file")
        print(plot_curves(*args))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
