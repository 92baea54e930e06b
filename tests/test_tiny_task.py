"""The shapes task, the alignment reward and the JPEG reward (fast, CPU)."""
import pytest
import torch
import torch.nn.functional as F

from egrpo_ray.config import RewardConfig
from egrpo_ray.rewards import build_reward
from egrpo_ray.rewards.alignment import TERMS, AlignmentReward, object_stats
from egrpo_ray.rewards.jpeg import JpegCompressibility
from egrpo_ray.tasks import shapes


@pytest.fixture(scope="module")
def reward():
    return AlignmentReward()


@pytest.fixture(scope="module")
def all_gt():
    specs = shapes.all_specs()
    return specs, [s.prompt for s in specs], shapes.render_batch(specs)


def test_renderer_deterministic_and_in_range():
    spec = shapes.ShapeSpec(3, 2, 7)
    a = shapes.render(spec)
    b = shapes.render(spec.prompt)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    shapes._render_cached.cache_clear()
    assert torch.equal(shapes.render(spec), a)  # recomputed from scratch: same bits
    # yellow = red + green, no blue; the object sits in the bottom row's middle cell
    assert a[2].abs().sum() == 0 and torch.equal(a[0], a[1])
    ys, xs = torch.nonzero(a[0] > 0.5, as_tuple=True)
    assert ys.float().mean() > 21 and 12 < xs.float().mean() < 20


def test_all_renders_distinct():
    imgs = shapes.render_batch(shapes.all_specs()).flatten(1)
    assert len({tuple(x.tolist()) for x in imgs}) == 162


def test_prompt_round_trip_and_lenient_parse():
    for spec in shapes.all_specs():
        assert shapes.parse_prompt(spec.prompt) == spec
        assert shapes.parse_prompt(spec.prompt.upper() + ".") == spec
    assert shapes.parse_prompt("A blue square in the centre") == shapes.ShapeSpec(2, 1, 4)
    assert shapes.parse_prompt("green triangle, middle left") == shapes.ShapeSpec(1, 2, 3)
    for bad in ["a red blue circle at the top", "a red thing at the top", "a red circle", "a red circle at the top bottom"]:
        with pytest.raises(ValueError):
            shapes.parse_prompt(bad)
    assert all(w in shapes.VOCAB for p in shapes.train_prompts() for w in shapes.tokenize(p))
    assert max(len(shapes.tokenize(p)) for p in shapes.train_prompts() + shapes.heldout_prompts()) == shapes.MAX_PROMPT_WORDS


def test_split_disjoint_by_combination():
    train, held = shapes.train_prompts(), shapes.heldout_prompts()
    assert len(train) == 144 and len(held) == 18
    assert train == shapes.train_prompts() and held == shapes.heldout_prompts()  # deterministic
    tr = {shapes.parse_prompt(p) for p in train}
    he = {shapes.parse_prompt(p) for p in held}
    assert not tr & he and len(tr | he) == 162
    # every attribute pair of a held-out combination was seen in training
    for h in he:
        assert any((t.colour, t.shape) == (h.colour, h.shape) for t in tr)
        assert any((t.colour, t.position) == (h.colour, h.position) for t in tr)
        assert any((t.shape, t.position) == (h.shape, h.position) for t in tr)


def test_ground_truth_scores_near_one(reward, all_gt):
    _, prompts, gt = all_gt
    terms = reward.terms(gt, prompts)
    assert terms["reward"].mean() >= 0.95 and terms["reward"].min() >= 0.9
    assert set(TERMS) <= set(terms)
    assert build_reward(RewardConfig(name="alignment"))(gt[:4], prompts[:4]).shape == (4,)


