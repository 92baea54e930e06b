"""A programmatic prompt-alignment reward for the shapes task (egrpo_ray/tasks/shapes.py), in [0, 1].

Deterministic, no downloads, vectorised over the batch. For each image (float [3, H, W] in [0, 1],
clamped) and its prompt (parsed to colour, shape, position; an unparseable prompt raises ValueError):

1. Target-colour mass. The colour is a corner of the RGB cube (each channel c_k in {0, 1}); a
   pixel's membership is m = prod_k (x_k if c_k = 1 else 1 - x_k): 1 for the exact colour, 0 for black
   and for any other of the six colours, and proportional to brightness for a dimmed or anti-aliased
   pixel of the right hue. All geometry below uses m as a mass distribution; M = sum(m) is the soft
   area in pixels.
2. Terms, each in [0, 1], each compared with the same statistic of the ground-truth render of the
   same prompt at the same resolution (so a ground-truth render scores exactly 1):
   - colour:   purity M / sum(max_k x_k): the share of everything bright that has the asked colour.
   - position: exp(-d^2 / (2 * 2^2)), d = distance in px between the mass centroid and the target's.
   - size:     exp(-log(M / M*)^2 / (2 * 0.25^2)): area within ~25 % (in log) of the target's. This and
               the next term stop RL from growing or stretching objects (what the probe's reward invited).
   - aspect:   exp(-(log(sd_y/sd_x) - log(sd_y*/sd_x*))^2 / (2 * 0.2^2)), from the mass's second moments.
   - shape:    exp(-0.5 * [((fill - fill*) / 0.08)^2 + ((skew - skew*) / 0.3)^2]) with two cues:
               fill = M / (extent_x * extent_y), the share of the object's bounding box it covers
               (square 1.0, circle ~0.79, triangle ~0.5; an extent counts the columns / rows holding at
               least 1 px of mass, fractionally below that), and skew = the vertical skewness of the mass
               (an upward triangle is bottom-heavy: ~ -0.5; circle and square 0). The two separate
               triangles from squares and circles, and squares from circles.
3. reward = presence * prod_t (floor + (1 - floor) * term_t), floor = 0.2, over the five terms, where
   presence = clamp(M / (0.5 M*), 0, 1) gates images with (almost) none of the asked colour to 0. A
   wrong colour or an empty image scores 0, a single wrong attribute (shape, position, size...) caps
   the reward near 0.2, so "reward went up" needs every attribute right at once.
   ``combine="mean"`` (config: ``combine: mean``) gives graded partial credit instead: reward =
   presence * mean_t term_t. The product makes a sample that fixes one attribute while others stay
   wrong score almost as low as one that fixes none; the mean pays for each attribute on its own
   (docs/benchmarks.md, section 1, compares RL on both).

Compositional prompts (tasks/scenes.py) use the same pieces, with a stricter colour membership (the
other channels must be dark relative to the asked ones, so a neighbour's anti-aliased edge does not
count) and a reference per object at the grid cell nearest its centroid; ``position`` is 1 for them:
- relation ("a red circle left of a blue square"): presence = presence(A) x presence(B); colour =
  purity of A's and B's mass together; shape, size, aspect = the mean of A's and B's terms; relation =
  sigmoid((d - 3) / 1.5), d the signed gap in px (32 px scale) between the mass centroids along the
  relation's axis (a true layout has d >= 10.7: ~1; side by side: ~0.1; reversed: ~0).
- count ("two green triangles"): objects are the connected components of the colour's mass; count =
  exp(-(found - asked)^2 / 0.5) with found = components of >= 30 % of one object's mass; shape, size,
  aspect = the mean over the asked number of largest components (a missing one scores 0); presence
  against asked x one object's mass.
The reward combines colour, shape, size, aspect and relation or count as in step 3. ``terms`` reports
``relation`` and ``count`` for every prompt (1 where not asked).

Reference statistics are kept per resolution in a small LRU (``TARGET_CACHE_SIZES`` resolutions, 162 x 7
floats each). At the task's own 32x32 they come from the task's renders, bit for bit as always; at any
other resolution they are computed without rendering a canvas: the statistics do not depend on the
colour (a ground-truth pixel of the asked colour has membership ramp(coverage)), so each of the 27
(shape, position) coverages is evaluated only over the object's bounding box, in row bands of at most
``_BAND_SAMPLES`` sub-samples, with the renderer's exact geometry. Memory is bounded at any resolution
(the time grows with the object's area, about a second at 2048x2048). Images are scored in chunks of at
most ``_CHUNK_PIXELS`` pixels, so a large batch of large images never materialises all at once in float.

``object_stats`` is an independent diagnostic for evaluation (not used by the reward): the count of
pixels whose brightest channel exceeds 0.5 (area in px) and the height / width of their bounding box.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Sequence

import torch

from egrpo_ray.config import RewardConfig
from egrpo_ray.images import to_float
from egrpo_ray.rewards.base import Reward
from egrpo_ray.tasks import scenes, shapes

TERMS = ("colour", "position", "shape", "size", "aspect")
# The five terms each kind of prompt asks for (a scene's ``position`` is implied by its relation or count).
RELATION_TERMS = ("colour", "shape", "size", "aspect", "relation")
COUNT_TERMS = ("colour", "shape", "size", "aspect", "count")
COMBINES = ("product", "mean")  # how the terms make the reward (module docstring, step 3)
# Terms of the compositional prompts (1 where a prompt does not ask for them; ``position`` is 1 for them).
SCENE_TERMS = ("relation", "count")
_EPS = 1e-6
# Pixel masks go through a linear ramp: below RAMP_LO counts as background (robust to faint noise),
# above RAMP_HI as fully on (robust to a slightly dim object); anti-aliased edges fall in between.
RAMP_LO, RAMP_HI = 0.2, 0.7
TARGET_CACHE_SIZES = 4  # resolutions whose reference statistics are kept (LRU)
_BAND_SAMPLES = 1 << 21  # sub-samples per band when computing reference statistics (float64: 16 MB an array)
_CHUNK_PIXELS = 1 << 22  # images scored at once are split to at most this many pixels (B * H * W)


def _membership(images: torch.Tensor, colours: torch.Tensor, relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(target-colour mask, brightness mask), each [B,H,W] in [0, 1], after the soft threshold ramp.

    ``relative`` (scenes with several colours): the other channels must be dark relative to the asked
    ones, so that the dim anti-aliased edge of a neighbour whose colour contains the asked one (a
    yellow square's edge for red) is not counted as the asked colour."""
    x = images.clamp(0, 1)
    B = x.shape[0]
    c = colours.float().view(B, 3, 1, 1) > 0.5
    on = torch.where(c, x, torch.ones_like(x)).amin(dim=1)  # the asked channels: the dimmest of them
    dark = x / on.clamp_min(_EPS).unsqueeze(1) if relative else x
    off = torch.where(c, torch.ones_like(x), 1 - dark.clamp(0, 1)).prod(dim=1)  # the other channels must be dark
    m = on * off
    bright = x.amax(dim=1)
    return _ramp(m), _ramp(bright)


