"""Learner step time, DDP against FSDP, on 2 gloo ranks (CPU), on the shipped tiny model.

Each rank runs the real update (``egrpo_ray.algo.update.grpo_update``: recompute old log-probs, clipped
surrogate, backward, clip, AdamW) on its half of one E-GRPO rollout's rows, several times; the script
prints the median step time per parallelism and the FSDP/DDP ratio. One torch thread per rank (two ranks
on two cores). Not a test: machines are noisy, so read the medians and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learner_step.py [--repeats 7] [--group-size 8]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

PROMPTS = ["a red circle at the top left", "a blue square in the centre", "a green triangle at the bottom",
           "a yellow circle on the right"]


def _rank_main(rank: int, port: int, parallelism: str, repeats: int, group_size: int, results) -> None:
    from egrpo_ray.algo.advantages import combine_rewards
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.algo.update import UpdateSettings, grpo_update
    from egrpo_ray.config import ModelConfig, load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.parallel import prepare_for_training

    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    policy = build_policy(ModelConfig())
    cfg = load_config(None, [f"algorithm.group_size={group_size}"])
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    cond = policy.encode_prompts(PROMPTS)
    batch = strategy.rollout(policy, cond, PROMPTS, policy.latent_shape, torch.Generator().manual_seed(0))
    rewards = {"r": torch.randn(len(batch.final_latents), generator=torch.Generator().manual_seed(1))}
    adv = combine_rewards(rewards, {"r": 1.0}, batch.sample_group, "reward", 1e-8, 5.0)
    fn = prepare_for_training(policy, parallelism, torch.float32, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    rows = torch.arange(len(batch.step_index))[rank::2]  # this rank's half of the rows
    parts = list(torch.tensor_split(rows, 2))  # two minibatches per update
    settings = UpdateSettings(1e-3, "recompute", 0.0, len(parts[0]), 1, 1.0)
    seconds = []
    for k in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        grpo_update(fn, cond, batch, adv, strategy.kernel, settings, optimizer, torch.Generator(), parts=parts)
        dist.barrier()
        if k:
            seconds.append(time.perf_counter() - t0)
    if rank == 0:
        results.put((parallelism, seconds, len(batch.step_index)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    medians = {}
    for parallelism in ("ddp", "fsdp"):
        mp.start_processes(_rank_main, args=(_free_port(), parallelism, args.repeats, args.group_size, results),
                           nprocs=2, join=True, start_method="spawn")
        name, seconds, rows = results.get()
        medians[name] = statistics.median(seconds)
        print(f"{name:>5}: median {medians[name]:.3f} s per update ({rows} rows over 2 ranks, 2 minibatches; "
              f"min {min(seconds):.3f}, max {max(seconds):.3f}, n = {len(seconds)})", flush=True)
    print(f"fsdp / ddp = {medians['fsdp'] / medians['ddp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
