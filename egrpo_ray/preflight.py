"""Checks that run on the driver before anything starts or is written: a bad input is one line and exit 2
before the cluster starts, and the output directory is untouched until every check has passed.

What a run reads is validated here, where an error is one ``ConfigError`` line, rather than inside an
actor after the cluster started (a long remote traceback):

- prompt files (``prompts.source: file``): loaded in full (missing, empty, not UTF-8, control bytes);
- ``model.path``: the tiny model's manifest and weights (present, sha256, a parsable safetensors header),
  or a diffusers directory with ``transformer/config.json`` for FLUX / SD3;
- learned rewards' ``path``: present, the right kind (file or directory); a torch pickle must be a
  weights-only checkpoint (its globals are listed without unpickling anything) and a safetensors file
  must be complete;
- ``--resume``: the latest checkpoint's meta.json parses and has its keys, ``state/`` has its DCP files,
  and its step is below ``learner.iterations``; without ``--resume``, an output directory that already
  holds checkpoints is refused (a fresh run would overwrite them);
- the output directory can be created and written: a temporary file is created and removed in it (or in
  its nearest existing parent, when it does not exist yet), so nothing is left behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from egrpo_ray.checkpoint import CheckpointError, check_safetensors, check_training_state, latest_checkpoint, read_meta
from egrpo_ray.config import ConfigError, ExperimentConfig, ModelConfig, PromptsConfig, RewardConfig

# Learned rewards and what their ``path`` must be: "file", "dir" or "any" (a file or a directory).
REWARD_PATHS = {"hps": "file", "clip": "dir", "pickscore": "dir", "imagereward": "any"}
TORCH_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------ inputs


def check_prompts(cfg: PromptsConfig) -> None:
    """Load the configured prompt files (the tiny task's prompts are built in)."""
    if cfg.source != "file":
        return
    from egrpo_ray.prompts import load_prompt_file

    if not cfg.train_path:
        raise ConfigError("prompts.train_path is required when prompts.source is 'file'")
    load_prompt_file(cfg.train_path)
    if cfg.test_path:
        load_prompt_file(cfg.test_path)


def check_model(cfg: ModelConfig) -> None:
    if cfg.kind == "tiny":
        from egrpo_ray.models.tiny import IMAGE_SIZE, check_tiny_files

        if cfg.resolution != IMAGE_SIZE:
            raise ConfigError(f"model.resolution: the tiny model generates {IMAGE_SIZE}x{IMAGE_SIZE} images, "
                              f"not {cfg.resolution}")
        try:
            check_tiny_files(Path(cfg.path).expanduser() if cfg.path else None)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model.path: {_first_line(err)}" if cfg.path else f"model: {_first_line(err)}") from None
        return
    from egrpo_ray.models.diffusers_common import check_model_path

    try:
        resolved = check_model_path(cfg.path, cfg.kind)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(_first_line(err)) from None
    local = Path(resolved).expanduser()
    if local.is_dir():  # a hub id is resolved by diffusers itself
        config = local / "transformer" / "config.json"
        try:
            data = json.loads(config.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"model.path {local}: no transformer/config.json (not a diffusers model directory)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"model.path {local}: transformer/config.json is unreadable ({_first_line(err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"model.path {local}: transformer/config.json is not a JSON object")


def _check_torch_pickle(path: Path, where: str) -> None:
    """A torch.save zip checkpoint whose pickle only references what ``torch.load(weights_only=True)``
    allows. The globals are read from the pickle's opcodes: nothing is unpickled or executed."""
    import zipfile

    from torch.serialization import get_unsafe_globals_in_checkpoint

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise ConfigError(f"{where}: {path}: corrupt or truncated torch checkpoint (an incomplete zip archive)")
        raise ConfigError(f"{where}: {path}: not a torch.save checkpoint (zip format); raw or legacy pickles are not read")
    try:
        unsafe = get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise ConfigError(f"{where}: {path}: corrupt or truncated torch checkpoint ({_first_line(err)})") from None
    if unsafe:
        raise ConfigError(f"{where}: {path}: not a weights-only checkpoint (its pickle references {unsafe[0]}); "
                          "refusing to load it")


def check_reward(cfg: RewardConfig, index: int) -> None:
    kind = REWARD_PATHS.get(cfg.name)
    if kind is None:  # alignment, jpeg: nothing to read
        return
    where = f"reward {cfg.name} (rewards.{index}.path)"
    if not cfg.path:
        raise ConfigError(f"{where}: needs a path (a local checkpoint)")
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise ConfigError(f"{where}: {p} not found")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{where}: {p} is not a file (it reads one checkpoint file)")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{where}: {p} is not a directory (it reads a model directory)")
    if p.is_dir():
        if kind == "dir" and not (p / "config.json").is_file():
            raise ConfigError(f"{where}: {p} has no config.json (not a model directory)")
        return
    if p.stat().st_size == 0:
        raise ConfigError(f"{where}: {p} is empty")
    try:
        if p.suffix == ".safetensors":
            check_safetensors(p)
        elif p.suffix in TORCH_PICKLE_SUFFIXES:
            _check_torch_pickle(p, where)
    except CheckpointError as err:
        raise ConfigError(f"{where}: {err}") from None


def check_inputs(cfg: ExperimentConfig) -> None:
    """Everything a run (or an eval, or the reference loop) reads besides a checkpoint."""
    check_prompts(cfg.prompts)
    check_model(cfg.model)
    for i, reward in enumerate(cfg.rewards):
        check_reward(reward, i)


# ------------------------------------------------------------------------------------- checkpoints


def check_resume(cfg: ExperimentConfig, output_dir: Path, resume: bool) -> tuple[Optional[Path], dict]:
    if not resume:
        existing = latest_checkpoint(output_dir) if output_dir.is_dir() else None
        if existing is not None:
            raise ConfigError(f"{output_dir} already holds checkpoints (latest {existing.name}); pass --resume to "
                              "continue that run, or choose another --output-dir")
        return None, {}
    checkpoint = latest_checkpoint(output_dir) if output_dir.is_dir() else None
    if checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint under {output_dir / 'checkpoints'}")
    try:
        meta = read_meta(checkpoint)
        check_training_state(checkpoint)
    except CheckpointError as err:
        raise ConfigError(f"--resume: {err}") from None
    if meta["step"] >= cfg.learner.iterations:
        raise ConfigError(f"--resume: the checkpoint is at step {meta['step']}, not below learner.iterations = "
                          f"{cfg.learner.iterations}")
    return checkpoint, meta


# -------------------------------------------------------------------------------------- output dir


def check_output_dir(output_dir: str | Path, what: str = "output directory") -> None:
    """The directory exists and is writable, or can be created: its nearest existing parent is a
    writable directory. Tested by creating and removing a temporary file; nothing is left behind."""
    out = Path(output_dir).expanduser()
    try:
        out = out.absolute()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{what} {out} exists and is not a directory")
        probe = out
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{what} {out} cannot be created: {probe} is not a directory")
        fd, name = tempfile.mkstemp(prefix=".egrpo_write_test_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except ConfigError:
        raise
    except PermissionError:
        raise ConfigError(f"{what} {out} cannot be created or written: permission denied in {probe}") from None
    except OSError as err:
        raise ConfigError(f"{what} {out} cannot be created or written ({err.strerror or _first_line(err)})") from None
    except ValueError as err:  # an embedded NUL and similar
        raise ConfigError(f"{what} {output_dir!r}: invalid path ({_first_line(err)})") from None


# ------------------------------------------------------------------------------------------- train


def preflight(cfg: ExperimentConfig, output_dir: Path, resume: bool) -> tuple[Optional[Path], dict]:
    """Validate what the run will read; returns (checkpoint to resume from or None, its meta).
    Writes nothing: the caller creates the output directory only after this returns."""
    check_inputs(cfg)
    checkpoint, meta = check_resume(cfg, Path(output_dir), resume)
    check_output_dir(output_dir)
    return checkpoint, meta