def _ramp(v: torch.Tensor) -> torch.Tensor:
    return ((v - RAMP_LO) / (RAMP_HI - RAMP_LO)).clamp(0, 1)


def _stats(images: torch.Tensor, colours: torch.Tensor, relative: bool = False) -> dict[str, torch.Tensor]:
    """Mass statistics of the target colour. images [B,3,H,W], colours [B,3] in {0,1}."""
    return _mass_stats(*_membership(images, colours, relative))


def _mass_stats(m: torch.Tensor, bright: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of a mass map m [B,H,W] (``bright``: the brightness mask, summed for purity)."""
    B, H, W = m.shape
    mass = m.sum(dim=(1, 2))
    safe = mass.clamp_min(_EPS)
    ys = torch.arange(H, dtype=torch.float32, device=m.device).view(1, H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float32, device=m.device).view(1, 1, W) + 0.5
    cy = (m * ys).sum(dim=(1, 2)) / safe
    cx = (m * xs).sum(dim=(1, 2)) / safe
    dy = ys - cy.view(B, 1, 1)
    dx = xs - cx.view(B, 1, 1)
    var_y = (m * dy**2).sum(dim=(1, 2)) / safe
    var_x = (m * dx**2).sum(dim=(1, 2)) / safe
    sd_y, sd_x = var_y.clamp_min(_EPS).sqrt(), var_x.clamp_min(_EPS).sqrt()
    skew_y = (m * dy**3).sum(dim=(1, 2)) / safe / sd_y**3
    tallest = m.sum(dim=1).amax(dim=1)  # the object's height: mass of its fullest column
    widest = m.sum(dim=2).amax(dim=1)  # its width: mass of its fullest row
    fill = mass / (tallest * widest).clamp_min(_EPS)
    return {
        "mass": mass,
        "bright": bright.sum(dim=(1, 2)),
        "cx": cx,
        "cy": cy,
        "log_aspect": torch.log(sd_y / sd_x),
        "fill": fill,
        "skew": skew_y,
    }


def _components(m: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Connected components (8-neighbour) of m > threshold, grown by one pixel into the object's
    anti-aliased fringe (m > 0): labels [B,H,W] long, 0 = background, else 1 + a flat pixel index."""
    B, H, W = m.shape
    fg = m > threshold
    ids = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(B, H, W)
    labels = torch.where(fg, ids, torch.zeros_like(ids))
    for _ in range(H * W):  # propagate the largest id through each component (converges in its diameter)
        grown = torch.nn.functional.max_pool2d(labels.unsqueeze(1), 3, 1, 1).squeeze(1)
        grown = torch.where(fg, grown, torch.zeros_like(grown))
        if torch.equal(grown, labels):
            break
        labels = grown
    fringe = torch.nn.functional.max_pool2d(labels.unsqueeze(1), 3, 1, 1).squeeze(1)
    labels = torch.where(~fg & (m > 0), fringe, labels)
    return labels.long()


def _nearest_reference(table: dict[str, torch.Tensor], colours: Sequence[int], kinds: Sequence[int],
                       st: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Reference statistics of each object's (colour, shape) at the grid cell nearest its centroid."""
    centre = (torch.arange(3, dtype=torch.float32) + 0.5) * size / 3
    col = (st["cx"].view(-1, 1) - centre).abs().argmin(dim=1)
    row = (st["cy"].view(-1, 1) - centre).abs().argmin(dim=1)
    idx = (torch.tensor(colours) * 3 + torch.tensor(kinds)) * 9 + row * 3 + col
    return {k: v[idx] for k, v in table.items()}


def _window_stats(spec: shapes.ShapeSpec, size: int) -> dict[str, float]:
    """``_stats`` of the ground-truth render of ``spec`` at ``size`` without rendering the canvas.

    Mirrors ``shapes._coverage`` exactly (same sub-sample centres, same inside tests, float64 coverage
    cast to float32, then the same ramp), but only over the object's bounding box plus a 1 px margin,
    in row bands; the moments are accumulated in float64 about the window's origin.
    """
    ss = shapes.SUPERSAMPLE
    scale = size / shapes.IMAGE_SIZE
    cx, cy = spec.centre
    cx, cy = cx * scale, cy * scale
    if spec.shape_name == "circle":
        r = shapes.CIRCLE_RADIUS * scale
        box = (cx - r, cx + r, cy - r, cy + r)
    elif spec.shape_name == "square":
        h = shapes.SQUARE_SIDE * scale / 2
        box = (cx - h, cx + h, cy - h, cy + h)
    else:
        b, hgt = shapes.TRIANGLE_BASE * scale, shapes.TRIANGLE_HEIGHT * scale
        top = cy - hgt / 2
        box = (cx - b / 2, cx + b / 2, top, top + hgt)
    x0, x1 = max(0, math.floor(box[0]) - 1), min(size, math.ceil(box[1]) + 2)  # pixel columns [x0, x1)
    y0, y1 = max(0, math.floor(box[2]) - 1), min(size, math.ceil(box[3]) + 2)  # pixel rows [y0, y1)
    w = x1 - x0
    x = ((torch.arange(x0 * ss, x1 * ss, dtype=torch.float64) + 0.5) / ss).view(1, -1)
    px = torch.arange(w, dtype=torch.float64) + 0.5  # pixel centres relative to x0
    band = max(1, _BAND_SAMPLES // (w * ss * ss))
    sums = torch.zeros(6, dtype=torch.float64)  # mass, m*y, m*x, m*y^2, m*x^2, m*y^3 (relative coordinates)
    col_mass = torch.zeros(w, dtype=torch.float64)
    widest = 0.0
    for r0 in range(y0, y1, band):
        r1 = min(y1, r0 + band)
        y = ((torch.arange(r0 * ss, r1 * ss, dtype=torch.float64) + 0.5) / ss).view(-1, 1)
        if spec.shape_name == "circle":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        elif spec.shape_name == "square":
            inside = ((x - cx).abs() <= h) & ((y - cy).abs() <= h)
        else:
            frac = (y - top) / hgt
            inside = (frac >= 0) & (frac <= 1) & ((x - cx).abs() <= frac * b / 2)
        cov = inside.double().reshape(r1 - r0, ss, w, ss).mean(dim=(1, 3)).float()
        m = _ramp(cov).double()
        py = (torch.arange(r0 - y0, r1 - y0, dtype=torch.float64) + 0.5).view(-1, 1)
        rows = m.sum(dim=1, keepdim=True)
        cols = m.sum(dim=0)
        col_mass += cols
        widest = max(widest, float(rows.max()))
        sums += torch.stack([rows.sum(), (rows * py).sum(), (cols * px).sum(), (rows * py**2).sum(),
                             (cols * px**2).sum(), (rows * py**3).sum()])
    mass = float(sums[0])
    safe = max(mass, _EPS)
    ey, ex, eyy, exx, eyyy = (float(v) / safe for v in sums[1:])
    var_y, var_x = max(eyy - ey * ey, _EPS), max(exx - ex * ex, _EPS)
    sd_y, sd_x = math.sqrt(var_y), math.sqrt(var_x)
    third = eyyy - 3 * ey * eyy + 2 * ey**3  # the third central moment
    tallest = float(col_mass.max())
    return {
        "mass": mass,
        "bright": mass,  # a ground-truth render is bright exactly where it has the asked colour
        "cx": ex + x0,
        "cy": ey + y0,
        "log_aspect": math.log(sd_y / sd_x),
        "fill": mass / max(tallest * widest, _EPS),
        "skew": third / sd_y**3,
    }


def reference_stats(size: int) -> dict[str, torch.Tensor]:
    """``_stats`` of the 162 ground-truth renders at ``size`` (each [162], float32, by ``ShapeSpec.index``).

    32x32 (the task's resolution): from the task's renders, exactly as scored since the start. Any other
    resolution: from ``_window_stats`` (bounded memory; equal to the full renders' up to float rounding).
    """
    specs = shapes.all_specs()
    if size == shapes.IMAGE_SIZE:
        gt = shapes.render_batch(specs, size)
        cols = torch.tensor([shapes.COLOURS[s.colour_name] for s in specs])
        return _stats(gt, cols)
    per_geometry: dict[tuple[int, int], dict[str, float]] = {}
    rows = []
    for s in specs:  # the statistics depend on shape and position only: 27 windows, not 162
        key = (s.shape, s.position)
        if key not in per_geometry:
            per_geometry[key] = _window_stats(s, size)
        rows.append(per_geometry[key])
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in rows[0]}


def object_stats(images: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Independent diagnostic: area (px with max channel > threshold) and bounding-box height/width.

    Returns float tensors [B]: ``area``, ``height``, ``width``, ``aspect`` (= height / width, NaN for an
    image with no such pixel).
    """
    fg = images.float().amax(dim=1) > threshold  # [B,H,W]
    B, H, W = fg.shape
    area = fg.sum(dim=(1, 2)).float()
    rows, cols = fg.any(dim=2), fg.any(dim=1)

    def extent(a: torch.Tensor) -> torch.Tensor:
        n = a.shape[1]
        first = a.float().argmax(dim=1)
        last = n - 1 - a.flip(1).float().argmax(dim=1)
        return torch.where(a.any(dim=1), (last - first + 1).float(), torch.zeros(B))

    height, width = extent(rows), extent(cols)
    aspect = torch.where(width > 0, height / width.clamp_min(1), torch.full((B,), float("nan")))
    return {"area": area, "height": height, "width": width, "aspect": aspect}


class AlignmentReward(Reward):
    """Prompt alignment for the shapes task; see the module docstring for the exact definition."""

    name = "alignment"

    def __init__(
        self,
        floor: float = 0.2,
        position_px: float = 2.0,
        size_log_sd: float = 0.25,
        aspect_log_sd: float = 0.2,
        fill_sd: float = 0.08,
        skew_sd: float = 0.3,
        presence_frac: float = 0.5,
        combine: str = "product",
    ):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.combine = combine
        self.floor = floor
        self.position_px = position_px
        self.size_log_sd = size_log_sd
        self.aspect_log_sd = aspect_log_sd
        self.fill_sd = fill_sd
        self.skew_sd = skew_sd
        self.presence_frac = presence_frac
        # resolution -> stats of all 162 GT renders; an LRU of TARGET_CACHE_SIZES resolutions
        self._targets: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._targets_lock = threading.Lock()  # scoring may run in worker threads (the reward service)

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "AlignmentReward":
        return cls(combine=cfg.combine or "product")

    def _target_table(self, size: int) -> dict[str, torch.Tensor]:
        with self._targets_lock:
            if size in self._targets:
                self._targets.move_to_end(size)
                return self._targets[size]
            table = reference_stats(size)
            self._targets[size] = table
            while len(self._targets) > TARGET_CACHE_SIZES:
                self._targets.popitem(last=False)
            return table

    def validate_inputs(self, image_shape: Sequence[int], prompts: Sequence[str]) -> list[scenes.Scene]:
        """Raises ValueError for a shape this reward cannot score or an unparseable prompt; returns the specs."""
        super().validate_inputs(image_shape, prompts)
        shape = tuple(image_shape)
        if shape[2] != shape[3]:
            raise ValueError(f"the shapes task renders square images, got {shape[3]}x{shape[2]}")
        return [scenes.parse_scene(p) for p in prompts]

    def terms(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every term [B] (float32, CPU) plus ``presence`` and the combined ``reward``."""
        specs = self.validate_inputs(images.shape, prompts)
        B, _, H, W = images.shape
        if B > 1 and B * H * W > _CHUNK_PIXELS:  # bounded float memory for large batches of large images
            step = max(1, _CHUNK_PIXELS // (H * W))
            parts = [self.terms(images[i : i + step], prompts[i : i + step]) for i in range(0, B, step)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        images = to_float(images.detach().cpu())
        table = self._target_table(images.shape[2])
        out = {k: torch.ones(B) for k in (*TERMS, *SCENE_TERMS)}
        out["presence"], out["reward"] = torch.zeros(B), torch.zeros(B)
        scorers = {"single": self._single_terms, "relation": self._relation_terms, "count": self._count_terms}
        for kind, score in scorers.items():
            rows = [i for i, s in enumerate(specs) if scenes.kind_of(s) == kind]
            if rows:
                part = score(images[rows], [specs[i] for i in rows], table)
                for k, v in part.items():
                    out[k][rows] = v.float()
        return out

    def _combine(self, presence: torch.Tensor, mass: torch.Tensor, terms: dict[str, torch.Tensor],
                 asked: Sequence[str] = TERMS) -> dict[str, torch.Tensor]:
        """reward = presence x prod(floor + (1 - floor) term), or presence x mean(term) with ``combine="mean"``,
        over the ``asked`` terms (the others are reported as 1); without mass every term reports 0."""
        has_mass = mass > _EPS
        out = {k: torch.where(has_mass, v, torch.zeros_like(v)) for k, v in terms.items()}
        if self.combine == "mean":
            reward = presence * torch.stack([out[k] for k in asked]).mean(dim=0)
        else:
            reward = presence.clone()
            for k in asked:
                reward = reward * (self.floor + (1 - self.floor) * out[k])
        out["presence"] = presence
        out["reward"] = reward.clamp(0, 1)
        return out

    def _object_terms(self, st: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Shape, size and aspect of one object's mass against its reference's."""
        size = torch.exp(-torch.log(st["mass"].clamp_min(_EPS) / tgt["mass"]) ** 2 / (2 * self.size_log_sd**2))
        aspect = torch.exp(-((st["log_aspect"] - tgt["log_aspect"]) ** 2) / (2 * self.aspect_log_sd**2))
        shape = torch.exp(
            -0.5 * (((st["fill"] - tgt["fill"]) / self.fill_sd) ** 2 + ((st["skew"] - tgt["skew"]) / self.skew_sd) ** 2)
        )
        return {"shape": shape, "size": size, "aspect": aspect}

    def _single_terms(self, images: torch.Tensor, specs: Sequence[shapes.ShapeSpec], table) -> dict[str, torch.Tensor]:
        idx = torch.tensor([s.index for s in specs], dtype=torch.long)
        cols = torch.tensor([shapes.COLOURS[s.colour_name] for s in specs])
        st = _stats(images, cols)
        tgt = {k: v[idx] for k, v in table.items()}
        mass = st["mass"]
        presence = (mass / (self.presence_frac * tgt["mass"])).clamp(0, 1)
        colour = (mass / st["bright"].clamp_min(_EPS)).clamp(0, 1)
        d2 = (st["cx"] - tgt["cx"]) ** 2 + (st["cy"] - tgt["cy"]) ** 2
        position = torch.exp(-d2 / (2 * self.position_px**2))
        terms = {"colour": colour, "position": position, **self._object_terms(st, tgt)}
        return self._combine(presence, mass, terms)

    def _relation_terms(self, images: torch.Tensor, specs: Sequence[scenes.RelationSpec], table) -> dict[str, torch.Tensor]:
        """Both objects by colour; shape, size and aspect averaged over the two; the relation between
        their mass centroids: sigmoid((d - 3 px) / 1.5 px) of the signed gap d along the relation's axis
        (at 32 px scale; one grid cell is 10.7 px, so a true layout scores ~1, side by side ~0.1)."""
        size = images.shape[2]
        objs = []
        for which in ("a", "b"):
            cols = torch.tensor([shapes.COLOURS[shapes.COLOUR_NAMES[getattr(s, f"colour_{which}")]] for s in specs])
            st = _stats(images, cols, relative=True)
            ref = _nearest_reference(table, [getattr(s, f"colour_{which}") for s in specs], [getattr(s, f"shape_{which}") for s in specs], st, size)
            objs.append((st, ref))
        (sa, ra), (sb, rb) = objs
        presence = (sa["mass"] / (self.presence_frac * ra["mass"])).clamp(0, 1) * (sb["mass"] / (self.presence_frac * rb["mass"])).clamp(0, 1)
        colour = ((sa["mass"] + sb["mass"]) / sa["bright"].clamp_min(_EPS)).clamp(0, 1)
        rel = torch.tensor([s.relation for s in specs])
        gap = torch.stack([sb["cx"] - sa["cx"], sa["cx"] - sb["cx"], sb["cy"] - sa["cy"], sa["cy"] - sb["cy"]], dim=1)
        gap = gap.gather(1, rel.view(-1, 1)).squeeze(1) * shapes.IMAGE_SIZE / size
        relation = torch.sigmoid((gap - 3.0) / 1.5)
        ta, tb = self._object_terms(sa, ra), self._object_terms(sb, rb)
        terms = {k: (ta[k] + tb[k]) / 2 for k in ta}
        terms.update(colour=colour, position=torch.ones_like(colour), relation=relation, count=torch.ones_like(colour))
        return self._combine(presence, torch.minimum(sa["mass"], sb["mass"]), terms, RELATION_TERMS)

    def _count_terms(self, images: torch.Tensor, specs: Sequence[scenes.CountSpec], table) -> dict[str, torch.Tensor]:
        """Objects = connected components of the colour's mass; count: exp(-(found - asked)^2 / 0.5),
        found counting components of at least 30 % of one object's mass; shape, size and aspect are
        averaged over the asked number of largest components (a missing one scores 0)."""
        B, _, size, _ = images.shape
        cols = torch.tensor([shapes.COLOURS[shapes.COLOUR_NAMES[s.colour]] for s in specs])
        m, bright = _membership(images, cols, relative=True)
        labels = _components(m)
        comp_mass = torch.zeros(B, labels[0].numel() + 1).scatter_add_(1, labels.flatten(1), m.flatten(1))[:, 1:]
        one = table["mass"][torch.tensor([(s.colour * 3 + s.shape) * 9 + 4 for s in specs])]  # one object (centre cell)
        asked = torch.tensor([s.number for s in specs], dtype=torch.float32)
        found = (comp_mass >= 0.3 * one.view(-1, 1)).sum(1).float()
        count = torch.exp(-((found - asked) ** 2) / (2 * 0.5**2))
        most = max(s.number for s in specs)
        top_mass, top_id = comp_mass.topk(most, dim=1)  # labels are 1 + flat index
        per_obj = {k: torch.zeros(B) for k in ("shape", "size", "aspect")}
        for j in range(most):
            mj = m * (labels == (top_id[:, j] + 1).view(B, 1, 1))
            st = _mass_stats(mj, bright)
            ref = _nearest_reference(table, [s.colour for s in specs], [s.shape for s in specs], st, size)
            terms_j = self._object_terms(st, ref)
            use = (asked > j) & (top_mass[:, j] > _EPS)
            for k in per_obj:
                per_obj[k] += torch.where(use, terms_j[k], torch.zeros(B))
        terms = {k: v / asked for k, v in per_obj.items()}
        mass = m.sum(dim=(1, 2))
        presence = (mass / (self.presence_frac * asked * one)).clamp(0, 1)
        colour = (mass / bright.sum(dim=(1, 2)).clamp_min(_EPS)).clamp(0, 1)
        terms.update(colour=colour, position=torch.ones(B), relation=torch.ones(B), count=count)
        return self._combine(presence, mass, terms, COUNT_TERMS)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.terms(images, prompts)["reward"]
