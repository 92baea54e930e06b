"""Reward models as Ray Serve deployments: one per reward, batched across all rollout workers.

Rollout workers call ``score`` through a handle with a chunk of images (uint8 arrays, the way real
reward models see images) and their prompts; ``@serve.batch`` merges chunks from all callers into
one model batch (chunks of different image sizes are scored as separate model batches, and a chunk that
fails only fails its own caller). The model runs in one worker thread per replica, never on the
replica's event loop, so requests keep being accepted and batched while a batch is scored.

With ``cluster.http_enabled`` the same deployment also answers HTTP POSTs of PNG images (base64 in
JSON; nothing from the network is ever unpickled), bound to ``cluster.http_host`` (127.0.0.1 unless
configured). Limits, all from ``cluster``: ``max_images_per_request``, ``max_image_bytes`` per PNG,
``max_image_pixels`` per image (read from the PNG header before any pixel is decoded; Pillow's own
decompression-bomb limit applies too), prompts must be strings of at most ``MAX_PROMPT_CHARS``.
Anything malformed (JSON, base64, PNG, mode, prompt the reward cannot parse) answers 400 with
``{"error": ...}``. A request not answered within ``reward_timeout_s`` answers 503, and so does, at
once, a request beyond ``max_requests_in_flight`` HTTP requests being handled by the replica (the cap
is per replica and counts HTTP requests only: the rollout handle path is never refused).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from ray import serve
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from egrpo_ray.config import ClusterConfig, ConfigError, ExperimentConfig, RewardConfig
from egrpo_ray.images import to_uint8
from egrpo_ray.monitoring import RoleMetrics

logger = logging.getLogger("ray.serve")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # 8-bit (or less) modes that convert to RGB losslessly enough
MAX_PROMPT_CHARS = 1024
DEFAULT_MAX_PIXELS = ClusterConfig().max_image_pixels
_BATCH_PIXELS = 1 << 24  # chunks merged into one model batch: at most this many pixels (unless a chunk alone is more)


def app_name(cfg: ExperimentConfig, reward: str) -> str:
    """Serve application names are run-scoped: two runs on one cluster never share or delete each other's."""
    return f"egrpo-{cfg.cluster.run_name}-{reward}" if cfg.cluster.run_name else f"egrpo-reward-{reward}"


class BadRequest(ValueError):
    pass


def _pixel_limit(max_pixels: int) -> int:
    """The configured cap, never above Pillow's decompression-bomb threshold (so Pillow neither warns nor raises)."""
    from PIL import Image

    return max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, int(Image.MAX_IMAGE_PIXELS))


def png_size(raw: bytes, k: int = 0) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, read from the header bytes alone (no pixel decoded)."""
    if not raw.startswith(PNG_SIGNATURE):
        raise BadRequest(f"image {k} is not a PNG")
    if len(raw) < 33 or raw[12:16] != b"IHDR" or struct.unpack(">I", raw[8:12])[0] != 13:
        raise BadRequest(f"image {k} is not a valid PNG (no IHDR header)")
    width, height = struct.unpack(">II", raw[16:24])
    if width == 0 or height == 0:
        raise BadRequest(f"image {k} is not a valid PNG (size {width}x{height})")
    return width, height


def _decode_png(raw: bytes, k: int, size: tuple[int, int]) -> np.ndarray:
    """PNG bytes (header already checked) -> uint8 [3, H, W]; any decoding failure is a BadRequest."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.size != size:
                raise BadRequest(f"image {k} is not a valid PNG (inconsistent header)")
            if img.mode not in PNG_MODES:
                raise BadRequest(f"image {k} has mode {img.mode!r}; expected one of {', '.join(PNG_MODES)} (8-bit)")
            img.load()
            arr = np.asarray(img.convert("RGB"))
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadRequest(f"image {k} refused as a decompression bomb ({err})") from None
    except Exception as err:  # untrusted bytes: whatever Pillow or zlib raise (truncated, corrupt, bad CRC...)
        raise BadRequest(f"image {k} is not a valid PNG ({type(err).__name__}: {err})") from None
    if arr.shape != (size[1], size[0], 3):
        raise BadRequest(f"image {k} is not a valid PNG (decoded to {arr.shape})")
    return arr.transpose(2, 0, 1)


