import os

import pytest
import torch

from egrpo_ray.models.base import Policy

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class ToyPolicy(Policy):
    """A small conditional velocity MLP: enough to test the algorithm against closed forms."""

    latent_shape = (2, 8)

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.words = {}
        self.embed = torch.nn.Embedding(32, 8)
        self.net = torch.nn.Sequential(torch.nn.Linear(16 + 8 + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.embed.requires_grad_(False)

    def encode_prompts(self, prompts):
        ids = torch.tensor([self.words.setdefault(p, len(self.words) % 32) for p in prompts])
        return {"text": self.embed(ids)}

    def forward(self, latents, sigma, cond):
        h = torch.cat([latents.flatten(1), cond["text"], sigma.float()[:, None]], 1)
        return self.net(h).view_as(latents).float()

    def decode(self, latents):
        return latents.flatten(1)[:, :12].view(-1, 3, 2, 2).sigmoid()


@pytest.fixture
def toy_policy():
    return ToyPolicy()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray cluster per test session: explicit resources, its own short temp dir."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    temp_dir = tempfile.mkdtemp(prefix="egrt_", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=temp_dir,
             logging_level="WARNING", log_to_driver=True)
    yield ray
    ray.shutdown()
