"""The experiment configuration: pydantic models loaded from YAML, with ``--set key=value`` overrides.

Unknown keys, wrong types and out-of-range values are rejected before anything starts; ``ConfigError``
carries one line naming the key and the problem (the CLI prints it and exits with code 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad configuration; str(error) is one line that names the key and the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    enabled: bool = False
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class ModelConfig(Strict):
    kind: Literal["tiny", "flux", "sd3"] = "tiny"
    # Local directory (or hub id) of a diffusers model; None = the tiny model shipped in the package.
    path: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Keep trainable weights in float32 (bf16 compute under autocast): bf16 weights round away lr-2e-6 steps.
    master_dtype: Optional[Literal["float32"]] = None
    resolution: int = Field(32, ge=8, le=4096)
    guidance: float = Field(3.5, ge=0)  # FLUX distilled guidance
    cfg_scale: float = Field(1.0, ge=1.0)  # SD3 classifier-free guidance (1 = off)
    gradient_checkpointing: bool = False
    lora: LoraConfig = LoraConfig()


class MergeConfig(Strict):
    mode: Literal["adaptive", "fixed", "none"] = "adaptive"
    tau: float = Field(2.2, ge=0)
    fixed_len: int = Field(2, ge=1)
    max_merge: Optional[int] = Field(None, ge=1)
    active_fraction: float = Field(0.5, gt=0, le=1)


class SamplingConfig(Strict):
    steps: int = Field(16, ge=1, le=1000)
    shift: float = Field(3.0, gt=0)
    eta: float = Field(0.7, ge=0, le=10)
    merge: MergeConfig = MergeConfig()


class AlgorithmConfig(Strict):
    strategy: Literal["egrpo", "g2rpo", "dancegrpo", "flowgrpo", "mixgrpo"] = "egrpo"
    group_size: int = Field(12, ge=2, le=1024)
    clip_range: float = Field(1e-4, gt=0, lt=1)
    adv_clip: float = Field(5.0, gt=0)
    adv_eps: float = Field(1e-8, gt=0)
    kl_beta: float = Field(0.0, ge=0)
    logprob_reduction: Literal["mean", "sum"] = "mean"
    multi_reward: Literal["reward", "advantage"] = "reward"
    # Where the ratio's denominator comes from: the sampler's stored log-probs, or a no-grad
    # recompute by the learner before the update (exactly 1 on-policy whatever the numerics).
    old_logprob: Literal["rollout", "recompute"] = "rollout"
    dance_eta: float = Field(0.3, ge=0)  # DanceGRPO's own constant-noise SDE
    timestep_fraction: float = Field(0.6, gt=0, le=1)  # DanceGRPO: share of steps trained
    window_size: int = Field(4, ge=1)  # MixGRPO / Flow-GRPO-Fast SDE window
    window_shift_every: int = Field(25, ge=1)  # MixGRPO: iterations before the window moves on


class RewardConfig(Strict):
    name: Literal["alignment", "jpeg", "hps", "clip", "pickscore", "imagereward"]
    weight: float = 1.0
    path: Optional[str] = None  # local checkpoint (file or directory) for learned rewards
    model_name: Optional[str] = None  # architecture override (HPS: the open_clip model name, default ViT-H-14)
    device: str = "cpu"
    batch_size: int = Field(16, ge=1, le=4096)
    batch_wait_s: float = Field(0.01, ge=0, le=10)
    replicas: int = Field(1, ge=1, le=1024)
    autoscale_max_replicas: Optional[int] = Field(None, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources per replica (placement on labelled nodes)


class PromptsConfig(Strict):
    # "tiny": the procedural shapes task shipped with the package; "file": text or JSONL lists.
    source: Literal["tiny", "file"] = "tiny"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    heldout_count: int = Field(16, ge=1)


class RolloutConfig(Strict):
    workers: int = Field(2, ge=1, le=4096)
    prompts_per_batch: int = Field(2, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources per worker (placement on labelled nodes)
    # How new weights reach the workers: through Ray's object store (tiny models, LoRA), or broadcast
    # in flat buckets over a process group of the learner's rank 0 and the workers (nccl on GPU, gloo on CPU).
    weight_sync: Literal["object_store", "collective"] = "object_store"
    sync_bucket_mb: int = Field(256, ge=1, le=16384)
    # auto: nccl when the learner has a GPU, else gloo; gloo also where NCCL cannot go (two ranks on one GPU)
    sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    max_restarts: int = Field(3, ge=0, le=1000)  # a dead worker is restarted and rejoins at its prompt cursor
    reward_retries: int = Field(3, ge=0, le=100)  # a failed reward call is retried (the group is kept)


class LearnerConfig(Strict):
    workers: int = Field(1, ge=1, le=4096)
    # ddp: every rank holds the whole model, gradients and optimizer state (LoRA, small models);
    # fsdp: FSDP2 shards them per transformer block, float32 master weights, bf16 compute (full fine-tunes).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}  # custom Ray resources per worker (placement on labelled nodes)
    iterations: int = Field(20, ge=1)
    prompts_per_step: int = Field(4, ge=1)  # prompts whose groups make one update
    minibatch_rows: int = Field(8, ge=1)  # (prompt, entry) rows per gradient step
    epochs: int = Field(1, ge=1, le=100)  # passes over each batch
    lr: float = Field(2e-6, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_staleness: int = Field(0, ge=0)
    queue_capacity: int = Field(64, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: Optional[int] = Field(3, ge=1)  # the last K checkpoints (and the best) are kept; None = all
    max_failures: int = Field(2, ge=0, le=1000)  # learner group restarts from the latest checkpoint


class ClusterConfig(Strict):
    # None: start a local cluster (the embedded default); "auto" or "ray://...": attach to one.
    address: Optional[str] = None
    # Scopes this run's Serve applications on a shared cluster; None: the driver picks one per run.
    run_name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    num_cpus: Optional[float] = Field(None, gt=0)
    startup_timeout_s: float = Field(60.0, gt=0)
    http_enabled: bool = False
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    max_image_bytes: int = Field(8 << 20, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(2048 * 2048, ge=1)  # reward HTTP: larger images are refused (400)
    reward_timeout_s: float = Field(120.0, gt=0)  # reward HTTP: a request that takes longer answers 503
    max_requests_in_flight: int = Field(32, ge=1)  # reward HTTP: more concurrent requests answer 503


class LoggingConfig(Strict):
    output_dir: str = "runs/tiny"
    log_every: int = Field(1, ge=1)
    grid_every: int = Field(10, ge=1)
    metrics_port: Optional[int] = Field(None, ge=0, le=65535)  # Prometheus /metrics; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"


class ExperimentConfig(Strict):
    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="alignment")], min_length=1)
    prompts: PromptsConfig = PromptsConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.prompts.source == "file" and not self.prompts.train_path:
            raise ValueError("prompts.train_path is required when prompts.source is 'file'")
        if self.sampling.merge.mode == "fixed" and self.sampling.merge.fixed_len > self.sampling.steps:
            raise ValueError("sampling.merge.fixed_len must not exceed sampling.steps")
        if self.algorithm.strategy == "mixgrpo" and self.algorithm.window_size > self.sampling.steps:
            raise ValueError("algorithm.window_size must not exceed sampling.steps")
        if self.model.kind != "tiny" and not self.model.path:
            raise ValueError(f"model.path is required for model.kind '{self.model.kind}'")
        if self.learner.prompts_per_step % self.learner.workers:
            raise ValueError("learner.prompts_per_step must be a multiple of learner.workers")
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{key}: {msg}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=1.5' -> (['a', 'b'], 1.5); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path)}: cannot set a key inside a non-mapping value")
            node = node.setdefault(part, {})
        if isinstance(node, list) and path[-1].isdigit() and int(path[-1]) < len(node):
            node[int(path[-1])] = value
        elif isinstance(node, dict):
            node[path[-1]] = value
        else:
            raise ConfigError(f"{'.'.join(path)}: cannot set a key inside a non-mapping value")
    return data


def validate(data: Any) -> ExperimentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of keys to values")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (None = all defaults), apply ``key=value`` overrides, validate."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{p}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return validate(apply_overrides(data, overrides or []))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def add_config_args(parser) -> None:
    """The --config / --set pair every config-driven command takes (an argparse parser)."""
    parser.add_argument("--config", help="YAML experiment config (default: the embedded tiny default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set learner.lr=1e-5 (repeatable)")