def decode_png_request(body: dict, max_images: int, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_prompt_chars: int = MAX_PROMPT_CHARS) -> tuple[np.ndarray, list[str]]:
    """{"prompts": [...], "images": [base64 PNG, ...]} -> (uint8 [B, 3, H, W], prompts).

    Everything cheap is checked before any pixel is decoded: counts, prompt types and lengths, encoded
    and decoded byte sizes, and each PNG's dimensions from its header (``max_pixels`` per image, all
    images the same size). Raises BadRequest (a ValueError) with one message for the client.
    """
    if not isinstance(body, dict) or not isinstance(body.get("images"), list) or not isinstance(body.get("prompts"), list):
        raise BadRequest('expected JSON {"prompts": [str, ...], "images": [base64 PNG, ...]}')
    images, prompts = body["images"], body["prompts"]
    if len(images) != len(prompts) or not images:
        raise BadRequest("images and prompts must be non-empty lists of the same length")
    if len(images) > max_images:
        raise BadRequest(f"at most {max_images} images per request")
    for k, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt {k} is not a string")
        if len(prompt) > max_prompt_chars:
            raise BadRequest(f"prompt {k} is longer than {max_prompt_chars} characters")
    limit = _pixel_limit(max_pixels)
    max_encoded = 4 * ((max_bytes + 2) // 3)
    raws, size = [], None
    for k, text in enumerate(images):
        if not isinstance(text, str):
            raise BadRequest(f"image {k} is not a base64 string")
        if len(text) > max_encoded:
            raise BadRequest(f"image {k} is larger than {max_bytes} bytes")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"image {k} is not valid base64") from None
        if len(raw) > max_bytes:
            raise BadRequest(f"image {k} is larger than {max_bytes} bytes")
        width, height = png_size(raw, k)
        if width * height > limit:
            raise BadRequest(f"image {k} is {width}x{height} = {width * height} pixels; at most {limit} are accepted")
        if size is not None and (width, height) != size:
            raise BadRequest("all images of one request must have the same size")
        size = (width, height)
        raws.append(raw)
    arrays = [_decode_png(raw, k, size) for k, raw in enumerate(raws)]
    return np.stack(arrays), list(prompts)


def _json_response(body: dict, status: int, **headers):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers or None)


