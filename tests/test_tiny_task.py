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


# --- compositional prompts (tasks/scenes.py) -------------------------------------------------------
from egrpo_ray.tasks import scenes  # noqa: E402


def _flip_relation(s):
    return scenes.RelationSpec(s.colour_a, s.shape_a, {0: 1, 1: 0, 2: 3, 3: 2}[s.relation], s.colour_b, s.shape_b)


def test_scene_grammar_round_trip_and_vocab():
    every = [s for k in ("single", "relation", "count") for s in scenes.scenes(k)]
    assert len(every) == 162 + 1080 + 36
    for s in every:
        assert scenes.parse_scene(s.prompt) == s
        assert scenes.parse_scene(s.prompt.upper() + ".") == s
    words = [shapes.tokenize(s.prompt) for s in every]
    assert all(w in shapes.VOCAB for ws in words for w in ws)
    assert max(map(len, words)) == 8  # the text encoder's max_len: nothing is truncated
    assert scenes.parse_scene("two green triangles") == scenes.CountSpec(2, 1, 2)
    assert scenes.parse_scene("a red circle left of a blue square") == scenes.RelationSpec(0, 0, 0, 2, 1)
    for bad in ["a red circle left of a red square", "a red circle near a blue square", "two green", "two green triangle",
                "two three red circles", "a red left of circle a blue square"]:
        with pytest.raises(ValueError):
            scenes.parse_scene(bad)


