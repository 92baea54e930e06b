"""The reward service: Serve deployments that batch, and the HTTP endpoint's input limits."""
import base64
import io
import json
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from ray import serve

from egrpo_ray.config import validate
from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.distributed.reward_service import deploy_rewards, remote_reward_fn
from egrpo_ray.tasks.shapes import render_prompts, train_prompts


def _png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.transpose(1, 2, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served(ray_cluster):
    port = free_port()
    cfg = validate({"cluster": {"http_enabled": True, "http_port": port, "max_images_per_request": 4},
                    "rewards": [{"name": "alignment", "batch_size": 16, "num_cpus": 0.1}, {"name": "jpeg", "num_cpus": 0.1}]})
    handles = deploy_rewards(cfg)
    yield handles, f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_handles_score_like_the_local_reward(served):
    from egrpo_ray.rewards.alignment import AlignmentReward

    handles, _ = served
    prompts = train_prompts()[:6]
    images = render_prompts(prompts)
    scores = remote_reward_fn(handles)(images, prompts)
    assert set(scores) == {"alignment", "jpeg"}
    local = AlignmentReward()((images * 255).round() / 255, prompts)
    assert torch.allclose(scores["alignment"], local, atol=1e-5)
    assert scores["alignment"].mean() > 0.9


def test_http_scores_pngs_and_rejects_bad_input(served):
    _, base = served
    prompts = train_prompts()[:2]
    arr = (render_prompts(prompts) * 255).round().to(torch.uint8).numpy()
    status, body = _post(f"{base}/rewards/alignment", json.dumps({"prompts": prompts, "images": [_png(a) for a in arr]}).encode())
    assert status == 200 and len(body["scores"]) == 2 and min(body["scores"]) > 0.9
    too_many = json.dumps({"prompts": prompts * 3, "images": [_png(arr[0])] * 6}).encode()
    assert _post(f"{base}/rewards/alignment", too_many)[0] == 400
    pickled = base64.b64encode(pickle.dumps({"x": 1})).decode()
    status, body = _post(f"{base}/rewards/alignment", json.dumps({"prompts": ["a"], "images": [pickled]}).encode())
    assert status == 400 and "not a PNG" in body["error"]
    assert _post(f"{base}/rewards/alignment", b"not json")[0] == 400