@serve.deployment
class RewardDeployment:
    """Wraps one Reward (rewards/) built from its RewardConfig. Metrics (``run`` given, monitoring.py):
    egrpo_reward_batch_images, egrpo_reward_latency_seconds, egrpo_reward_queue, tagged with the reward."""

    def __init__(self, reward_cfg: dict, max_batch_size: int, batch_wait_s: float, max_images: int, max_bytes: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = 120.0, max_in_flight: int = 32,
                 run: str | None = None):
        torch.set_num_threads(1)
        from egrpo_ray.rewards import build_reward

        self.cfg = RewardConfig.model_validate(reward_cfg)
        self.reward = build_reward(self.cfg)
        self.max_images, self.max_bytes, self.max_pixels = max_images, max_bytes, max_pixels
        self.timeout_s, self.max_in_flight = timeout_s, max_in_flight
        # JSON text of the largest acceptable request (base64 images, escaped prompts), with slack
        self.max_body = max_images * (4 * ((max_bytes + 2) // 3) + 6 * MAX_PROMPT_CHARS + 64) + 4096
        self._in_flight = 0  # HTTP requests being handled (event-loop state: no lock needed)
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="reward-score")  # one model batch at a time
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="reward-decode")
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.metrics = RoleMetrics(run, "reward", reward=self.cfg.name)
        self._waiting = 0  # score calls in this replica (event-loop state)
        self.metrics.set("egrpo_reward_queue", 0)

    def _score_chunks(self, chunks: list[tuple[np.ndarray, list[str]]]) -> list[object]:
        """Worker thread: one result per chunk, scores [n] or the exception that chunk raised."""
        results: list[object] = [None] * len(chunks)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}  # (image size, dtype) -> runs of (pixels, chunk ids)
        for i, (images, _) in enumerate(chunks):  # same image size and dtype -> one model batch, up to a pixel budget
            runs = groups.setdefault((images.shape[1:], images.dtype.str), [])
            pixels = images.size // 3
            if not runs or (runs[-1][1] and runs[-1][0] + pixels > _BATCH_PIXELS):
                runs.append((0, []))
            runs[-1] = (runs[-1][0] + pixels, runs[-1][1] + [i])
        for idx in (run for runs in groups.values() for _, run in runs):
            try:
                scores = self._run_reward([chunks[i] for i in idx])
            except Exception as err:
                if len(idx) == 1:
                    results[idx[0]] = err
                    continue
                for i in idx:  # find the failing chunk(s): the others still get their scores
                    try:
                        results[i] = self._run_reward([chunks[i]])
                    except Exception as single:
                        results[i] = single
                continue
            start = 0
            for i in idx:
                n = len(chunks[i][1])
                results[i] = scores[start : start + n]
                start += n
        return results

    def _run_reward(self, chunks: list[tuple[np.ndarray, list[str]]]) -> np.ndarray:
        images = chunks[0][0] if len(chunks) == 1 else np.concatenate([c[0] for c in chunks])
        prompts = [p for c in chunks for p in c[1]]
        self.metrics.observe("egrpo_reward_batch_images", len(prompts))
        with torch.no_grad():
            # a copy: an array from the object store is read-only, and torch warns on a read-only one
            return self.reward(torch.from_numpy(np.array(images, copy=True)), prompts).float().numpy()

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _score_batch(self, chunks: list[tuple[np.ndarray, list[str]]]) -> list[object]:
        return await asyncio.get_running_loop().run_in_executor(self._score_pool, self._score_chunks, chunks)

    async def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        started = time.monotonic()
        self._waiting += 1
        self.metrics.set("egrpo_reward_queue", self._waiting)
        try:
            result = await self._score_batch((images, list(prompts)))
        finally:
            self._waiting -= 1
            self.metrics.set("egrpo_reward_queue", self._waiting)
            self.metrics.observe("egrpo_reward_latency_seconds", time.monotonic() - started)
        if isinstance(result, BaseException):
            raise result
        return result

    async def __call__(self, request):
        """HTTP: POST JSON of base64 PNGs; answers {"scores": [...]}, or {"error": ...} with 400 (bad input),
        413 (body too large), 503 (busy or timed out, with Retry-After) or 500."""
        if self._in_flight >= self.max_in_flight:
            return _json_response({"error": f"busy: {self._in_flight} requests in flight (at most "
                                            f"{self.max_in_flight}); retry later"}, 503, **{"Retry-After": "1"})
        self._in_flight += 1
        started = time.monotonic()
        try:
            return await asyncio.wait_for(self._handle_http(request), self.timeout_s)
        except asyncio.TimeoutError:
            return _json_response({"error": f"timed out after {time.monotonic() - started:.3g} s (limit "
                                            f"{self.timeout_s:g} s); retry later"}, 503, **{"Retry-After": "5"})
        finally:
            self._in_flight -= 1

    async def _handle_http(self, request):
        if request.method != "POST":
            return _json_response({"error": "POST a JSON body"}, 405, Allow="POST")
        body = await request.body()
        if len(body) > self.max_body:
            return _json_response({"error": f"request body larger than {self.max_body} bytes"}, 413)
        loop = asyncio.get_running_loop()
        try:
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                raise BadRequest("body is not valid JSON") from None
            # decoding is CPU work: off the event loop (a timed-out request's queued decode is dropped)
            images, prompts = await loop.run_in_executor(
                self._decode_pool, decode_png_request, parsed, self.max_images, self.max_bytes, self.max_pixels)
            try:
                self.reward.validate_inputs(images.shape, prompts)
            except ValueError as err:
                raise BadRequest(str(err)) from None
            scores = await self.score(images, prompts)
        except ValueError as err:  # BadRequest, or a reward refusing its input
            return _json_response({"error": str(err)}, 400)
        except Exception:
            logger.exception("reward %s failed on an HTTP request", self.cfg.name)
            return _json_response({"error": "internal error while scoring"}, 500)
        return _json_response({"reward": self.cfg.name, "scores": [float(x) for x in scores]}, 200)


