"""How much of a learner update is signal: the gradient noise scale, measured while training.

An update's gradient A (the mean of its minibatch gradients, before clipping) is the true gradient G plus
noise: E|A|^2 = |G|^2 + tr(S) / P, with P the prompts per update and tr(S) one prompt's gradient noise
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). Two updates sample independent
prompts and noise, so the dot product of their gradients estimates |G|^2 without bias. ``GradientNoise``
takes updates in pairs, keeping one float32 gradient-sized buffer (sharded like the gradients under FSDP), on
the gradients' device or, with ``on_host``, in pinned host memory (a 12B full fine-tune has no 11 GiB per rank to
spare). All arithmetic runs on the gradients' device either way: a host buffer only crosses PCIe, about 3 times a
pair (0.3 s an update for a 9.5 GiB shard on an H200, docs/scaling.md):
- the first of a pair keeps its gradient and reports ``grad_step_sq`` = |A|^2;
- the second dots its own into it and reports ``grad_signal_sq`` = A . A_prev (negative when noise wins).
Pairs never share an update, so their estimates are independent: ``signal_share`` turns a run's records into
the share of |A|^2 that is signal, with a 95% interval, and the noise scale B_noise = tr(S) / |G|^2 in prompts
(a step of B_noise prompts is half signal). docs/benchmarks.md (probe 9) measures the same quantity at a fixed
policy with benchmarks/gradient_noise.py.

Only the first epoch's minibatches count (later epochs revisit the same rows). The weights move between the
two updates of a pair, and the estimate assumes that move is small. Where one update moves the policy far
(the README's JPEG run at lr 3e-4), consecutive gradients anti-correlate and the share comes out negative.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

Z95 = 1.959964


def _local(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(this rank's values, whether they are a shard) of a gradient: FSDP's are DTensor shards."""
    from torch.distributed.tensor import DTensor

    return (t.to_local(), True) if isinstance(t, DTensor) else (t, False)


class GradientNoise:
    """Per-update gradient statistics in pairs of updates (module docstring). Every rank calls ``add`` after
    each first-epoch backward and ``finish`` after the update, in the same order (``finish`` is a collective
    under FSDP)."""

    def __init__(self, on_host: bool = False):
        self._on_host = on_host
        self._device: Optional[torch.device] = None  # the gradients' (all arithmetic and the all-reduce run there)
        self._kept: Optional[list[Optional[torch.Tensor]]] = None  # float32 sum of the first update's gradients
        self._written: list[bool] = []  # per parameter: holds this pair's gradient (else stale, or never written)
        self._kept_minibatches = 0  # how many gradients ``_kept`` sums
        self._storing = True  # the first update of a pair keeps its gradient
        self._minibatches = 0
        self._is_shard: list[bool] = []  # per parameter: FSDP's gradients are shards, DDP's are whole
        self._dots: Optional[torch.Tensor] = None  # [sharded part, whole part] of the probe's summed dots

    @property
    def buffer_bytes(self) -> int:
        """Bytes this rank's kept gradient takes (memory_plan.py counts them)."""
        return sum(t.numel() * t.element_size() for t in self._kept or [] if t is not None)

    def add(self, params: Sequence[torch.Tensor]) -> None:
        """One minibatch's gradients (``p.grad``, before clipping)."""
        grads = [(None, False) if p.grad is None else _local(p.grad) for p in params]
        self._device = next((g.device for g, _ in grads if g is not None), self._device)
        if self._storing:
            if self._kept is None:
                self._kept, self._is_shard = [None] * len(grads), [False] * len(grads)
            if self._minibatches == 0:  # a new pair: overwrite the buffer, no pass to zero it
                self._written = [False] * len(grads)
            for i, (g, shard) in enumerate(grads):
                if g is None:
                    continue
                if self._kept[i] is None:
                    self._kept[i] = self._new_buffer(g)
                    self._is_shard[i] = shard
                _accumulate(self._kept[i], g, overwrite=not self._written[i])
                self._written[i] = True
        else:
            dots = _dots(grads, self._kept, self._device)
            self._dots = dots if self._dots is None else self._dots + dots
        self._minibatches += 1

    def _new_buffer(self, g: torch.Tensor) -> torch.Tensor:
        if not self._on_host:
            return torch.empty(g.shape, dtype=torch.float32, device=g.device)
        return torch.empty(g.shape, dtype=torch.float32, pin_memory=g.is_cuda)  # pinned: asynchronous copies

    def finish(self) -> dict[str, float]:
        """This update's statistic: ``grad_step_sq`` or ``grad_signal_sq`` (empty if it saw no minibatch)."""
        n, self._minibatches = self._minibatches, 0
        if n == 0:
            return {}
        if self._storing:
            for t, written in zip(self._kept, self._written):
                if t is not None and not written:  # no gradient this pair: zero, not the last pair's
                    t.zero_()
            self._kept_minibatches, self._storing = n, False
            kept = list(zip(self._kept, self._is_shard))
            return {"grad_step_sq": self._reduce(_dots(kept, self._kept, self._device)) / n**2}
        dots, self._dots, self._storing = self._dots, None, True
        return {"grad_signal_sq": self._reduce(dots) / (n * self._kept_minibatches)}

    def _reduce(self, dots: Optional[torch.Tensor]) -> float:
        """Sum the sharded part over ranks (every rank holds a slice of each sharded gradient)."""
        if dots is None:  # no gradient on this rank (every rank still joins the reduce)
            dots = torch.zeros(2, dtype=torch.float64, device=self._device or torch.device("cpu"))
        if any(self._is_shard) and dist.is_available() and dist.is_initialized():
            sharded = dots[:1].clone()
            dist.all_reduce(sharded)
            dots = torch.cat([sharded, dots[1:]])
        return float(dots.sum())


