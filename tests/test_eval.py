"""Evaluation (egrpo_ray/evaluate.py) with the tiny random FLUX model and real tiny rewards, the ``eval``
subcommand end to end (config, prompts file, rewards, LoRA), and prompt files (egrpo_ray/prompts.py)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

try:
    import tiny_real_models as tiny
except ImportError:  # tests/ as a package
    from tests import tiny_real_models as tiny

from egrpo_ray.checkpoint import save_lora
from egrpo_ray.config import ConfigError, LoraConfig, ModelConfig, RewardConfig
from egrpo_ray.cli import build_parser
from egrpo_ray.evaluate import evaluate
from egrpo_ray.models import build_policy
from egrpo_ray.prompts import load_prompt_file
from egrpo_ray.rewards import build_reward

torch.set_num_threads(min(2, torch.get_num_threads()))
PROMPTS = ["a photo of a cat", "a dog running on the beach", "a cup of coffee", "cute robot", "a green triangle"]


@pytest.fixture(scope="module")
def flux_policy():
    return build_policy(ModelConfig(kind="flux", path=tiny.flux_dir(), resolution=tiny.RESOLUTION, dtype="float32"))


@pytest.fixture(scope="module")
def rewards():
    path, name = tiny.hps_checkpoint()
    from egrpo_ray.rewards.hps import HPSv21Reward

    return {
        "clip": build_reward(RewardConfig(name="clip", path=tiny.clip_dir())),
        "hps": HPSv21Reward(path, model_name=name),
    }


def test_evaluate_writes_table_json_and_grid(flux_policy, rewards, tmp_path):
    res = evaluate(flux_policy, PROMPTS, rewards, steps=3, shift=3.0, seed=7, batch_size=2, output_dir=tmp_path,
                   label="FLUX tiny")
    table = (tmp_path / "eval_table.md").read_text().splitlines()
    assert table[0] == "| model | HPS | CLIP |"  # the paper's column order, whatever the dict order
    assert table[2].startswith("| FLUX tiny | ") and "±" in table[2]
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data == json.loads(json.dumps(res))
    assert data["num_prompts"] == 5 and [r["prompt"] for r in data["per_prompt"]] == PROMPTS
    for name in ("hps", "clip"):
        vals = torch.tensor([r[name] for r in data["per_prompt"]])
        assert data["rewards"][name]["mean"] == pytest.approx(float(vals.mean()), abs=1e-6)
        assert data["rewards"][name]["std"] == pytest.approx(float(vals.std(unbiased=False)), abs=1e-6)
    from PIL import Image

    grid = Image.open(tmp_path / "eval_grid.png")
    assert grid.width >= 5 * tiny.RESOLUTION and grid.height >= tiny.RESOLUTION

    # deterministic and independent of the batch size (noise per prompt)
    res2 = evaluate(flux_policy, PROMPTS[:3], rewards, steps=3, shift=3.0, seed=7, batch_size=3,
                    output_dir=tmp_path / "b3")
    for a, b in zip(res["per_prompt"][:3], res2["per_prompt"]):
        # batch composition changes float32 summation order in the reward models: agreement to 1e-4
        assert a["hps"] == pytest.approx(b["hps"], abs=1e-4) and a["clip"] == pytest.approx(b["clip"], abs=1e-4)


def _write_config(tmp_path, **model_extra):
    (tmp_path / "train.txt").write_text("# HPD-style list\na photo of a cat\n\na cup of coffee\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    cfg = {
        "seed": 3,
        "model": {"kind": "flux", "path": tiny.flux_dir(), "dtype": "float32", "resolution": tiny.RESOLUTION,
                  **model_extra},
        "sampling": {"steps": 2, "shift": 3.0},
        "algorithm": {"window_size": 2},
        "rewards": [{"name": "clip", "path": tiny.clip_dir()}],
        "prompts": {"source": "file", "train_path": str(tmp_path / "train.txt"),
                    "test_path": str(tmp_path / "test.jsonl")},
        "logging": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _with_model_name(init, model_name):
    def patched(self, *args, **kwargs):
        kwargs["model_name"] = model_name
        init(self, *args, **kwargs)

    return patched


def _cli(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_eval_subcommand_with_lora(tmp_path, capsys, monkeypatch):
    cfg_path = _write_config(tmp_path)
    hps_path, hps_name = tiny.hps_checkpoint()
    tiny.register_tiny_open_clip()
    # base model, the config's rewards, the default output dir
    assert _cli(["eval", "--config", str(cfg_path), "--num-prompts", "3", "--batch-size", "2"]) == 0
    out = tmp_path / "run" / "eval"
    assert (out / "eval_table.md").exists() and (out / "eval_grid.png").exists()
    assert json.loads((out / "eval.json").read_text())["num_prompts"] == 3
    assert "| base |" in capsys.readouterr().out

    # a LoRA trained elsewhere, scored with another reward given by path
    lora_cfg = ModelConfig(kind="flux", path=tiny.flux_dir(), resolution=tiny.RESOLUTION, dtype="float32",
                           lora=LoraConfig(enabled=True, rank=2, alpha=2.0))
    pol = build_policy(lora_cfg)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_lora(pol, tmp_path / "lora")
    from egrpo_ray.rewards.hps import HPSv21Reward

    # the HPS reward builds ViT-H-14; point it at the tiny registered architecture for this run
    monkeypatch.setattr(HPSv21Reward, "__init__", _with_model_name(HPSv21Reward.__init__, hps_name))
    rc = _cli(["eval", "--config", str(cfg_path), "--lora", str(tmp_path / "lora"), "--rewards", "clip,hps",
               "--reward-path", f"hps={hps_path}", "--num-prompts", "2", "--output-dir", str(tmp_path / "ev"),
               "--set", "sampling.steps=3"])
    assert rc == 0
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert data["label"] == "lora:lora" and set(data["rewards"]) == {"clip", "hps"} and data["steps"] == 3

    # trainable-state checkpoint directory
    pol.save_trainable(tmp_path / "ckpt")
    (tmp_path / "l").mkdir()
    lora_yaml = _write_config(tmp_path / "l", lora={"enabled": True, "rank": 2, "alpha": 2.0})
    assert _cli(["eval", "--config", str(lora_yaml), "--checkpoint", str(tmp_path / "ckpt"), "--num-prompts", "1",
                 "--output-dir", str(tmp_path / "ev2")]) == 0

    with pytest.raises(ConfigError, match="unknown reward"):
        _cli(["eval", "--config", str(cfg_path), "--rewards", "nope"])
    with pytest.raises(ConfigError, match="reward pickscore"):
        _cli(["eval", "--config", str(cfg_path), "--rewards", "pickscore"])  # no path configured


# ------------------------------------------------------------------------------------- prompt files


def test_prompt_files(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\n  first prompt  \n\nsecond\n#skip\n")
    assert load_prompt_file(tmp_path / "a.txt") == ["first prompt", "second"]
    (tmp_path / "b.jsonl").write_text('{"prompt": "p1"}\n\n{"caption": "c2", "id": 2}\n')
    assert load_prompt_file(tmp_path / "b.jsonl") == ["p1", "c2"]
    (tmp_path / "c.json").write_text('["x", {"prompt": "y"}]')
    assert load_prompt_file(tmp_path / "c.json") == ["x", "y"]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("missing.txt", None, "prompt file not found: .*missing.txt"),
        ("empty.txt", "# only comments\n\n", "empty.txt: no prompts in file"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad.jsonl:2: malformed JSON"),
        ("nofield.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', r"nofield.jsonl:2: no 'prompt' or 'caption' field"),
        ("type.jsonl", '{"prompt": 3}\n', r"type.jsonl:1: the prompt must be a string"),
        ("list.json", '{"prompt": "x"}', "expected a JSON list"),
        ("x.csv", "a,b\n", "unsupported prompt file type"),
    ],
)
def test_prompt_file_errors(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_prompt_file(tmp_path / name)
    assert "\n" not in str(info.value)


def test_eval_and_training_heldout_give_the_same_number(tmp_path):
    """One scoring function: the `eval` command's evaluate() and the training loops' held-out reward agree
    exactly for the same weights; draws average independent noises (draw k = seed + k * DRAW_STRIDE)."""
    from egrpo_ray.config import load_config
    from egrpo_ray.evaluate import DRAW_STRIDE, HELDOUT_BATCH, eval_prompts, heldout_reward, score_heldout
    from egrpo_ray.prompts import prompt_splits
    from egrpo_ray.training import make_reward_fn

    cfg = load_config(None, ["prompts.heldout_count=10", "sampling.steps=6"])
    policy = build_policy(cfg.model)
    _, heldout = prompt_splits(cfg.prompts)
    assert eval_prompts(cfg) == heldout  # the eval command scores training's held-out prompts
    rewards = {r.name: build_reward(r) for r in cfg.rewards}
    reward_fn = make_reward_fn(rewards)
    value, images = heldout_reward(policy, heldout, reward_fn, cfg, cfg.seed)
    res = evaluate(policy, heldout, rewards, cfg.sampling.steps, cfg.sampling.shift, cfg.seed, HELDOUT_BATCH, tmp_path)
    assert res["rewards"]["alignment"]["mean"] == value and len(images) == len(heldout)
    from egrpo_ray.quality import image_quality

    assert res["quality"] == pytest.approx(image_quality(images), rel=1e-6)  # logged beside the reward
    assert set(res["quality"]) >= {"background_noise", "high_freq_share"}
    two = score_heldout(policy, heldout, reward_fn, cfg.sampling.steps, cfg.sampling.shift, cfg.seed, draws=2)
    other = score_heldout(policy, heldout, reward_fn, cfg.sampling.steps, cfg.sampling.shift, cfg.seed + DRAW_STRIDE)
    first = torch.tensor([p["alignment"] for p in res["per_prompt"]])
    assert torch.allclose(two.per_prompt["alignment"], (first + other.per_prompt["alignment"]) / 2, atol=1e-6)
    assert not torch.equal(other.per_prompt["alignment"], first)  # a different noise
    assert evaluate(policy, heldout, rewards, cfg.sampling.steps, cfg.sampling.shift, cfg.seed, HELDOUT_BATCH,
                    tmp_path, draws=2)["rewards"]["alignment"]["mean"] == pytest.approx(float(two.per_prompt["alignment"].mean()))
