"""GPU check for one H100 / H200: FLUX.1-dev-sized transformer with random weights, bf16.

Measures, in one process (about 2-3 minutes on an H100; 70-80 s on an H200 with --skip-sync):
1. the bare transformer forward at 512 px, batch 8 (ms per image): the reference;
2. the real sampler through FluxPolicy at the same size: ``sample_ode`` over 16 steps at batch 8, and
   E-GRPO's ``branching_rollout`` (1 prompt, G = 8, the paper's merge plan, max_batch 8, mixed
   timesteps in a batch), as ms per image-step and the ratio to (1) (target: within 10 %);
3. one learner step (``egrpo_ray.training.learn``: recompute old log-probs, clipped surrogate,
   backward, optimizer step) on that rollout's 5 (prompt, entry) rows with gradient checkpointing,
   LoRA (rank 64 on every attention projection, AdamW), its peak memory against ``egrpo-ray plan --memory``'s;
   then the gradient-noise buffer on the GPU and in pinned host memory fed the same gradients (statistics must agree);
4. a 1-rank FSDP full fine-tune step (egrpo_ray/parallel.py: float32 master weights, bf16 compute, AdamW)
   on a FLUX-width transformer with fewer blocks (the full 12B needs 16 B/param = 192 GB on one rank; the
   paper's setting shards it over 8 ranks), its peak memory against ``egrpo-ray plan --memory``'s
   estimate for the same model (egrpo_ray/memory_plan.py); then pairs of steps without and with the
   gradient-noise measure, its buffer on the GPU and in host memory (time and peak memory);
5. the collective weight sync (egrpo_ray/distributed/weight_sync.py) of the full bf16 FLUX.1-dev
   transformer (~24 GB) between two processes, run first while the GPU is empty: nccl (NCCL refuses two
   ranks on one GPU, so on a one-GPU machine this records its error) and gloo through host memory;
6. peak GPU memory of each phase.

cuDNN attention stays off (torch 2.11 crashed with an illegal memory access in forward+backward with
gradient checkpointing); flash / memory-efficient SDPA are used.

    python benchmarks/gpu_check.py            # on the GPU machine; prints one JSON line per phase
    python benchmarks/gpu_check.py --tiny     # a seconds-long CPU smoke run of the same code paths
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# FLUX.1-dev transformer/config.json (black-forest-labs/FLUX.1-dev)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def log(**kw):
    print(json.dumps(kw), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else 0.0


def timed(fn, device, repeats: int):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats, out


def build_transformer(dims: dict, device, dtype):
    from diffusers import FluxTransformer2DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights directly in bf16 on the GPU (24 GB, no fp32 copy)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**dims)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


def tiny_vae():
    """Only its config is used (scaling factors, 8x downsampling): decode is not benchmarked."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8],
                         layers_per_block=1, latent_channels=16, norm_num_groups=4,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def make_policy(transformer, resolution: int, lora: bool):
    from egrpo_ray.config import LoraConfig, ModelConfig
    from egrpo_ray.models.flux import FluxPolicy

    cfg = ModelConfig(kind="flux", path="random-init", dtype="bfloat16", resolution=resolution, guidance=3.5,
                      gradient_checkpointing=True,
                      lora=LoraConfig(enabled=lora, rank=64, alpha=64.0, target_modules=LORA_TARGETS))
    # no text encoders: conditioning is random and put into the policy's prompt cache
    return FluxPolicy(transformer, tiny_vae(), None, None, None, None, cfg), cfg


def random_cond(n: int, seq: int, dims: dict, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(n, seq, dims["joint_attention_dim"], generator=g).to(device, dtype),
        "pooled_prompt_embeds": torch.randn(n, dims["pooled_projection_dim"], generator=g).to(device, dtype),
    }


def _init_single_rank_group(device) -> None:
    import os

    import torch.distributed as dist

    from egrpo_ray.distributed.cluster import free_port
    from egrpo_ray.distributed.driver import LEARNER_BACKENDS  # the learner's own group: gloo beside NCCL

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(LEARNER_BACKENDS["nccl" if device.type == "cuda" else "gloo"], rank=0, world_size=1)


