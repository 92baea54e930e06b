"""What a run leaves in its output directory besides checkpoints (egrpo_ray/checkpoint.py): metrics.jsonl,
image grids, the reward curve."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from egrpo_ray.images import to_float, to_uint8


class MetricsWriter:
    """One JSON object per learner step in ``metrics.jsonl`` (or another ``name``): exactly one line per step,
    however the run was stopped, restarted or resumed. A record for a step at or below the last one written
    (a learner that restarted from a checkpoint replays its steps) first drops the lines from that step on;
    ``rewind(step)`` drops every line after ``step`` (a resume from the checkpoint at ``step``)."""

    def __init__(self, output_dir: str | Path, name: str = "metrics.jsonl"):
        self.path = Path(output_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = self.read()
        self.last_step = max((int(r.get("step", 0)) for r in records), default=None)

    def write(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        if step is not None and self.last_step is not None and step <= self.last_step:
            self.rewind(step - 1)
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        if step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)

    def rewind(self, step: int) -> list[dict]:
        """Keep the records up to ``step`` (rewritten atomically); returns them."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self.last_step = max((int(r.get("step", 0)) for r in kept), default=None)
        return kept

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.exists() else []


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> Path:
    """Tile images [B, 3, H, W] (float in [0, 1] or uint8) into one PNG (upscaled by ``scale`` for small images)."""
    from PIL import Image

    b, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for k in range(b):
        r, c = divmod(k, cols)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = to_float(images[k]).clamp(0, 1)
    img = Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_reward_curve(records: list[dict], path: str | Path, heldout: list[tuple[int, float]] | None = None) -> Path:
    """Training reward (mean +- std) per step, and held-out reward points when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    mean = [r["reward_mean"] for r in records]
    std = [r.get("reward_std", 0.0) for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, label="training reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    if heldout:
        ax.plot([s for s, _ in heldout], [v for _, v in heldout], "o-", label="held-out reward (ODE, fixed noise)")
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
