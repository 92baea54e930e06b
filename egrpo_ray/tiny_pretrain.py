"""Pre-training of the tiny text-to-image model (egrpo_ray/models/tiny.py) by flow matching, from scratch.

Rectified flow on the shapes task's training combinations (never the held-out ones): x_s = (1 - s) x0 +
s eps with s ~ logit-normal (sigmoid of N(0, 1)), target velocity eps - x0, MSE loss; AdamW (lr 1e-3,
linear warm-up, cosine decay to 1e-4, weight decay 0.01), grad-norm clip 1, EMA of the weights (decay
0.995 with the usual (1 + t) / (10 + t) warm-up). A fixed step count and seed make a run reproducible
(bitwise on the same machine, torch build and thread count). The EMA weights of the transformer and the
text encoder are written as ``model.safetensors`` with a ``manifest.json``.

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
from egrpo_ray.rewards.alignment import TERMS, AlignmentReward, object_stats
from egrpo_ray.tasks import shapes

log = logging.getLogger("egrpo_ray.tiny_pretrain")

DEFAULT_STEPS = 1400
DEFAULT_SEED = 0
DEFAULT_OUTPUT_DIR = "egrpo_ray/assets/tiny"
HPARAMS: dict[str, Any] = {
    "batch_size": 96,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,
    "ema_decay": 0.995,
    "logit_normal_mean": 0.0,
    "logit_normal_std": 1.0,
}
EVAL = {"steps": 16, "shift": 3.0, "seed": 0, "samples_per_prompt": 4}


def _threads() -> int:
    n = min(2, os.cpu_count() or 1)
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
    out.update({f"term_{k}": terms[k].mean().item() for k in (*TERMS, "presence")})
    out["object_area_px"] = stats["area"].mean().item()
    aspect = stats["aspect"][~stats["aspect"].isnan()]
    out["object_aspect_hw"] = aspect.mean().item() if len(aspect) else float("nan")
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


def ground_truth_alignment(prompts: Sequence[str]) -> dict[str, float]:
    return summarize_images(shapes.render_prompts(prompts), list(prompts))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
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

    specs = shapes.train_specs()
    x0_all = tiny.images_to_latents(shapes.render_batch(specs))  # [N, 64, 48]
    ids_all, mask_all = policy.text_encoder.tokenize([s.prompt for s in specs])
    g = torch.Generator().manual_seed(seed + 1)
    B = hp["batch_size"]
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="pretrain-tiny", disable=not progress, mininterval=2.0, file=sys.stderr)
    for step in bar:
        lr = lr_at(step, steps, hp)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(specs), (B,), generator=g)
        x0 = x0_all[idx]
        s = torch.sigmoid(hp["logit_normal_mean"] + hp["logit_normal_std"] * torch.randn(B, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        sb = s.view(B, 1, 1)
        xs = (1 - sb) * x0 + sb * eps
        emb, pooled = policy.text_encoder(ids_all[idx], mask_all[idx])
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
    if args.steps < 1:
        log.error("--steps must be >= 1")
        return 2
    command = f"egrpo-ray pretrain-tiny --output-dir {args.output_dir} --seed {args.seed} --steps {args.steps}"
    log.info("pre-training the tiny model: %d steps, seed %d, %d threads, data %s -> %s", args.steps, args.seed, threads, shapes.DATA_VERSION, args.output_dir)
    t_start = time.perf_counter()
    policy, stats = pretrain(args.seed, args.steps, progress=not args.no_progress)
    log.info("trained in %.0fs (%.3fs/step); loss %.4f -> %.4f", stats["train_wall_s"], stats["s_per_step"], stats["loss_first50"], stats["loss_last50"])

    heldout, train = shapes.heldout_prompts(), shapes.train_prompts()
    evaluation = {"settings": dict(EVAL)}
    evaluation["heldout"] = evaluate_alignment(policy, heldout, **EVAL)
    log.info("held-out alignment %.3f %s", evaluation["heldout"]["alignment"], evaluation["heldout"])
    evaluation["train_subset"] = evaluate_alignment(policy, train[:: max(1, len(train) // 36)], **EVAL)
    log.info("train-prompt alignment %.3f", evaluation["train_subset"]["alignment"])
    evaluation["heldout_random_weights"] = evaluate_alignment(tiny.build_tiny_policy(args.seed + 12345), heldout, **EVAL)
    evaluation["heldout_ground_truth"] = ground_truth_alignment(heldout)
    log.info("held-out alignment: random weights %.3f, ground truth %.3f", evaluation["heldout_random_weights"]["alignment"], evaluation["heldout_ground_truth"]["alignment"])

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
        "evaluation": evaluation,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(), "threads": threads, "machine": platform.machine()},
    }
    manifest = write_outputs(policy, args.output_dir, manifest)
    log.info("wrote %s (%d bytes, sha256 %s) and %s", tiny.WEIGHTS_FILE, manifest["weights_bytes"], manifest["sha256"], tiny.MANIFEST_FILE)
    return 0


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pretrain-tiny`` on an argparse subparsers object (handler: ``args.func(args)``)."""
    p = subparsers.add_parser("pretrain-tiny", help="pre-train the tiny text-to-image model from scratch (CPU, minutes)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where model.safetensors and manifest.json go (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed for init, data and noise (default: {DEFAULT_SEED})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default: {DEFAULT_STEPS}, about 11-12 min on 2 idle cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egrpo_ray.tiny_pretrain")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