def learner_plan(cfg, dims: dict, noise_buffer: str | None = None):
    """egrpo-ray plan's learner memory for the model measured (no text encoders, no VAE), with the gradient-noise
    buffer where it lives in the steps measured (None: no buffer, as in steps that pass no ``noise``)."""
    from egrpo_ray.memory_plan import learner_memory, policy_parts

    learner = cfg.learner.model_copy(update={"gradient_noise": noise_buffer is not None,
                                             "gradient_noise_buffer": noise_buffer or "device"})
    return learner_memory(cfg.model_copy(update={"learner": learner}),
                          policy_parts(cfg.model, transformer_config=dims, with_frozen=False))


def fsdp_full_step(args, dims, device, item, exp, strategy, prompts, cond) -> dict:
    """Two learner steps of a 1-rank FSDP full fine-tune; peak memory against the memory plan."""
    import torch.distributed as dist

    from egrpo_ray.parallel import prepare_for_training
    from egrpo_ray.training import learn

    import gc

    double, single = args.fsdp_blocks
    small = {**dims, "num_layers": double, "num_single_layers": single}
    gc.collect()
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # what earlier phases left behind
    _init_single_rank_group(device)
    try:
        policy, model_cfg = make_policy(build_transformer(small, device, torch.bfloat16), args.resolution, lora=False)
        policy.cache.put(prompts, cond)
        fn = prepare_for_training(policy, "fsdp", torch.bfloat16, device)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-6, weight_decay=1e-4)
        cfg = exp.model_copy(update={"model": model_cfg, "learner": exp.learner.model_copy(
            update={"parallelism": "fsdp", "workers": 1, "num_gpus": 1.0 if device.type == "cuda" else 0.0})})
        reset_peak(device)
        seconds = []
        for k in range(2):  # the second step holds AdamW's moments
            sync(device)
            t = time.perf_counter()
            stats = learn(fn, policy, [item], cfg, strategy, opt, torch.Generator().manual_seed(3 + k))
            sync(device)
            seconds.append(round(time.perf_counter() - t, 2))
        measured = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else 0
        plan = learner_plan(cfg, small)
        planned = plan.step_peak  # one forward + backward + optimizer step (no held-out eval, no prompt cache)
        out = {"blocks": [double, single], "params_b": round(sum(p.numel() for p in params) / 1e9, 3),
               "seconds": seconds, "ratio_mean_first": stats["ratio_mean_first"], "grad_norm": stats["grad_norm"],
               "peak_gib": peak_gib(device), "baseline_gib": round(baseline / 2**30, 2),
               "measured_gib": round(measured / 2**30, 2), "plan_gib": round(planned / 2**30, 2),
               "plan_phases_gib": {k: round(v / 2**30, 2) for k, v in plan.phases.items()}}
        if measured:
            out["plan_error"] = round(planned / measured - 1, 3)  # the target: within +-0.15
        out.update(gradient_noise_cost(fn, policy, item, cfg, strategy, opt, device))
        if measured:  # the device buffer's plan against its steps' peak
            out["plan_noise_device_gib"] = round(learner_plan(cfg, small, "device").step_peak / 2**30, 2)
            measured_noise = out["noise_device_peak_gib"] - out["baseline_gib"]
            out["plan_noise_device_error"] = round(out["plan_noise_device_gib"] / measured_noise - 1, 3)
        return out
    finally:
        dist.destroy_process_group()


def gradient_noise_cost(fn, policy, item, cfg, strategy, opt, device) -> dict:
    """Learner steps in pairs without and with learner.gradient_noise (its buffer on the GPU, then in pinned host
    memory): seconds per pair once the buffer exists (the first pair allocates it, and is timed apart), and the
    buffer's extra peak GPU memory."""
    from egrpo_ray.algo.gradient_noise import GradientNoise
    from egrpo_ray.training import learn

    def pair(noise) -> float:  # the first keeps its gradient, the second dots into it
        sync(device)
        t = time.perf_counter()
        for k in range(2):
            learn(fn, policy, [item], cfg, strategy, opt, torch.Generator().manual_seed(5 + k), noise=noise)
        sync(device)
        return round(time.perf_counter() - t, 2)

    out = {}
    for where in ("none", "device", "host"):
        noise = None if where == "none" else GradientNoise(on_host=where == "host")
        reset_peak(device)
        out[f"noise_{where}_first_pair_seconds"] = pair(noise)
        out[f"noise_{where}_pair_seconds"] = pair(noise)
        out[f"noise_{where}_peak_gib"] = peak_gib(device)
    for where in ("device", "host"):
        out[f"noise_{where}_time_ratio"] = round(out[f"noise_{where}_pair_seconds"] / out["noise_none_pair_seconds"], 3)
    return out


