"""Reward models as Ray Serve deployments: one per reward, batched across all rollout workers.

Rollout workers call ``score`` through a handle with a chunk of images (uint8 arrays, the way real
reward models see images) and their prompts; ``@serve.batch`` merges chunks from all callers into
one model batch. With ``cluster.http_enabled`` the same deployment also answers HTTP POSTs of PNG
images (base64 in JSON, size- and count-limited; nothing from the network is ever unpickled), bound
to ``cluster.http_host`` (127.0.0.1 unless configured).
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import torch
from ray import serve

from egrpo_ray.config import ExperimentConfig, RewardConfig, add_config_args
from egrpo_ray.images import to_uint8

def app_name(cfg: ExperimentConfig, reward: str) -> str:
    """Serve application names are run-scoped: two runs on one cluster never share or delete each other's."""
    return f"egrpo-{cfg.cluster.run_name}-{reward}" if cfg.cluster.run_name else f"egrpo-reward-{reward}"


class BadRequest(ValueError):
    pass


def decode_png_request(body: dict, max_images: int, max_bytes: int) -> tuple[np.ndarray, list[str]]:
    """{"prompts": [...], "images": [base64 PNG, ...]} -> (uint8 [B, 3, H, W], prompts)."""
    from PIL import Image

    if not isinstance(body, dict) or not isinstance(body.get("images"), list) or not isinstance(body.get("prompts"), list):
        raise BadRequest('expected JSON {"prompts": [str, ...], "images": [base64 PNG, ...]}')
    images, prompts = body["images"], body["prompts"]
    if len(images) != len(prompts) or not images:
        raise BadRequest("images and prompts must be non-empty lists of the same length")
    if len(images) > max_images:
        raise BadRequest(f"at most {max_images} images per request")
    arrays = []
    for k, text in enumerate(images):
        if not isinstance(text, str) or not isinstance(prompts[k], str):
            raise BadRequest("images must be base64 strings and prompts strings")
        raw = base64.b64decode(text, validate=True)
        if len(raw) > max_bytes:
            raise BadRequest(f"image {k} is larger than {max_bytes} bytes")
        if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
            raise BadRequest(f"image {k} is not a PNG")
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > 4096 * 4096:
                raise BadRequest(f"image {k} has too many pixels")
            arrays.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest("all images of one request must have the same size")
    return np.stack(arrays), list(prompts)


@serve.deployment
class RewardDeployment:
    """Wraps one Reward (rewards/) built from its RewardConfig."""

    def __init__(self, reward_cfg: dict, max_batch_size: int, batch_wait_s: float, max_images: int, max_bytes: int):
        torch.set_num_threads(1)
        from egrpo_ray.rewards import build_reward

        self.cfg = RewardConfig.model_validate(reward_cfg)
        self.reward = build_reward(self.cfg)
        self.max_images, self.max_bytes = max_images, max_bytes
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _score_batch(self, chunks: list[tuple[np.ndarray, list[str]]]) -> list[np.ndarray]:
        images = np.concatenate([c[0] for c in chunks])
        prompts = [p for c in chunks for p in c[1]]
        with torch.no_grad():
            scores = self.reward(torch.from_numpy(np.ascontiguousarray(images)), prompts).float().numpy()
        out, start = [], 0
        for c in chunks:
            out.append(scores[start : start + len(c[1])])
            start += len(c[1])
        return out

    async def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return await self._score_batch((images, list(prompts)))

    async def __call__(self, request) -> dict:
        """HTTP: POST JSON of base64 PNGs; answers {"scores": [...]} or {"error": ...} with status 400."""
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
            images, prompts = decode_png_request(body, self.max_images, self.max_bytes)
        except (BadRequest, ValueError) as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        scores = await self.score(images, prompts)
        return JSONResponse({"reward": self.cfg.name, "scores": [float(s) for s in scores]})


def deploy_rewards(cfg: ExperimentConfig) -> dict[str, object]:
    """Start one Serve application per reward; returns name -> DeploymentHandle."""
    c = cfg.cluster
    if c.http_enabled:
        serve.start(http_options={"host": c.http_host, "port": c.http_port})
    else:
        serve.start(proxy_location="Disabled")
    handles = {}
    for r in cfg.rewards:
        options = {"ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": r.resources},
                   "max_ongoing_requests": 256,
                   "logging_config": {"log_level": "WARNING", "enable_access_log": False}}
        if r.autoscale_max_replicas:
            options["autoscaling_config"] = {"min_replicas": r.replicas, "max_replicas": r.autoscale_max_replicas,
                                             "target_ongoing_requests": 4}
        else:
            options["num_replicas"] = r.replicas
        app = RewardDeployment.options(name=f"reward_{r.name}", **options).bind(
            r.model_dump(), r.batch_size, r.batch_wait_s, c.max_images_per_request, c.max_image_bytes
        )
        handles[r.name] = serve.run(app, name=app_name(cfg, r.name),
                                    route_prefix=f"/rewards/{r.name}" if c.http_enabled else None)
    return handles


def delete_rewards(cfg: ExperimentConfig) -> None:
    """Remove this run's reward applications (never serve.shutdown(): it deletes every user's)."""
    for r in cfg.rewards:
        serve.delete(app_name(cfg, r.name), _blocking=True)


def reward_handles(cfg: ExperimentConfig) -> dict[str, object]:
    """Handles to the running reward apps, from any process of the cluster (e.g. a rollout actor)."""
    return {r.name: serve.get_app_handle(app_name(cfg, r.name)) for r in cfg.rewards}


def remote_reward_fn(handles: dict[str, object]):
    """A RewardFn (training.py) that scores through the Serve handles, all rewards in parallel."""

    def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        arr = to_uint8(images).cpu().numpy()
        pending = {name: h.score.remote(arr, list(prompts)) for name, h in handles.items()}
        return {name: torch.tensor(np.asarray(resp.result(), dtype=np.float32)) for name, resp in pending.items()}

    return score


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve-rewards", help="serve the config's reward models over HTTP (127.0.0.1 unless configured)")
    add_config_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import time

    from egrpo_ray.config import load_config
    from egrpo_ray.distributed.cluster import init_ray, validate_on_cluster

    cfg = load_config(args.config, args.overrides + ["cluster.http_enabled=true"])
    started = init_ray(cfg)
    try:
        validate_on_cluster(cfg)
        deploy_rewards(cfg)
        c = cfg.cluster
        for r in cfg.rewards:
            print(f"reward {r.name}: POST http://{c.http_host}:{c.http_port}/rewards/{r.name} "
                  '{"prompts": [...], "images": [base64 PNG, ...]}', flush=True)
        print("serving; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        if started:
            import ray

            ray.shutdown()
