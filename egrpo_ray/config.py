"""The experiment configuration: pydantic models loaded from YAML, with ``--set key=value`` overrides.

Unknown keys, wrong types and out-of-range values are rejected before anything starts; ``ConfigError``
carries one line naming the key and the problem (the CLI prints it and exits with code 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad configuration; str(error) is one line that names the key and the problem."""


# Strict scalar types: YAML ``true`` is not the integer 1 (pydantic's lax mode would take it), 1 is not
# ``true``, and text values carry no control characters (a NUL in a path fails deep inside os calls).
def _not_bool(kind: str):
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"Input should be a valid {kind}, not a boolean")
        return value

    return check


def _only_bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("Input should be true or false")
    return value


def _printable(value: str) -> str:
    bad = next((c for c in value if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise ValueError(f"control character {bad!r} in text")
    return value


Int = Annotated[int, BeforeValidator(_not_bool("integer"))]
Float = Annotated[float, BeforeValidator(_not_bool("number"))]
Bool = Annotated[bool, BeforeValidator(_only_bool)]
Text = Annotated[str, AfterValidator(_printable)]
Path_ = Annotated[str, Field(min_length=1), AfterValidator(_printable)]  # a non-empty path or address


def _plain_resources(value: dict[str, float]) -> dict[str, float]:
    for key, amount in value.items():
        if key in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{key!r} is not a custom resource (use num_cpus / num_gpus)")
        if amount < 0:
            raise ValueError(f"resource {key!r}: amount must be >= 0, got {amount:g}")
    return value


Resources = Annotated[dict[Text, Float], AfterValidator(_plain_resources)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(Strict):
    enabled: Bool = False
    rank: Int = Field(16, ge=1, le=1024)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: Annotated[list[Text], Field(min_length=1)] = ["to_q", "to_k", "to_v", "to_out.0"]


class ModelConfig(Strict):
    kind: Literal["tiny", "flux", "sd3"] = "tiny"
    # Local directory (or hub id) of a diffusers model; None = the tiny model shipped in the package.
    path: Optional[Path_] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Keep trainable weights in float32 (bf16 compute under autocast): bf16 weights round away lr-2e-6 steps.
    master_dtype: Optional[Literal["float32"]] = None
    resolution: Int = Field(32, ge=8, le=4096)
    guidance: Float = Field(3.5, ge=0)  # FLUX distilled guidance
    cfg_scale: Float = Field(1.0, ge=1.0)  # SD3 classifier-free guidance (1 = off)
    gradient_checkpointing: Bool = False
    lora: LoraConfig = LoraConfig()


class MergeConfig(Strict):
    mode: Literal["adaptive", "fixed", "none"] = "adaptive"
    tau: Float = Field(2.2, ge=0)
    fixed_len: Int = Field(2, ge=1)
    max_merge: Optional[Int] = Field(None, ge=1)
    active_fraction: Float = Field(0.5, gt=0, le=1)
    # Steps before this fraction of the schedule stay on the ODE anchor and never branch (0: branch from the
    # start, as the paper does). Where a reward's signal sits mid-trajectory, skipping the first steps saves
    # their costly full-length branches (docs/benchmarks.md section 1, probe 11).
    active_start: Float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _start_before_end(self) -> "MergeConfig":
        if self.active_start >= self.active_fraction:
            raise ValueError(f"active_start ({self.active_start}) must be below active_fraction ({self.active_fraction})")
        return self


class SuffixConfig(Strict):
    """The deterministic ODE suffix that carries each E-GRPO branch from its merged step to the image."""

    solver: Literal["euler", "heun", "dpm2m"] = "euler"
    steps: Optional[Int] = Field(None, ge=1, le=1000)  # None: the schedule's own remaining steps


class SamplingConfig(Strict):
    steps: Int = Field(16, ge=1, le=1000)
    shift: Float = Field(3.0, gt=0)
    eta: Float = Field(0.7, gt=0, le=10)  # 0 would make every step an ODE step: no log-probs to train on
    merge: MergeConfig = MergeConfig()
    suffix: SuffixConfig = SuffixConfig()


class AlgorithmConfig(Strict):
    strategy: Literal["egrpo", "g2rpo", "dancegrpo", "flowgrpo", "mixgrpo"] = "egrpo"
    group_size: Int = Field(12, ge=2, le=1024)
    clip_range: Float = Field(1e-4, gt=0, lt=1)
    adv_clip: Float = Field(5.0, gt=0)
    adv_eps: Float = Field(1e-8, gt=0)
    kl_beta: Float = Field(0.0, ge=0)
    logprob_reduction: Literal["mean", "sum"] = "mean"
    # "reward": weight-sum the rewards, then normalise; "advantage": normalise each, weight-sum the advantages.
    # None: the strategy's source (MixGRPO: advantage_aggr; the others: reward).
    multi_reward: Optional[Literal["reward", "advantage"]] = None
    # Where the ratio's denominator comes from: "rollout", the sampler's stored log-probs; "recompute", a
    # no-grad recompute by the learner before the update (exactly 1 on-policy whatever the numerics);
    # "decoupled", the recompute anchors the clip and each row is weighted by the capped behaviour ratio
    # pi_recompute / pi_sampler (decoupled PPO, for stale samples). "auto": decoupled when
    # learner.max_staleness > 0, else rollout.
    old_logprob: Literal["auto", "rollout", "recompute", "decoupled"] = "auto"
    behaviour_ratio_cap: Float = Field(2.0, ge=1)  # decoupled: cap on pi_recompute / pi_sampler
    # Where the baselines' sources differ; None = the strategy's own source's default (docs/algorithm.md section 8).
    adv_std: Optional[Literal["population", "unbiased"]] = None
    adv_std_scope: Optional[Literal["group", "batch"]] = None  # batch: one std over the update (Flow-GRPO)
    adv_clip_order: Optional[Literal["each_reward", "after_sum"]] = None  # multi_reward "advantage" mode
    shared_noise: Optional[Bool] = None  # one initial noise per group (trajectory strategies)
    dance_eta: Float = Field(0.3, gt=0)  # DanceGRPO's own constant-noise SDE
    timestep_fraction: Float = Field(0.6, gt=0, le=1)  # DanceGRPO: share of steps trained
    window_size: Int = Field(4, ge=1)  # MixGRPO's SDE window
    window_shift_every: Int = Field(25, ge=1)  # MixGRPO: iterations before the window moves on


class RewardConfig(Strict):
    name: Literal["alignment", "jpeg", "hps", "clip", "pickscore", "imagereward", "random"]
    weight: Float = 1.0
    path: Optional[Path_] = None  # local checkpoint (file or directory) for learned rewards
    model_name: Optional[Path_] = None  # architecture override (HPS: the open_clip model name, default ViT-H-14)
    device: str = Field("cpu", pattern=r"^(cpu|mps|cuda(:[0-9]+)?)$")
    batch_size: Int = Field(16, ge=1, le=4096)
    batch_wait_s: Float = Field(0.01, ge=0, le=10)
    replicas: Int = Field(1, ge=1, le=1024)
    autoscale_max_replicas: Optional[Int] = Field(None, ge=1)
    num_cpus: Float = Field(0.25, ge=0)
    num_gpus: Float = Field(0.0, ge=0)
    resources: Resources = {}  # custom Ray resources per replica (placement on labelled nodes)
    # Failed replica starts (a model that does not load) before the run ends in one line. Serve allows 3 per
    # replica and never more; each try loads the model again, and a broken weight file fails every time.
    start_attempts: Optional[Int] = Field(None, ge=1, le=100)
    # The alignment reward's combination of its terms: "product" (strict, every attribute at once) or
    # "mean" (graded partial credit); see rewards/alignment.py. Other rewards have no terms to combine.
    combine: Optional[Literal["product", "mean"]] = None

    @model_validator(mode="after")
    def _combine_only_for_alignment(self) -> "RewardConfig":
        if self.combine is not None and self.name != "alignment":
            raise ValueError(f"combine applies to the alignment reward only, not to {self.name}")
        return self


class PromptsConfig(Strict):
    # "tiny": the procedural shapes task shipped with the package; "file": text or JSONL lists.
    source: Literal["tiny", "file"] = "tiny"
    train_path: Optional[Path_] = None
    test_path: Optional[Path_] = None
    heldout_count: Int = Field(16, ge=1)
    # The tiny task's prompt kinds (tasks/scenes.py) for RL training and for the held-out set. The
    # shipped base is weak on relations and counts: that is where RL has room to move.
    tiny_train_kinds: list[Literal["single", "relation", "count"]] = Field(default_factory=lambda: ["relation", "count"], min_length=1)
    tiny_heldout_kinds: list[Literal["single", "relation", "count"]] = Field(default_factory=lambda: ["single", "relation", "count"], min_length=1)
    validation_count: Int = Field(48, ge=1)  # validation prompts for learning-rate sweeps (never held-out ones)
    # Train on only the first N training prompts (the tiny source keeps its kind mixture in any prefix):
    # a small fixed set, as DDPO's 45 animals, is revisited often enough for its reward to move quickly.
    train_count: Optional[Int] = Field(None, ge=1)


class RolloutConfig(Strict):
    workers: Int = Field(2, ge=1, le=4096)
    prompts_per_batch: Int = Field(2, ge=1)
    # Rows per sampling forward; None runs every branch of the batch at once. A cap trades speed for memory
    # (a G2RPO batch on FLUX is 96 rows, 25 GiB of activations); the samples are the same either way.
    max_batch_rows: Optional[Int] = Field(None, ge=1)
    num_cpus: Float = Field(0.25, ge=0)
    num_gpus: Float = Field(0.0, ge=0)
    resources: Resources = {}  # custom Ray resources per worker (placement on labelled nodes)
    # How new weights reach the workers: through Ray's object store (tiny models, LoRA), or broadcast
    # in flat buckets over a process group of the learner's rank 0 and the workers (nccl on GPU, gloo on CPU).
    weight_sync: Literal["object_store", "collective"] = "object_store"
    sync_bucket_mb: Int = Field(256, ge=1, le=16384)
    # auto: nccl when the learner has a GPU, else gloo; gloo also where NCCL cannot go (two ranks on one GPU)
    sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    max_restarts: Int = Field(3, ge=0, le=1000)  # a dead worker is restarted and rejoins at its prompt cursor
    reward_retries: Int = Field(3, ge=0, le=100)  # a failed reward call is retried (the group is kept)


class LearnerConfig(Strict):
    workers: Int = Field(1, ge=1, le=4096)
    # ddp: every rank holds the whole model, gradients and optimizer state (LoRA, small models);
    # fsdp: FSDP2 shards them per transformer block, float32 master weights, bf16 compute (full fine-tunes).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # auto: nccl with GPUs, else gloo. nccl runs as "cpu:gloo,cuda:nccl": the learner's small CPU reductions
    # (minibatch counts, metrics) go through gloo, since NCCL reduces CUDA tensors only.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    num_cpus: Float = Field(0.5, ge=0)
    num_gpus: Float = Field(0.0, ge=0)
    resources: Resources = {}  # custom Ray resources per worker (placement on labelled nodes)
    iterations: Int = Field(20, ge=1)
    prompts_per_step: Int = Field(4, ge=1)  # prompts whose groups make one update
    minibatch_rows: Int = Field(8, ge=1)  # (prompt, entry) rows per gradient step
    # random: shuffled rows, minibatch_rows each; by_entry: the paper's code, one optimizer step per plan
    # entry (step index) over all of the step's prompts
    minibatch: Literal["random", "by_entry"] = "random"
    epochs: Int = Field(1, ge=1, le=100)  # passes over each batch
    # Measure how much of each update is signal (algo/gradient_noise.py): pairs of updates, one float32
    # gradient-sized buffer per rank (a shard under FSDP); the run's summary gives the share and the noise scale.
    gradient_noise: Bool = True
    # Where that buffer lives: beside the gradients, or in (pinned) host memory, costing one copy of each
    # first-epoch minibatch gradient across PCIe in the measured updates and no GPU memory.
    gradient_noise_buffer: Literal["device", "host"] = "device"
    lr: Float = Field(2e-6, gt=0, le=1)
    weight_decay: Float = Field(1e-4, ge=0)
    adam_eps: Float = Field(1e-8, gt=0, le=1)  # AdamW's epsilon (torch's default); docs/benchmarks.md section 1
    grad_clip: Float = Field(1.0, gt=0)
    max_staleness: Int = Field(0, ge=0)
    queue_capacity: Int = Field(64, ge=1)
    checkpoint_every: Int = Field(10, ge=1)
    keep_checkpoints: Optional[Int] = Field(3, ge=1)  # the last K checkpoints (and the best) are kept; None = all
    max_failures: Int = Field(2, ge=0, le=1000)  # learner group restarts from the latest checkpoint


class ClusterConfig(Strict):
    # None: start a local cluster (the embedded default); "auto" or "ray://...": attach to one.
    address: Optional[Path_] = None
    # Scopes this run's Serve applications on a shared cluster; None: the driver picks one per run.
    run_name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    num_cpus: Optional[Float] = Field(None, gt=0)
    startup_timeout_s: Float = Field(60.0, gt=0)
    http_enabled: Bool = False
    http_host: Text = "127.0.0.1"
    http_port: Int = Field(8000, ge=1, le=65535)
    max_image_bytes: Int = Field(8 << 20, ge=1)
    max_images_per_request: Int = Field(64, ge=1)
    max_image_pixels: Int = Field(2048 * 2048, ge=1)  # reward HTTP: larger images are refused (400)
    # a reward call (HTTP, or a worker's through its handle) that takes longer: 503, or a retried TimeoutError
    reward_timeout_s: Float = Field(120.0, gt=0)
    max_requests_in_flight: Int = Field(32, ge=1)  # reward HTTP: more concurrent requests answer 503


class LoggingConfig(Strict):
    output_dir: Path_ = "runs/tiny"
    log_every: Int = Field(1, ge=1)
    grid_every: Int = Field(10, ge=1)
    # Metrics go through Ray's metrics agent (monitoring.py). The run copies its cluster's Prometheus file_sd
    # targets to <output_dir>/prometheus_targets.json and, when this is set, to <dir>/<run name>.json.
    prometheus_targets_dir: Optional[Path_] = None

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            gone = [k for k in ("metrics_port", "metrics_host") if k in data]
            if gone:
                raise ValueError(f"{gone[0]} was removed: the run's metrics now go through Ray's metrics agent "
                                 "(no port of its own; see the README's Monitoring section)")
        return data


class ExperimentConfig(Strict):
    seed: Int = Field(0, ge=0, le=2**63 - 1)
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
        if self.algorithm.old_logprob == "recompute" and self.learner.max_staleness > 0:
            raise ValueError("algorithm.old_logprob 'recompute' with learner.max_staleness > 0 would treat stale "
                             "samples as on-policy; use 'decoupled' (or 'auto')")
        if self.learner.prompts_per_step % self.learner.workers:
            raise ValueError("learner.prompts_per_step must be a multiple of learner.workers")
        share, batch = self.learner.prompts_per_step // self.learner.workers, self.rollout.prompts_per_batch
        if share % batch:  # a rank takes whole batches: it would train on more prompts than asked
            raise ValueError(f"each learner rank's share of learner.prompts_per_step ({share}) must be a multiple of "
                             f"rollout.prompts_per_batch ({batch}): a rank takes whole batches")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"rewards lists {dup!r} twice (one entry per reward)")
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
        _check_aliases(raw, f"--set {key.strip()}")
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
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


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML, not a data file
MAX_YAML_ALIASES = 64  # anchors are for sharing a block or two; thousands of aliases is an expansion bomb


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let SafeLoader report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_error(where: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    line = f" (line {mark.line + 1})" if mark is not None else ""
    problem = getattr(err, "problem", None) or (err.reason if isinstance(err, yaml.reader.ReaderError) else None)
    detail = f": {' '.join(str(problem).split())}" if problem else ""
    return ConfigError(f"{where}: invalid YAML{line}{detail}")


def _check_aliases(text: str, where: str) -> None:
    """Refuse many aliases before constructing anything (raises yaml.YAMLError on unparsable text)."""
    aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{where}: more than {MAX_YAML_ALIASES} YAML aliases (an alias expansion bomb?)")


def parse_yaml_config(text: str, where: str) -> Any:
    """YAML text -> data, refusing alias bombs and duplicate keys; errors are one-line ConfigErrors."""
    try:
        _check_aliases(text, where)
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(where, err) from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def read_config_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"config file is not a file: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {size} bytes is too large for a config file (limit {MAX_CONFIG_BYTES})")
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {err.start}); a config is YAML text") from None
    bad = next((i for i, c in enumerate(text) if c == "\x00"), None)
    if bad is not None:
        raise ConfigError(f"{p}: NUL byte at offset {bad}; a config is YAML text")
    return text.removeprefix("\ufeff")


# The embedded default config: configs/tiny.yaml, shipped in the package (a link to it in the source tree).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "assets" / "default.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (None = the embedded default, configs/tiny.yaml), apply ``key=value`` overrides, validate."""
    path = DEFAULT_CONFIG if path is None else path
    data: Any = parse_yaml_config(read_config_text(path), str(Path(path).expanduser()))
    if data is None:
        data = {}
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
