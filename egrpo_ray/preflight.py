"""Checks that run on the driver before anything starts or is written: a bad input is one line and exit 2
before the cluster starts, and the output directory is untouched until every check has passed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from egrpo_ray.checkpoint import latest_checkpoint, read_meta
from egrpo_ray.config import ConfigError, ExperimentConfig


def preflight(cfg: ExperimentConfig, output_dir: Path, resume: bool) -> tuple[Optional[Path], dict]:
    """Validate what the run will read; returns (checkpoint to resume from or None, its meta)."""
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint under {output_dir / 'checkpoints'}")
    meta = read_meta(checkpoint) if checkpoint else {}
    if meta and meta["step"] >= cfg.learner.iterations:
        raise ConfigError(f"--resume: the checkpoint is at step {meta['step']}, not below learner.iterations = "
                          f"{cfg.learner.iterations}")
    return checkpoint, meta
