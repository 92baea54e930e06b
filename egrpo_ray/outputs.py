"""What a run leaves in its output directory besides checkpoints (egrpo_ray/checkpoint.py): metrics.jsonl,
image grids, the reward curve."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
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


CHANGES = (("held-out reward", "heldout_reward"), ("training-prompt reward", "train_probe_reward"),
           ("background noise (not rewarded: drift the reward cannot see)", "background_noise"))


def change_lines(summary: Mapping[str, Any]) -> list[str]:
    """A run summary's before -> after lines, as `train` and `reference` print them."""
    lines = []
    for label, key in CHANGES:
        before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if before is not None and after is not None:
            lines.append(f"{label}: {before:.4f} -> {after:.4f}")
    return lines


def _caption_strip(text: str, width: int, lines: int) -> torch.Tensor:
    """``text`` wrapped to ``width`` pixels in PIL's default font, black on white: [3, h, width] in [0, 1]."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    char_w = max(1, int(font.getlength("x")))
    wrapped = textwrap.wrap(text, max(1, (width - 4) // char_w))[:lines]
    line_h = font.getbbox("Ag")[3] + 2
    img = Image.new("RGB", (width, lines * line_h + 4), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(wrapped):
        draw.text((2, 2 + i * line_h), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


MIN_TILE_WIDTH = 128  # pixels: narrower images are upscaled so that a caption line holds a few words


def _tiles(images: torch.Tensor, scale: int | None) -> torch.Tensor:
    """[B, 3, H, W] (float in [0, 1] or uint8) as float tiles upscaled ``scale`` times (nearest: tiny images stay
    sharp; None: enough for MIN_TILE_WIDTH)."""
    tiles = to_float(images).clamp(0, 1).float()
    if scale is None:
        scale = max(1, math.ceil(MIN_TILE_WIDTH / tiles.shape[-1]))
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return tiles


def _write_png(grid: torch.Tensor, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy()).save(path)
    return path


def _captioned(tiles: torch.Tensor, captions: Sequence[str] | None, lines: int) -> torch.Tensor:
    if not captions:
        return tiles
    if len(captions) < len(tiles):
        raise ValueError(f"save_grid: {len(captions)} captions for {len(tiles)} images")
    width = tiles.shape[-1]
    return torch.stack([torch.cat([tile, _caption_strip(text, width, lines)], dim=1) for tile, text in zip(tiles, captions)])


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int | None = None,
              captions: Sequence[str] | None = None, caption_lines: int = 3) -> Path:
    """Tile images [B, 3, H, W] (float in [0, 1] or uint8) into one PNG, each upscaled by ``scale`` (small
    images; None: to MIN_TILE_WIDTH) and captioned with its prompt when ``captions`` are given."""
    from torchvision.utils import make_grid

    tiles = _captioned(_tiles(images, scale), captions, caption_lines)
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    return _write_png(make_grid(tiles, nrow=cols, padding=2, pad_value=1.0), path)


def save_comparison(before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str], path: str | Path,
                    labels: tuple[str, str] = ("before", "after"), columns: int = 4, scale: int | None = None,
                    caption_lines: int = 3) -> Path:
    """Each prompt's two images side by side (``labels[0]`` left, ``labels[1]`` right) over its caption,
    the pairs tiled ``columns`` to a row under a header naming the two sides."""
    from torchvision.utils import make_grid

    n = min(len(before), len(after), len(prompts))
    if n == 0:
        raise ValueError("save_comparison: no images")
    left, right = _tiles(before[:n], scale), _tiles(after[:n], scale)
    gap = torch.ones(n, 3, left.shape[2], 2)
    pairs = _captioned(torch.cat([left, gap, right], dim=3), list(prompts[:n]), caption_lines)
    grid = make_grid(pairs, nrow=min(columns, n), padding=4, pad_value=1.0)
    header = _caption_strip(f"each prompt: left {labels[0]}, right {labels[1]}", grid.shape[-1], 1)
    return _write_png(torch.cat([header, grid], dim=1), path)


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


class Progress:
    """A progress bar on a terminal. Without one (a log file, ``ray job logs``, a pipe) a bar's redraws would
    pile up in one line, so there is no bar: ``update`` prints a plain line each time ``every`` more units
    are done (None: no lines; the caller prints its own), and ``write`` prints plain lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: int | None = None,
                 enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self.last_line = initial
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, **postfix) -> None:
        self.set(self.n + n, **postfix)

    def set(self, n: int, **postfix) -> None:
        self.n = n
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            self.bar.refresh()
        elif self.every and (n - self.last_line >= self.every or n >= self.total) and n != self.last_line:
            self.last_line = n
            print(f"{self.desc}: {n}/{self.total} {self.unit}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A line on stdout (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