def test_reward_tolerates_small_deviations(reward, all_gt):
    _, prompts, gt = all_gt
    g = torch.Generator().manual_seed(0)
    noisy = (gt + 0.05 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    assert reward(noisy, prompts).mean() > 0.85
    assert reward(gt * 0.85, prompts).mean() > 0.85
    assert reward(torch.roll(gt, 1, dims=3), prompts).mean() > 0.8


def _swap(specs, **change):
    out = []
    for s in specs:
        d = {"colour": s.colour, "shape": s.shape, "position": s.position}
        for k, step in change.items():
            d[k] = (d[k] + step) % {"colour": 6, "shape": 3, "position": 9}[k]
        out.append(shapes.ShapeSpec(**d).prompt)
    return out


@pytest.mark.parametrize("change,limit", [({"colour": 1}, 0.05), ({"colour": 3}, 0.05), ({"shape": 1}, 0.35), ({"shape": 2}, 0.35), ({"position": 1}, 0.35), ({"position": 4}, 0.35)])
def test_mismatched_prompts_score_low(reward, all_gt, change, limit):
    specs, _, gt = all_gt
    assert reward(gt, _swap(specs, **change)).mean() < limit


def test_each_shape_pair_separated(reward, all_gt):
    specs, _, gt = all_gt
    terms = reward.terms(gt, _swap(specs, shape=1))["shape"]
    for k in range(3):  # circle->square, square->triangle, triangle->circle
        assert terms[[s.shape == k for s in specs]].max() < 0.3


def _centre(reward):
    specs = [s for s in shapes.all_specs() if s.position == 4]
    return specs, [s.prompt for s in specs], shapes.render_batch(specs)


def test_oversized_and_stretched_objects_score_lower(reward):
    specs, prompts, gt = _centre(reward)
    big = shapes.render_batch(specs, 40)[:, :, 4:36, 4:36]  # 1.25x larger, same centre
    small = F.interpolate(shapes.render_batch(specs, 24), size=(24, 24))
    small = F.pad(small, (4, 4, 4, 4))  # 0.75x
    tall = F.interpolate(gt, size=(48, 32), mode="bilinear", align_corners=False)[:, :, 8:40]  # 1.5x taller
    wide = F.interpolate(gt, size=(32, 40), mode="bilinear", align_corners=False)[:, :, :, 4:36]  # 1.25x wider
    base = reward(gt, prompts).mean()
    for name, img in [("big", big), ("small", small), ("tall", tall), ("wide", wide)]:
        assert reward(img, prompts).mean() < base - 0.4, name
    assert reward.terms(big, prompts)["size"].mean() < 0.3
    assert reward.terms(tall, prompts)["aspect"].mean() < 0.3
    # the independent diagnostic sees the same thing
    assert object_stats(big)["area"].mean() > 1.4 * object_stats(gt)["area"].mean()
    assert object_stats(tall)["aspect"].mean() > 1.3 * object_stats(gt)["aspect"].mean()


def test_degenerate_images(reward):
    prompts = shapes.heldout_prompts()[:6]
    assert torch.all(reward(torch.zeros(6, 3, 32, 32), prompts) == 0)
    noise = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert reward(noise, prompts).max() < 0.1
    assert reward(torch.ones(6, 3, 32, 32), prompts).max() < 0.1
    r = reward(torch.rand(6, 3, 32, 32), prompts)
    assert r.dtype == torch.float32 and torch.all((r >= 0) & (r <= 1))
    with pytest.raises(ValueError):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])


def test_object_stats(all_gt):
    _, _, gt = all_gt
    st = object_stats(gt)
    assert 35 < st["area"].mean() < 55 and abs(st["aspect"].mean() - 1) < 0.1
    empty = object_stats(torch.zeros(2, 3, 32, 32))
    assert torch.all(empty["area"] == 0) and torch.all(empty["aspect"].isnan())


def test_jpeg_orders_flat_above_noise():
    jpeg = JpegCompressibility()
    flat = torch.full((1, 3, 32, 32), 0.4)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shape = shapes.render_batch(shapes.all_specs()[:1])
    r = jpeg(torch.cat([flat, shape, noise]), ["", "", ""])
    assert r.shape == (3,) and r.dtype == torch.float32
    assert r[0] > r[1] > r[2] and torch.all(r < 0)
    assert torch.equal(r, jpeg(torch.cat([flat, shape, noise]), ["", "", ""]))
    assert build_reward(RewardConfig(name="jpeg")).name == "jpeg"