def deploy_rewards(cfg: ExperimentConfig, wait: bool = True) -> dict[str, object]:
    """Start one Serve application per reward, all at once; returns name -> DeploymentHandle.
    ``wait=False`` returns once the applications exist (handles work; calls queue until a replica is up):
    the driver starts the learner meanwhile, then calls ``wait_for_rewards``."""
    c = cfg.cluster
    if c.http_enabled:
        serve.start(http_options={"host": c.http_host, "port": c.http_port})
    else:
        serve.start(proxy_location="Disabled")
    targets = []
    for r in cfg.rewards:
        options = {"ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "resources": r.resources},
                   # Serve queues (never refuses) past max_ongoing_requests, and the rollout handles share it:
                   # keep it high for batching; the HTTP cap (503 at once) is enforced in the replica.
                   "max_ongoing_requests": 256 + c.max_requests_in_flight,
                   # how often a stopping replica checks for calls still in flight (Serve's 2 s default
                   # is most of the time a run's tear-down takes)
                   "graceful_shutdown_wait_loop_s": 0.1,
                   "logging_config": {"log_level": "WARNING", "enable_access_log": False}}
        if r.start_attempts:
            options["max_constructor_retry_count"] = r.start_attempts
        if r.autoscale_max_replicas:
            options["autoscaling_config"] = {"min_replicas": r.replicas, "max_replicas": r.autoscale_max_replicas,
                                             "target_ongoing_requests": 4}
        else:
            options["num_replicas"] = r.replicas
        app = RewardDeployment.options(name=f"reward_{r.name}", **options).bind(
            r.model_dump(), r.batch_size, r.batch_wait_s, c.max_images_per_request, c.max_image_bytes,
            c.max_image_pixels, c.reward_timeout_s, c.max_requests_in_flight, c.run_name or None,
        )
        targets.append(serve.RunTarget(app, name=app_name(cfg, r.name),
                                       route_prefix=f"/rewards/{r.name}" if c.http_enabled else None))
    handles = serve.run_many(targets, wait_for_applications_running=False)
    if wait:
        wait_for_rewards(cfg)
    return {r.name: h for r, h in zip(cfg.rewards, handles)}


class RewardDeployFailed(ConfigError):
    """A reward application failed to deploy (its replicas could not start); one line, Serve's reason."""


def wait_for_rewards(cfg: ExperimentConfig, poll_s: float = 0.2) -> None:
    """Block until every reward application of the run is RUNNING. Raises RewardDeployFailed, naming the
    replica's error, when Serve gives one up (DEPLOY_FAILED), or when one is deleted meanwhile."""
    pending = {app_name(cfg, r.name): r.name for r in cfg.rewards}
    while pending:
        apps = serve.status().applications
        for app, reward in list(pending.items()):
            status = apps.get(app)
            if status is None or status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.DELETING):
                why = _failure_reason(status) if status is not None else "it was deleted"
                raise RewardDeployFailed(f"reward {reward!r}: its Serve application did not start ({why})")
            if status.status == ApplicationStatus.RUNNING:
                del pending[app]
        if pending:
            time.sleep(poll_s)


def _failure_reason(app) -> str:
    """The replica's own error (the last line of a failed deployment's message: its constructor's traceback),
    after how many failed starts when Serve says."""
    messages = [d.message for d in app.deployments.values() if d.status == DeploymentStatus.DEPLOY_FAILED and d.message]
    message = str((messages or [app.message or app.status])[0])
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    reason = lines[-1][:300] if lines else str(app.status)
    tries = re.search(r"failed to start (\d+) times", message)
    return f"{tries[1]} failed replica start{'s' * (tries[1] != '1')}; {reason}" if tries else reason


def delete_rewards(cfg: ExperimentConfig) -> None:
    """Remove this run's reward applications (never serve.shutdown(): it deletes every user's)."""
    for r in cfg.rewards:
        serve.delete(app_name(cfg, r.name), _blocking=True)


def reward_handles(cfg: ExperimentConfig) -> dict[str, object]:
    """Handles to the running reward apps, from any process of the cluster (e.g. a rollout actor)."""
    return {r.name: serve.get_app_handle(app_name(cfg, r.name)) for r in cfg.rewards}


def remote_reward_fn(handles: dict[str, object], timeout_s: float | None = None):
    """A RewardFn (training.py) that scores through the Serve handles, all rewards in parallel. A call not
    answered within ``timeout_s`` raises TimeoutError (a hung replica must not stall the caller forever)."""

    def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        arr = to_uint8(images).cpu().numpy()
        pending = {name: h.score.remote(arr, list(prompts)) for name, h in handles.items()}
        return {name: torch.tensor(np.asarray(resp.result(timeout_s=timeout_s), dtype=np.float32))
                for name, resp in pending.items()}

    return score


def run_serve(args) -> int:
    import time

    from egrpo_ray.config import load_config
    from egrpo_ray.distributed.cluster import init_ray, shutdown_ray, validate_on_cluster

    cfg = load_config(args.config, args.overrides + ["cluster.http_enabled=true"])
    started = init_ray(cfg)
    deployed = False
    try:
        validate_on_cluster(cfg)
        deployed = True
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
        try:
            if deployed:
                delete_rewards(cfg)  # ours only: other runs on a shared cluster keep theirs
        finally:
            shutdown_ray(started)
