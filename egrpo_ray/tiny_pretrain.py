"""Pre-training of the tiny text-to-image model (egrpo_ray/models/tiny.py) by flow matching, from scratch.

Data: the shapes task's combinations that pre-training may see (``pretraining_scenes``: training ones,
never held-out or relation/count validation ones), drawn per sample by the kind mixture
``HPARAMS["mixture"]`` (single objects 0.6, relations 0.3, counts 0.1: single objects are learned well,
the compositional prompts only weakly, which leaves RL room), then uniformly by combination, then a
layout uniformly among the prompt's valid ones (tasks/scenes.py).

Rectified flow on those images: x_s = (1 - s) x0 +
s eps with s ~ logit-normal (sigmoid of N(0, 1)), target velocity eps - x0, MSE loss; AdamW (lr 1e-3,
linear warm-up, cosine decay to 1e-4, weight decay 0.01), grad-norm clip 1, EMA of the weights (decay
0.995 with the usual (1 + t) / (10 + t) warm-up). A fixed step count and seed make a run reproducible
(bitwise on the same machine, torch build and thread count). The EMA weights of the transformer and the
text encoder are written as ``model.safetensors`` with a ``manifest.json`` (written again with the
evaluation, ``evaluate_tiny``, once it is done; ``reevaluate`` recomputes it for written weights).

CLI: ``egrpo-ray pretrain-tiny [--output-dir DIR] [--seed N] [--steps N]`` (also
``python -m egrpo_ray.tiny_pretrain pretrain-tiny ...``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from egrpo_ray.algo.schedule import shifted_sigmas
from egrpo_ray.algo.sde import ode_step
from egrpo_ray.models import tiny
from egrpo_ray.models.base import Policy
from egrpo_ray.quality import image_quality
from egrpo_ray.rewards.alignment import SCENE_TERMS, TERMS, AlignmentReward, object_stats
from egrpo_ray.tasks import scenes, shapes

log = logging.getLogger("egrpo_ray.tiny_pretrain")

DEFAULT_STEPS = 1500
DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "egrpo_ray/assets/tiny"
HPARAMS: dict[str, Any] = {
    "batch_size": 64,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,
    "ema_decay": 0.995,
    "logit_normal_mean": 0.0,
    "logit_normal_std": 1.0,
    # Share of each prompt kind in a batch: single objects are meant to be learned well, relations
    # and counts only weakly, so that RL has room on them (and groups with spread).
    "mixture": {"single": 0.6, "relation": 0.3, "count": 0.1},
}
EVAL = {"steps": 16, "shift": 3.0, "seed": 0, "samples_per_prompt": 4}


def _threads() -> int:
    """OMP_NUM_THREADS when set (1 on a shared machine: more threads there run far slower), else up to 2."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(
    policy: Policy,
    prompts: Sequence[str],
    steps: int = 16,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Deterministic Euler ODE sampling (shifted schedule) -> images [B, 3, H, W] in [0, 1]."""
    sigmas = shifted_sigmas(steps, shift)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=generator, dtype=torch.float32)
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo : lo + batch_size])
        cond = policy.encode_prompts(chunk)
        x = noise[lo : lo + batch_size]
        n = len(chunk)
        for k in range(steps):
            s, s_next = sigmas[k].float().expand(n), sigmas[k + 1].float().expand(n)
            x = ode_step(x, policy(x, s, cond), s, s_next)
        out.append(policy.decode(x))
    return torch.cat(out)


def summarize_images(images: torch.Tensor, prompts: Sequence[str], reward: AlignmentReward | None = None) -> dict[str, float]:
    """Mean alignment reward, its terms, and the independent object statistics of a batch."""
    reward = reward or AlignmentReward()
    terms = reward.terms(images, prompts)
    stats = object_stats(images)
    out = {"alignment": terms["reward"].mean().item()}
    out.update({f"term_{k}": terms[k].mean().item() for k in (*TERMS, *SCENE_TERMS, "presence")})
    out["object_area_px"] = stats["area"].mean().item()
    aspect = stats["aspect"][~stats["aspect"].isnan()]
    out["object_aspect_hw"] = aspect.mean().item() if len(aspect) else float("nan")
    out.update({f"quality_{k}": v for k, v in image_quality(images).items()})  # independent of the reward
    out["n_images"] = len(prompts)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def evaluate_alignment(
    policy: Policy,
    prompts: Sequence[str],
    steps: int = 16,
    shift: float = 3.0,
    seed: int = 0,
    samples_per_prompt: int = 4,
) -> dict[str, float]:
    """Sample ``samples_per_prompt`` images per prompt (seeded ODE) and summarise them.

    Returns ``alignment`` (mean reward), ``term_*`` (mean of each reward term), ``object_area_px`` and
    ``object_aspect_hw`` (the independent diagnostic), ``n_images``, ``images_per_s``.
    """
    was_training = policy.training
    policy.eval()
    reps = [p for p in prompts for _ in range(samples_per_prompt)]
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images = sample_images(policy, reps, steps, shift, g)
    dt = time.perf_counter() - t0
    policy.train(was_training)
    out = summarize_images(images, reps)
    out["images_per_s"] = round(len(reps) / dt, 2)
    return out


def ground_truth_alignment(prompts: Sequence[str], seed: int = 0) -> dict[str, float]:
    """The reward of ground-truth renders (one sampled layout per prompt)."""
    g = torch.Generator().manual_seed(seed)
    return summarize_images(scenes.render_scenes(prompts, g), list(prompts))


def _merge(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Image-weighted mean of summaries of disjoint image sets."""
    n = sum(p["n_images"] for p in parts)
    out = {k: round(sum(p[k] * p["n_images"] for p in parts) / n, 4) for k in parts[0] if k not in ("n_images", "images_per_s")}
    return {**out, "n_images": n}


