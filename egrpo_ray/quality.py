"""An image check independent of every reward: faint background noise and high-frequency energy.

RL on the tiny task grew faint noise in the background of the images that the alignment reward cannot
see (its colour masks ignore pixels below 0.2). These statistics see it, so a run can log them beside
its rewards and "reward went up" can be told apart from "the images got worse".

For images [N, 3, H, W] in [0, 1] (pure torch, any device; H, W >= 3):

- objects: pixels whose brightest channel exceeds ``OBJECT_LEVEL`` (0.3), dilated by ``MARGIN_PX``
  (2 px, scaled with the resolution from 32 px) to cover anti-aliased edges; the background is the rest.
- ``background_noise``: the share of background pixels whose brightest channel exceeds 0.05
  (a clean render: 0).
- ``background_level``: the mean brightest channel over the background.
- ``background_laplacian``: the mean |4-neighbour Laplacian| (per channel) over background pixels
  whose whole 3x3 neighbourhood is background (a clean render: 0).
- ``high_freq_share``: the share of the images' spectral energy (mean removed) above half the Nyquist
  radius; edges of clean objects have some, noise raises it.

``image_quality`` returns the batch means as floats; ``image_quality_per_image`` the [N] tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECT_LEVEL = 0.3
NOISE_LEVEL = 0.05
MARGIN_PX = 2  # at 32 px
HIGH_FREQ_RADIUS = 0.5  # as a fraction of the Nyquist radius


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float().unsqueeze(1), 2 * radius + 1, 1, radius).squeeze(1) > 0


def image_quality_per_image(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each statistic of the module doc per image: float32 tensors [N]."""
    if images.dim() != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 3:
        raise ValueError(f"image_quality: expected images [N, 3, H, W] with H, W >= 3, got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1)
    N, _, H, W = x.shape
    bright = x.amax(dim=1)
    radius = max(1, round(MARGIN_PX * min(H, W) / 32))
    background = ~_dilate(bright > OBJECT_LEVEL, radius)
    n_bg = background.sum(dim=(1, 2)).clamp_min(1)
    noise = ((bright > NOISE_LEVEL) & background).sum(dim=(1, 2)) / n_bg
    level = (bright * background).sum(dim=(1, 2)) / n_bg

    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3).abs().mean(dim=1)
    inner = ~_dilate(~background, 1)  # background whose 3x3 neighbourhood is background too
    n_inner = inner.sum(dim=(1, 2)).clamp_min(1)
    laplacian = (lap * inner).sum(dim=(1, 2)) / n_inner

    spec = torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().pow(2).sum(dim=1)  # [N, H, W]
    fy = torch.fft.fftfreq(H, device=x.device).abs().view(H, 1) / 0.5
    fx = torch.fft.fftfreq(W, device=x.device).abs().view(1, W) / 0.5
    high = (torch.sqrt(fy**2 + fx**2) > HIGH_FREQ_RADIUS).float()
    total = spec.sum(dim=(1, 2))
    share = torch.where(total > 0, (spec * high).sum(dim=(1, 2)) / total.clamp_min(1e-12), torch.zeros_like(total))
    return {
        "background_noise": noise.float(),
        "background_level": level.float(),
        "background_laplacian": laplacian.float(),
        "high_freq_share": share.float(),
    }


def image_quality(images: torch.Tensor) -> dict[str, float]:
    """Batch means of ``image_quality_per_image`` (see the module doc), as floats."""
    return {k: float(v.mean()) for k, v in image_quality_per_image(images).items()}