def gradient_noise_buffers_agree(device, numel: int = 50_000_000) -> dict:
    """The same gradients through the device and the host buffer (two minibatches an update, two updates), against
    float64 sums: the host path's asynchronous PCIe copies must give the device path's statistics."""
    from egrpo_ray.algo.gradient_noise import GradientNoise

    g = torch.Generator(device).manual_seed(7)
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in (numel, numel // 3, 1000)]
    grads = [[[torch.randn(p.shape, generator=g, device=device) for p in params] for _ in range(2)] for _ in range(2)]
    stats = {}
    for where in ("device", "host"):
        noise, records = GradientNoise(on_host=where == "host"), {}
        for update in grads:
            for minibatch in update:
                for p, grad in zip(params, minibatch):
                    p.grad = grad.clone()
                noise.add(params)
                for p in params:
                    p.grad.mul_(-1)  # the optimizer's in-place work after the add must not reach the buffer
            records.update(noise.finish())
        stats[where] = records
    mean = [torch.cat([(a + b).double().flatten() for a, b in zip(*update)]) / 2 for update in grads]
    exact = {"grad_step_sq": float(mean[0] @ mean[0]), "grad_signal_sq": float(mean[1] @ mean[0])}
    scale = exact["grad_step_sq"]  # errors relative to |A|^2, the share's denominator
    error = max(abs(stats[w][k] - exact[k]) / scale for w in stats for k in exact)
    host_vs_device = max(abs(stats["host"][k] - stats["device"][k]) / scale for k in exact)
    return {"numel": sum(p.numel() for p in params), **{f"{w}_{k}": v for w in stats for k, v in stats[w].items()},
            "exact": exact, "max_error_vs_exact": error, "host_vs_device": host_vs_device,
            "agree": error < 1e-5 and host_vs_device < 1e-6}


def _sync_rank(rank: int, port: int, dims: dict, device_type: str, backend: str, bucket_mb: int, result) -> None:
    """One side of a weight sync: rank 0 sends random bf16 weights of the transformer's shapes, rank 1
    receives them into staging and applies them to its own copy; both report seconds and a checksum."""
    from diffusers import FluxTransformer2DModel

    from egrpo_ray.distributed.weight_sync import BucketReceiver, BucketSender, SyncGroup, TensorSpec, bucket_layout, open_store

    try:
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
        with torch.device("meta"):
            shapes = [(n, tuple(p.shape)) for n, p in FluxTransformer2DModel(**dims).named_parameters()]
        specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes]
        layout = bucket_layout(specs, bucket_mb << 20)
        g = torch.Generator(device).manual_seed(0)
        weights = {n: torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) if rank == 0
                   else torch.zeros(s, device=device, dtype=torch.bfloat16) for n, s in shapes}
        group = SyncGroup(open_store("127.0.0.1", port, rank, 2, 120), rank, 2, backend,
                          device if backend == "nccl" else None, 120)
        sync(device)
        t0 = time.perf_counter()
        if rank == 0:
            sender = BucketSender(group, specs, layout)
            for n, _ in shapes:
                sender.add(n, weights[n])
            sender.finish()
        else:
            receiver = BucketReceiver(group, layout)
            receiver.receive()
            t_received = time.perf_counter()
            receiver.apply(weights)
        sync(device)
        t1 = time.perf_counter()
        checksum = float(sum(w.float().sum() for w in weights.values()))
        out = {"rank": rank, "seconds": round(t1 - t0, 3), "checksum": checksum}
        if rank == 1:
            out["receive_seconds"] = round(t_received - t0, 3)
        result.put(out)
    except Exception as err:  # reported, not raised: the other phases still run
        result.put({"rank": rank, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})