def evaluate_tiny(policy: Policy, seed: int = 0) -> dict[str, Any]:
    """The manifest's evaluation: held-out prompts by kind (and all together), training prompts by kind
    (an evenly spread subset), a validation subset, and random weights and ground truth on held-out."""
    evaluation: dict[str, Any] = {"settings": dict(EVAL)}
    pools = pretraining_scenes()
    for kind in ("single", "relation", "count"):
        evaluation[f"heldout_{kind}"] = evaluate_alignment(policy, scenes.prompts("heldout", (kind,)), **EVAL)
        train = [s.prompt for s in pools[kind]]
        evaluation[f"train_{kind}"] = evaluate_alignment(policy, train[:: max(1, len(train) // 36)], **EVAL)
        log.info("%s alignment: held-out %.3f, train %.3f", kind, evaluation[f"heldout_{kind}"]["alignment"], evaluation[f"train_{kind}"]["alignment"])
    evaluation["heldout"] = _merge([evaluation[f"heldout_{k}"] for k in ("single", "relation", "count")])
    evaluation["train_subset"] = _merge([evaluation[f"train_{k}"] for k in ("single", "relation", "count")])
    evaluation["validation_subset"] = evaluate_alignment(policy, scenes.prompts("validation")[:48], **EVAL)
    heldout = scenes.prompts("heldout")
    evaluation["heldout_random_weights"] = evaluate_alignment(tiny.build_tiny_policy(seed + 12345), heldout[:48], **EVAL)
    evaluation["heldout_ground_truth"] = ground_truth_alignment(heldout, seed)
    log.info("held-out alignment %.3f: random weights %.3f, ground truth %.3f", evaluation["heldout"]["alignment"],
             evaluation["heldout_random_weights"]["alignment"], evaluation["heldout_ground_truth"]["alignment"])
    return evaluation


def reevaluate(directory: str | Path = DEFAULT_OUTPUT_DIR) -> dict[str, Any]:
    """Recompute the evaluation of a written model and rewrite its manifest (the weights are unchanged)."""
    manifest = tiny.check_tiny_files(directory)
    from egrpo_ray.config import ModelConfig

    policy = tiny.load_tiny_policy(ModelConfig(path=str(directory)))
    manifest["evaluation"] = evaluate_tiny(policy, manifest.get("seed", 0))
    return write_outputs(policy, directory, manifest)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def pretraining_scenes() -> dict[str, list[scenes.Scene]]:
    """Per kind, the combinations pre-training may see (never held-out ones; see tasks/scenes.py)."""
    return {k: [s for s in scenes.scenes(k) if scenes.in_pretraining(s)] for k in ("single", "relation", "count")}


def _sample_batch(pools, kinds, weights, tokens, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch drawn by the kind mixture, then a combination uniformly, then a layout uniformly:
    (x0 latents [B, 64, 48], token ids [B, L], mask [B, L])."""
    kind_idx = torch.multinomial(weights, batch, replacement=True, generator=g).tolist()
    images, ids, mask = [], [], []
    for k in kind_idx:
        kind = kinds[k]
        i = int(torch.randint(len(pools[kind]), (1,), generator=g))
        images.append(scenes.render_objects(scenes.sample_objects(pools[kind][i], g)))
        ids.append(tokens[kind][0][i])
        mask.append(tokens[kind][1][i])
    return tiny.images_to_latents(torch.stack(images)), torch.stack(ids), torch.stack(mask)


def lr_at(step: int, steps: int, hp: dict[str, Any]) -> float:
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    t = (step - hp["warmup_steps"]) / max(1, steps - hp["warmup_steps"])
    return hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (1 + math.cos(math.pi * min(1.0, t)))


def pretrain(seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, hparams: dict[str, Any] | None = None, progress: bool = True) -> tuple[tiny.TinyPolicy, dict[str, Any]]:
    """Train from scratch; returns (policy holding the EMA weights, text encoder frozen; training stats)."""
    from tqdm.auto import tqdm

    hp = {**HPARAMS, **(hparams or {})}
    _threads()
    policy = tiny.build_tiny_policy(seed)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"])

    pools = pretraining_scenes()
    kinds = list(pools)
    weights = torch.tensor([hp["mixture"][k] for k in kinds], dtype=torch.float64)
    tokens = {k: policy.text_encoder.tokenize([s.prompt for s in pools[k]]) for k in kinds}
    g = torch.Generator().manual_seed(seed + 1)
    B = hp["batch_size"]
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="pretrain-tiny", disable=not progress, mininterval=2.0, file=sys.stderr)
    for step in bar:
        lr = lr_at(step, steps, hp)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, ids, mask = _sample_batch(pools, kinds, weights, tokens, B, g)
        s = torch.sigmoid(hp["logit_normal_mean"] + hp["logit_normal_std"] * torch.randn(B, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        sb = s.view(B, 1, 1)
        xs = (1 - sb) * x0 + sb * eps
        emb, pooled = policy.text_encoder(ids, mask)
        v = policy(xs, s, {"prompt_embeds": emb, "pooled": pooled})
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        d = min(hp["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.1e}", gnorm=f"{float(gnorm):.2f}")
        if step % 200 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log.info("step %d/%d loss(avg50) %.4f lr %.2e elapsed %.0fs", step + 1, steps, recent, lr, time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    policy.freeze_text_encoder()
    policy.eval()
    stats = {
        "train_wall_s": round(wall, 1),
        "s_per_step": round(wall / max(1, steps), 4),
        "train_cpu_s": round(cpu, 1),  # process CPU time: compare runs on a shared machine by this
        "loss_first50": round(sum(losses[:50]) / max(1, len(losses[:50])), 4),
        "loss_last50": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "hparams": hp,
    }
    return policy, stats


def write_outputs(policy: tiny.TinyPolicy, out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write model.safetensors then manifest.json (with the file's sha256); returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sha = tiny.save_tiny_weights(policy, out)
    manifest = {**manifest, "sha256": sha, "weights_file": tiny.WEIGHTS_FILE, "weights_bytes": (out / tiny.WEIGHTS_FILE).stat().st_size}
    tmp = out / (tiny.MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / tiny.MANIFEST_FILE)
    return manifest


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import diffusers

    threads = _threads()
    args.output_dir = DEFAULT_OUTPUT_DIR if args.output_dir is None else args.output_dir
    args.seed = DEFAULT_SEED if args.seed is None else args.seed
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    if args.steps < 1:
        log.error("--steps must be >= 1")
        return 2
    command = f"egrpo-ray pretrain-tiny --output-dir {args.output_dir} --seed {args.seed} --steps {args.steps}"
    log.info("pre-training the tiny model: %d steps, seed %d, %d threads, data %s -> %s", args.steps, args.seed, threads, shapes.DATA_VERSION, args.output_dir)
    t_start = time.perf_counter()
    policy, stats = pretrain(args.seed, args.steps, progress=not args.no_progress)
    log.info("trained in %.0fs (%.3fs/step); loss %.4f -> %.4f", stats["train_wall_s"], stats["s_per_step"], stats["loss_first50"], stats["loss_last50"])

    manifest = {
        "format": 1,
        "name": "egrpo-ray tiny flow model",
        "model_config": policy.model_config,
        "num_params": {
            "transformer": sum(p.numel() for p in policy.transformer.parameters()),
            "text_encoder": sum(p.numel() for p in policy.text_encoder.parameters()),
        },
        "data_version": shapes.DATA_VERSION,
        "seed": args.seed,
        "steps": args.steps,
        "command": command,
        "argv": sys.argv,
        "training": stats,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(), "threads": threads, "machine": platform.machine()},
    }
    write_outputs(policy, args.output_dir, manifest)  # the weights are safe before the (slower) evaluation
    manifest["evaluation"] = evaluate_tiny(policy, args.seed)
    manifest["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    manifest = write_outputs(policy, args.output_dir, manifest)
    log.info("wrote %s (%d bytes, sha256 %s) and %s", tiny.WEIGHTS_FILE, manifest["weights_bytes"], manifest["sha256"], tiny.MANIFEST_FILE)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from egrpo_ray.cli import main as cli_main  # the arguments are declared with every other command's

    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
