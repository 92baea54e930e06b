"""The reward service: Serve deployments that batch, and the HTTP endpoint's input limits."""
import base64
import io
import json
import pickle
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from ray import serve

from egrpo_ray.config import validate
from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.distributed.reward_service import delete_rewards, deploy_rewards, remote_reward_fn
from egrpo_ray.tasks import shapes
from egrpo_ray.tasks.shapes import render_prompts, train_prompts

MAX_PIXELS = 64 * 64  # the endpoint's resolution cap in these tests


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.transpose(1, 2, 0) if arr.ndim == 3 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _png(arr: np.ndarray) -> str:
    return base64.b64encode(_png_bytes(arr)).decode()


def _crafted_png(width: int, height: int) -> str:
    """A valid PNG header announcing width x height (RGB, one colour), with only a few rows of data: tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1) * 4)) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_json(url, prompts, images):
    return _post(url, json.dumps({"prompts": prompts, "images": images}).encode())


@pytest.fixture(scope="module")
def served(ray_cluster):
    """Deployed once for the module (a deployment costs seconds); ``test_http_timeout_and_in_flight_cap``,
    last in the file, replaces these apps with slow ones."""
    serve.shutdown()  # training runs before this leave Serve up without HTTP (a driver deletes only its apps)
    port = free_port()
    cfg = validate({"cluster": {"http_enabled": True, "http_port": port, "max_images_per_request": 4,
                                "max_image_pixels": MAX_PIXELS},
                    "rewards": [{"name": "alignment", "batch_size": 16, "num_cpus": 0.1}, {"name": "jpeg", "num_cpus": 0.1}]})
    handles = deploy_rewards(cfg)
    yield cfg, handles, f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_handles_score_like_the_local_reward(served):
    from egrpo_ray.rewards.alignment import AlignmentReward

    _, handles, _ = served
    prompts = train_prompts()[:6]
    images = render_prompts(prompts)
    scores = remote_reward_fn(handles)(images, prompts)
    assert set(scores) == {"alignment", "jpeg"}
    local = AlignmentReward()((images * 255).round() / 255, prompts)
    assert torch.allclose(scores["alignment"], local, atol=1e-5)
    assert scores["alignment"].mean() > 0.9
    # chunks batched together: another resolution, and a bad prompt failing only its own caller
    h = handles["alignment"]
    big = (render_prompts(prompts[:2], size=48) * 255).round().to(torch.uint8).numpy()
    small = (images[:2] * 255).round().to(torch.uint8).numpy()
    calls = [h.score.remote(big, prompts[:2]), h.score.remote(small, ["a purple blob", prompts[1]]),
             h.score.remote(small, prompts[:2])]
    assert min(calls[0].result()) > 0.9 and min(calls[2].result()) > 0.9
    with pytest.raises(Exception, match="cannot parse prompt"):
        calls[1].result()


def test_http_scores_pngs_and_rejects_bad_input(served):
    _, _, base = served
    prompts = train_prompts()[:2]
    arr = (render_prompts(prompts) * 255).round().to(torch.uint8).numpy()
    status, body = _post_json(f"{base}/rewards/alignment", prompts, [_png(a) for a in arr])
    assert status == 200 and len(body["scores"]) == 2 and min(body["scores"]) > 0.9
    too_many = json.dumps({"prompts": prompts * 3, "images": [_png(arr[0])] * 6}).encode()
    assert _post(f"{base}/rewards/alignment", too_many)[0] == 400
    pickled = base64.b64encode(pickle.dumps({"x": 1})).decode()
    status, body = _post(f"{base}/rewards/alignment", json.dumps({"prompts": ["a"], "images": [pickled]}).encode())
    assert status == 400 and "not a PNG" in body["error"]
    assert _post(f"{base}/rewards/alignment", b"not json")[0] == 400


def test_http_refuses_bombs_corrupt_pngs_and_bad_prompts_with_400(served):
    _, _, base = served
    url = f"{base}/rewards/alignment"
    prompt = train_prompts()[0]
    good = _png_bytes((render_prompts([prompt]) * 255).round().to(torch.uint8).numpy()[0])
    cases = [
        ([prompt], [_crafted_png(20000, 20000)], "20000x20000 = 400000000 pixels; at most 4096"),  # 0.4 Gpx in ~100 bytes
        ([prompt], [_png(np.full((3, 80, 80), 255, np.uint8))], "80x80 = 6400 pixels; at most 4096"),  # over the cap
        ([prompt], [base64.b64encode(good[: len(good) // 2]).decode()], "image 0 is not a valid PNG"),  # truncated
        ([prompt], ["not base64!"], "image 0 is not valid base64"),
        ([prompt], [_png(np.zeros((8, 8), np.uint16))], "mode 'I;16'"),  # 16-bit grey
        ([7], [_png(np.zeros((3, 8, 8), np.uint8))], "prompt 0 is not a string"),
        (["a" * 5000], [_png(np.zeros((3, 8, 8), np.uint8))], "prompt 0 is longer than"),
        (["a purple blob"], [base64.b64encode(good).decode()], "cannot parse prompt 'a purple blob'"),  # alignment only
        ([prompt], [_png(np.zeros((3, 16, 8), np.uint8))], "square"),
    ]
    for prompts, images, message in cases:
        status, body = _post_json(url, prompts, images)
        assert (status, message in body.get("error", "")) == (400, True), (message, status, body)
    # a resolution under the cap other than the task's is scored (bounded reference statistics at 64x64)
    gt64 = (render_prompts([prompt], size=64) * 255).round().to(torch.uint8).numpy()
    status, body = _post_json(url, [prompt], [_png(gt64[0])])
    assert status == 200 and body["scores"][0] > 0.9
    # the JPEG reward has no prompt grammar: the same prompt is fine there
    assert _post_json(f"{base}/rewards/jpeg", ["a purple blob"], [base64.b64encode(good).decode()])[0] == 200


def test_alignment_reference_statistics_are_bounded_and_match_full_renders():
    from egrpo_ray.rewards import alignment

    size = 48
    specs = shapes.all_specs()
    full = alignment._stats(torch.stack([shapes._coverage(s, size)[None] * torch.tensor(shapes.COLOURS[s.colour_name]).view(3, 1, 1)
                                         for s in specs]), torch.tensor([shapes.COLOURS[s.colour_name] for s in specs]))
    ref = alignment.reference_stats(size)
    for k in ("mass", "cx", "cy", "log_aspect", "fill", "skew"):
        assert torch.allclose(ref[k], full[k], atol=2e-5, rtol=1e-5), k
    reward, renders = alignment.AlignmentReward(), shapes._render_cached.cache_info().currsize
    for s in (40, 48, 56, 64, 72, 80):
        reward._target_table(s)
    assert list(reward._targets) == [40, 48, 56, 64, 72, 80][-alignment.TARGET_CACHE_SIZES :]  # an LRU of a few
    assert shapes._render_cached.cache_info().currsize == renders  # no full-canvas renders cached at other sizes


def test_http_timeout_and_in_flight_cap(served):
    """A reward slower than reward_timeout_s answers 503; a request beyond max_requests_in_flight answers 503 at once."""
    cfg, _, base = served
    delete_rewards(cfg)
    slow = validate({"cluster": {"http_enabled": True, "http_port": cfg.cluster.http_port, "reward_timeout_s": 1.0,
                                 "max_requests_in_flight": 1},
                     # the batch waits 3 s for company before scoring: every request outlives the 1 s timeout
                     "rewards": [{"name": "alignment", "batch_size": 64, "batch_wait_s": 3.0, "num_cpus": 0.1}]})
    deploy_rewards(slow)
    prompt = train_prompts()[0]
    body = json.dumps({"prompts": [prompt], "images": [_png((render_prompts([prompt]) * 255).round().to(torch.uint8).numpy()[0])]})
    url, results = f"{base}/rewards/alignment", {}
    first = threading.Thread(target=lambda: results.setdefault("first", _post(url, body.encode())))
    t0 = time.monotonic()
    first.start()
    time.sleep(0.4)
    status, busy = _post(url, body.encode())
    assert status == 503 and "busy" in busy["error"] and time.monotonic() - t0 < 1.0
    first.join()
    status, timed_out = results["first"]
    assert status == 503 and "timed out" in timed_out["error"]
    status, again = _post(url, body.encode())  # the timed-out request released its slot
    assert status == 503 and "timed out" in again["error"]
    assert _post(url, b"not json")[0] == 400  # refusals stay fast and precise


def test_a_failed_deployment_names_the_replica_error_and_how_many_starts_failed():
    """The one-line reason comes from Serve's status: the constructor's last traceback line, and the count of
    failed starts when Serve's message gives one (its wording in Ray 2.60's deployment_state.py)."""
    from types import SimpleNamespace

    from ray.serve.schema import DeploymentStatus

    from egrpo_ray.distributed.reward_service import _failure_reason

    def app(message):
        failed = SimpleNamespace(status=DeploymentStatus.DEPLOY_FAILED, message=message)
        return SimpleNamespace(deployments={"reward_clip": failed}, message="", status="DEPLOY_FAILED")

    serve_message = ("The deployment failed to start {} times in a row. This may be due to a problem with its "
                     "constructor or initial health check failing. See controller logs for details. Error:\n"
                     "Traceback (most recent call last):\n  File \"x.py\", line 1\nOSError: no weights in /m\n")
    assert _failure_reason(app(serve_message.format(1))) == "1 failed replica start; OSError: no weights in /m"
    assert _failure_reason(app(serve_message.format(3))) == "3 failed replica starts; OSError: no weights in /m"
    assert _failure_reason(app("OSError: no weights in /m")) == "OSError: no weights in /m"