def test_scene_layouts_sampled_and_valid():
    spec = scenes.RelationSpec(0, 0, 2, 2, 1)  # a red circle above a blue square
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(o.position for o in scenes.sample_objects(spec, g)) for _ in range(200)}
    assert len(drawn) > 15 and all(a // 3 < b // 3 for a, b in drawn)  # many layouts, A always in a higher row
    assert torch.equal(scenes.render_scene(spec), scenes.render_scene(spec.prompt))  # no generator: fixed layout
    img = scenes.render_scene("three cyan squares", g)
    assert img.shape == (3, 32, 32) and img.max() <= 1 and img[0].abs().sum() == 0
    assert abs(img[1].sum() - 3 * shapes.render(shapes.ShapeSpec(5, 1, 4))[1].sum()) < 1e-3  # three whole squares


def test_scene_splits():
    for kind in ("single", "relation", "count"):
        held, val, train = (set(scenes.scenes(kind, s)) for s in ("heldout", "validation", "train"))
        assert held and val and train and not (held & val) and not (held & train) and not (val & train)
        assert held | val | train == set(scenes.scenes(kind))
        assert not any(scenes.in_pretraining(s) for s in held)
        assert all(scenes.in_pretraining(s) for s in train)
    from egrpo_ray.tiny_pretrain import pretraining_scenes

    seen = {s for pool in pretraining_scenes().values() for s in pool}
    assert not seen & {s for k in ("single", "relation", "count") for s in scenes.scenes(k, "heldout")}
    # held-out relations recombine parts seen in pre-training: each object and each relation word
    rel_seen = [s for s in seen if isinstance(s, scenes.RelationSpec)]
    for h in scenes.scenes("relation", "heldout"):
        assert any((s.colour_a, s.shape_a, s.relation) == (h.colour_a, h.shape_a, h.relation) for s in rel_seen)
        assert any((s.colour_b, s.shape_b, s.relation) == (h.colour_b, h.shape_b, h.relation) for s in rel_seen)


def test_prompt_sets_for_rl():
    from egrpo_ray.config import PromptsConfig
    from egrpo_ray.prompts import prompt_splits, train_probe, validation_prompts

    cfg = PromptsConfig(heldout_count=18)
    train, held = prompt_splits(cfg)
    val = validation_prompts(cfg)
    assert len(held) == 18 and len(val) == cfg.validation_count
    assert not set(train) & set(held) and not set(val) & set(held) and not set(val) & set(train)
    kinds = {scenes.kind_of(scenes.parse_scene(p)) for p in held}
    assert kinds == {"single", "relation", "count"}  # a prefix of the interleaved list keeps the mixture
    assert {scenes.kind_of(scenes.parse_scene(p)) for p in train} == {"relation", "count"}
    assert len({p.split(" ")[1] for p in held}) > 3  # shuffled: not all "a red ..."
    assert prompt_splits(cfg) == (train, held) and validation_prompts(cfg) == val  # deterministic
    single = PromptsConfig(tiny_train_kinds=["single"], tiny_heldout_kinds=["single"], heldout_count=18)
    assert sorted(prompt_splits(single)[1]) == sorted(shapes.heldout_prompts())
    few = PromptsConfig(heldout_count=18, train_count=5)  # a small fixed training set: a prefix, held-out unchanged
    assert prompt_splits(few) == (train[:5], held)
    # the training-prompt probe: 24 images evenly spread; a small training set is repeated, not scored once
    assert train_probe(train) == train[:: len(train) // 24][:24]
    assert train_probe(train[:5]) == (train[:5] * 5)[:24]


def test_train_count_cuts_a_prompt_file(tmp_path):
    from egrpo_ray.config import PromptsConfig
    from egrpo_ray.prompts import prompt_splits

    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    cfg = PromptsConfig(source="file", train_path=str(tmp_path / "p.txt"), train_count=2, heldout_count=3)
    assert prompt_splits(cfg) == (["one", "two"], ["one", "two", "three"])  # no test file: held-out is the whole file


@pytest.fixture(scope="module")
def compositional_gt():
    g = torch.Generator().manual_seed(3)
    rel = scenes.scenes("relation")[::7]
    cnt = scenes.scenes("count")
    return rel, scenes.render_scenes(rel, g), cnt, scenes.render_scenes(cnt, g)


def test_compositional_ground_truth_scores_near_one(reward, compositional_gt):
    rel, rel_img, cnt, cnt_img = compositional_gt
    for items, img in ((rel, rel_img), (cnt, cnt_img)):
        prompts = [s.prompt for s in items]
        r = reward(img, prompts)
        assert r.mean() > 0.97 and r.min() > 0.9
        noisy = (img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        assert reward(noisy, prompts).mean() > 0.85
    mixed = [rel[0].prompt, shapes.heldout_prompts()[0], cnt[0].prompt]
    imgs = torch.stack([rel_img[0], shapes.render(mixed[1]), cnt_img[0]])
    terms = reward.terms(imgs, mixed)
    assert terms["reward"].min() > 0.95 and set(terms) >= {*TERMS, "relation", "count", "presence", "reward"}


def test_compositional_mistakes_score_low(reward, compositional_gt):
    rel, rel_img, cnt, cnt_img = compositional_gt
    wrong_rel = reward.terms(rel_img, [_flip_relation(s).prompt for s in rel])
    assert wrong_rel["reward"].mean() < 0.25 and wrong_rel["relation"].max() < 0.05
    only_a = torch.stack([scenes.render_objects(scenes.objects(s, scenes.layouts(s)[0])[:1]) for s in rel])
    assert reward(only_a, [s.prompt for s in rel]).max() < 0.05  # object B missing
    wrong_shape_b = [scenes.RelationSpec(s.colour_a, s.shape_a, s.relation, s.colour_b, (s.shape_b + 1) % 3).prompt for s in rel]
    partial = reward(rel_img, wrong_shape_b).mean()
    assert 0.3 < partial < 0.75  # one of two objects wrong: partial credit
    wrong_count = reward.terms(cnt_img, [scenes.CountSpec(5 - s.number, s.colour, s.shape).prompt for s in cnt])
    assert wrong_count["reward"].mean() < 0.35 and wrong_count["count"].max() < 0.2
    wrong_colour = [scenes.CountSpec(s.number, (s.colour + 1) % 6, s.shape).prompt for s in cnt]
    assert reward(cnt_img, wrong_colour).max() < 0.05
    # the relation term is graded: side by side (same column) is between right and reversed
    spec = scenes.RelationSpec(0, 0, 2, 2, 1)  # a red circle above a blue square
    side = scenes.render_objects([shapes.ShapeSpec(0, 0, 3), shapes.ShapeSpec(2, 1, 5)]).unsqueeze(0)
    rel_term = reward.terms(side, [spec.prompt])["relation"].item()
    assert 0.05 < rel_term < 0.5


def test_mean_combine_gives_graded_credit(reward, all_gt, compositional_gt):
    """combine=mean: presence x the mean of the asked terms; one wrong attribute of five keeps ~4/5."""
    graded = build_reward(RewardConfig(name="alignment", combine="mean"))
    specs, prompts, gt = all_gt
    assert graded(gt, prompts).min() > 0.9 and torch.all(graded(torch.zeros(6, 3, 32, 32), prompts[:6]) == 0)
    moved = _swap(specs, position=4)  # every attribute right but the position
    assert reward(gt, moved).mean() < 0.35 and 0.7 < graded(gt, moved).mean() < 0.85
    rel, rel_img, cnt, cnt_img = compositional_gt
    wrong = [_flip_relation(s).prompt for s in rel] + [scenes.CountSpec(5 - s.number, s.colour, s.shape).prompt for s in cnt]
    images = torch.cat([rel_img, cnt_img])
    per_object = ("colour", "shape", "size", "aspect")
    terms, score = reward.terms(images, wrong), graded(images, wrong)
    asked = [(*per_object, "relation")] * len(rel) + [(*per_object, "count")] * len(cnt)
    expected = torch.stack([terms["presence"][i] * sum(terms[k][i] for k in ks) / 5 for i, ks in enumerate(asked)])
    torch.testing.assert_close(score, expected)  # the unasked terms (reported as 1) are not averaged in
    assert 0.7 < score.mean() < 0.85 and terms["reward"].mean() < 0.25
    with pytest.raises(ValueError, match="alignment reward only"):
        RewardConfig(name="jpeg", combine="mean")


# --- the independent image-quality check (egrpo_ray/quality.py) -------------------------------------
def test_image_quality_sees_faint_noise():
    from egrpo_ray.quality import image_quality, image_quality_per_image

    g = torch.Generator().manual_seed(0)
    clean = scenes.render_scenes(scenes.prompts("heldout")[:16], g)
    q = image_quality(clean)
    assert set(q) == {"background_noise", "background_level", "background_laplacian", "high_freq_share"}
    assert q["background_noise"] == 0 and q["background_laplacian"] == 0 and q["background_level"] == 0
    faint = (clean + 0.06 * torch.rand(clean.shape, generator=g)).clamp(0, 1)  # below the reward's 0.2 ramp
    qf = image_quality(faint)
    assert qf["background_noise"] > 0.1 and qf["background_laplacian"] > 0.01 and qf["high_freq_share"] > q["high_freq_share"]
    prompts = scenes.prompts("heldout")[:16]
    assert (AlignmentReward()(faint, prompts) - AlignmentReward()(clean, prompts)).abs().mean() < 0.05  # the reward barely sees it
    per = image_quality_per_image(torch.cat([clean[:2], faint[:2]]))
    assert per["background_noise"].shape == (4,) and per["background_noise"][2:].min() > per["background_noise"][:2].max()
    with pytest.raises(ValueError):
        image_quality(torch.zeros(2, 1, 32, 32))