def weight_sync_two_processes(dims: dict, device, backend: str, bucket_mb: int = 256) -> dict:
    import multiprocessing as mp

    from egrpo_ray.distributed.cluster import free_port

    ctx = mp.get_context("spawn")
    result, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_sync_rank, args=(r, port, dims, device.type, backend, bucket_mb, result)) for r in (0, 1)]
    for p in procs:
        p.start()
    reports = []
    for _ in procs:
        try:
            reports.append(result.get(timeout=240))
        except Exception:
            reports.append({"error": "timed out"})
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    nbytes = 2 * sum(torch.Size(s).numel() for s in
                     [tuple(p.shape) for p in _meta_params(dims)])
    out = {"gib": round(nbytes / 2**30, 2), "bucket_mb": bucket_mb, "reports": sorted(reports, key=lambda r: r.get("rank", 9))}
    ok = [r for r in reports if "seconds" in r]
    if len(ok) == 2:
        out["identical"] = ok[0]["checksum"] == ok[1]["checksum"]
        out["gib_per_s"] = round(nbytes / 2**30 / max(r["seconds"] for r in ok), 2)
    return out


def _meta_params(dims: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return list(FluxTransformer2DModel(**dims).parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of the code paths")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of the bare forward")
    ap.add_argument("--fsdp-blocks", type=int, nargs=2, default=(4, 8), metavar=("DOUBLE", "SINGLE"),
                    help="blocks of the FLUX-width model of the FSDP step (default 4 8: ~2.6B parameters)")
    ap.add_argument("--skip-sync", action="store_true", help="skip the two-process weight sync")
    args = ap.parse_args(argv)

    torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tiny:
        device, dims, seq = torch.device("cpu"), TINY, 16
        args.resolution, args.steps, args.repeats = 64, min(args.steps, 4), 1
        torch.set_num_threads(2)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --tiny for a CPU smoke run)", file=sys.stderr)
            return 2
        device, dims, seq = torch.device("cuda"), FLUX_DEV, 512
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    from egrpo_ray.algo.entropy import build_plan
    from egrpo_ray.algo.sampler import StepKernel, branching_rollout, sample_ode
    from egrpo_ray.algo.schedule import shifted_sigmas

    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled()}
    if device.type == "cuda":
        info["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    log(phase="setup", **info)

    if not args.skip_sync:
        for backend in (["nccl", "gloo"] if device.type == "cuda" else ["gloo"]):
            log(phase=f"weight_sync_{backend}", **weight_sync_two_processes(dims, device, backend))

    reset_peak(device)
    transformer = build_transformer(dims, device, dtype)
    n_params = sum(p.numel() for p in transformer.parameters())
    policy, model_cfg = make_policy(transformer, args.resolution, lora=False)
    policy.requires_grad_(False)
    b = args.batch
    prompts = [f"prompt {i}" for i in range(b)]
    cond = random_cond(b, seq, dims, device, dtype)
    policy.cache.put(prompts, cond)
    tokens = policy.latent_shape[0]
    log(phase="build", params_b=round(n_params / 1e9, 3), latent_shape=list(policy.latent_shape),
        seconds=round(time.perf_counter() - t0, 1), peak_gib=peak_gib(device))

    # 1. bare transformer forward, batch b
    x = torch.randn(b, *policy.latent_shape, device=device)
    s = torch.full((b,), 0.7, device=device)
    txt_ids = torch.zeros(seq, 3, device=device, dtype=dtype)
    img_ids = policy.img_ids.to(device, dtype)
    guidance = torch.full((b,), 3.5, device=device)

    def bare():
        return transformer(hidden_states=x.to(dtype), timestep=s.to(dtype), guidance=guidance,
                           pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    reset_peak(device)
    with torch.no_grad():
        timed(bare, device, 2)  # warm-up
        sec, _ = timed(bare, device, args.repeats)
    bare_ms = 1000 * sec / b
    log(phase="bare_forward", resolution=args.resolution, batch=b, tokens=tokens, ms_per_batch=round(1000 * sec, 2),
        ms_per_image=round(bare_ms, 2), peak_gib=peak_gib(device))

    # 2a. the real ODE sampler through the policy: batch b, all steps
    sigmas = shifted_sigmas(args.steps, 3.0)
    noise = torch.randn(b, *policy.latent_shape, device=device, generator=torch.Generator(device).manual_seed(0))
    reset_peak(device)
    with torch.no_grad():
        sample_ode(policy, cond, noise, sigmas[:3])  # warm-up
        sec, lat = timed(lambda: sample_ode(policy, cond, noise, sigmas), device, 1)
    ode_ms = 1000 * sec / (b * args.steps)
    log(phase="sampler_ode", batch=b, steps=args.steps, seconds=round(sec, 2), ms_per_image_step=round(ode_ms, 2),
        ratio_to_bare=round(ode_ms / bare_ms, 3), finite=bool(torch.isfinite(lat).all()), peak_gib=peak_gib(device))

    # 2b. E-GRPO's branching rollout: 1 prompt, G = b, the paper's merge plan, batches of b (mixed timesteps)
    kernel = StepKernel(sigmas, 0.7, "flow", "mean")
    plan = build_plan(sigmas, 0.7, "adaptive", 2.2, 2, None, 0.5)
    gen = torch.Generator(device).manual_seed(1)
    reset_peak(device)
    with torch.no_grad():
        sec, rollout = timed(lambda: branching_rollout(policy, {k: v[:1] for k, v in cond.items()}, prompts[:1],
                                                       noise[:1], kernel, plan, b, gen, max_batch=b), device, 1)
    branch_ms = 1000 * sec / rollout.forwards
    log(phase="sampler_branching", plan=str(plan), group_size=b, forwards=rollout.forwards, seconds=round(sec, 2),
        ms_per_image_step=round(branch_ms, 2), ratio_to_bare=round(branch_ms / bare_ms, 3), peak_gib=peak_gib(device))

    # 3. learner steps on that rollout (5 rows) through egrpo_ray.training.learn
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import ExperimentConfig, RewardConfig
    from egrpo_ray.training import ScoredRollout, learn

    rows = len(rollout.step_index)
    exp = ExperimentConfig(
        model=model_cfg, rewards=[RewardConfig(name="hps")],
        sampling={"steps": args.steps, "shift": 3.0, "eta": 0.7},
        algorithm={"group_size": b, "clip_range": 1e-4, "old_logprob": "recompute"},
        learner={"minibatch_rows": rows, "lr": 2e-6},
    )
    strategy = build_strategy(exp.sampling, exp.algorithm)
    rewards = {"hps": torch.rand(len(rollout.final_latents), generator=torch.Generator().manual_seed(2))}
    # the learner's loss math runs where the rollout lives (advantages are CPU tensors); the policy moves
    # each forward's inputs to the GPU and returns float32 velocities on the caller's device
    from dataclasses import fields

    cpu_rollout = type(rollout)(**{f.name: (getattr(rollout, f.name).cpu() if torch.is_tensor(getattr(rollout, f.name))
                                            else getattr(rollout, f.name)) for f in fields(rollout)})
    item = ScoredRollout(cpu_rollout, rewards, policy_version=0)

    def learner_step(pol, optimizer, label, extra):
        pol.train()
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        stats = learn(pol, pol, [item], exp, strategy, optimizer, torch.Generator().manual_seed(3))
        sync(device)
        seconds = round(time.perf_counter() - t, 2)
        plan_gib = round(learner_plan(exp.model_copy(update={"model": pol.cfg}), dims).step_peak / 2**30, 2)
        if device.type == "cuda":  # the peak holds everything alive, as the plan counts it (weights included)
            extra = {**extra, "plan_gib": plan_gib, "plan_error": round(plan_gib / peak_gib(device) - 1, 3)}
        log(phase=label, rows=rows, seconds=seconds, peak_gib=peak_gib(device),
            ratio_mean_first=round(stats["ratio_mean_first"], 6), logprob_mismatch=stats["logprob_mismatch"],
            grad_norm=stats["grad_norm"], loss=stats["loss"], **extra)
        pol.eval()

    lora_policy, _ = make_policy(transformer, args.resolution, lora=True)  # injects LoRA into the same weights
    lora_policy.cache.put(prompts, cond)
    lparams = [p for p in lora_policy.parameters() if p.requires_grad]
    lopt = torch.optim.AdamW(lparams, lr=1e-4, weight_decay=1e-4)
    learner_step(lora_policy, lopt, "learner_lora", {"optimizer": "AdamW", "rank": 64,
                                                     "lora_params_m": round(sum(p.numel() for p in lparams) / 1e6, 1)})
    del lora_policy, lopt, lparams, transformer, policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(phase="gradient_noise_host_check", **gradient_noise_buffers_agree(device, 50_000_000 if device.type == "cuda" else 10_000))
    log(phase="learner_fsdp_full", **fsdp_full_step(args, dims, device, item, exp, strategy, prompts, cond))
    log(phase="done", total_seconds=round(time.perf_counter() - t0, 1),
        sampler_ratio_ode=round(ode_ms / bare_ms, 3), sampler_ratio_branching=round(branch_ms / bare_ms, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