def _accumulate(kept: torch.Tensor, g: torch.Tensor, overwrite: bool) -> None:
    """kept = g or kept += g. The sum runs on the gradient's device: a host buffer only crosses PCIe (pinned,
    asynchronous; the copies queue on the current stream, so later kernels see them in order), and the host's
    single thread never adds a 12B-sized gradient."""
    if overwrite:
        kept.copy_(g, non_blocking=True)
    elif kept.device == g.device:
        kept.add_(g)
    else:
        kept.copy_(kept.to(g.device, non_blocking=True).add_(g), non_blocking=True)


def _dots(grads: Iterable[tuple[Optional[torch.Tensor], bool]], kept: list[Optional[torch.Tensor]],
          device: Optional[torch.device]) -> Optional[torch.Tensor]:
    """[sum over sharded parameters, sum over whole ones] of g . k, float64, on ``device`` (the gradients')."""
    out = None
    for (g, sharded), k in zip(grads, kept):
        if g is None or k is None:
            continue
        if out is None:
            out = torch.zeros(2, dtype=torch.float64, device=device)
        k_here = k.to(device, non_blocking=True)
        g_here = k_here if g is k else g.to(device).float()
        out[0 if sharded else 1] += torch.dot(g_here.flatten(), k_here.flatten()).double()
    return out


def signal_share(records: Sequence[dict], prompts_per_step: int) -> Optional[dict]:
    """A run's gradient signal from its metrics records (``grad_step_sq`` / ``grad_signal_sq``), or None with
    fewer than two of each.

    ``share`` = mean signal / mean |A|^2 with a 95% interval from the signal estimates' standard error (they are
    independent; |A|^2 is measured far more precisely and is taken as exact). ``noise_scale_prompts``: B_noise
    in prompts, P (1 / share - 1), and its interval where the share is resolved above 0; where it is not,
    ``noise_scale_at_least`` bounds it from the share's upper end."""
    signal = [r["grad_signal_sq"] for r in records if "grad_signal_sq" in r]
    total = [r["grad_step_sq"] for r in records if "grad_step_sq" in r]
    if len(signal) < 2 or len(total) < 2:
        return None
    mean_total = sum(total) / len(total)
    mean = sum(signal) / len(signal)
    se = math.sqrt(sum((s - mean) ** 2 for s in signal) / (len(signal) - 1) / len(signal))
    share, lo, hi = (x / mean_total for x in (mean, mean - Z95 * se, mean + Z95 * se))
    out = {"pairs": len(signal), "share": share, "share_low": lo, "share_high": hi, "prompts_per_step": prompts_per_step}

    def scale(s: float) -> float:
        return prompts_per_step * (1 / s - 1)

    if lo > 0:
        out.update(noise_scale_prompts=scale(share), noise_scale_low=scale(min(hi, 1.0)), noise_scale_high=scale(lo))
    elif 0 < hi < 1:
        out["noise_scale_at_least"] = scale(hi)
    return out


def describe(stats: Optional[dict]) -> Optional[str]:
    """One line for a run's summary: the signal share and what it means for the batch size."""
    if stats is None:
        return None
    p = stats["prompts_per_step"]
    line = (f"gradient signal share of an update: {stats['share']:.1%} (95% CI {stats['share_low']:.1%} to "
            f"{stats['share_high']:.1%}, {stats['pairs']} pairs of updates, {p} prompts each)")
    if "noise_scale_prompts" in stats:
        return (line + f"; an update is half signal at about {stats['noise_scale_prompts']:.0f} prompts "
                f"({stats['noise_scale_low']:.0f}-{stats['noise_scale_high']:.0f})")
    if "noise_scale_at_least" in stats:
        return line + f"; not resolved above 0: an update is half signal only above {stats['noise_scale_at_least']:.0f} prompts"
    return line + "; not resolved above 0"
