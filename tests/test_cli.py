import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from egrpo_ray.cli import build_parser, main
from egrpo_ray.config import DEFAULT_CONFIG, load_config
from egrpo_ray.outputs import Progress, save_comparison, save_grid

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = ["plan", "config", "reference", "train", "serve-rewards", "eval", "pretrain-tiny"]


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: egrpo-ray " + command in capsys.readouterr().out


def test_unknown_command_and_bad_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fly"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as e:
        main(["plan", "--steps", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_train_rejects_bad_config_before_starting_anything(capsys, tmp_path):
    assert main(["train", "--set", "learner.workers=0", "--output-dir", str(tmp_path)]) == 2
    assert "learner.workers" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- light --help

HEAVY = ("torch", "ray", "diffusers", "transformers", "open_clip", "numpy")


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_imports_no_heavy_module(command):
    """`egrpo-ray [command] --help` in a fresh interpreter loads none of torch, Ray, diffusers (the 4 s of
    imports the handlers need): the arguments are declared in egrpo_ray/cli.py, handlers load on use."""
    argv = ([command] if command else []) + ["--help"]
    code = ("import sys\nfrom egrpo_ray.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint(sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _set_examples() -> list[tuple[str, str]]:
    """(command, KEY=VALUE) of every `--set` help example."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    found = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if "--set" in action.option_strings:
                found += [(name, m) for m in re.findall(r"--set (\S+=\S+?)\)?(?:\s|$)", action.help)]
    return found


def test_set_help_examples_are_valid_overrides():
    examples = _set_examples()
    assert {"train", "eval", "config"} <= {name for name, _ in examples}
    for name, example in examples:
        load_config(None, [example])  # raises ConfigError on an unknown key or a bad value


def test_handlers_resolve_to_real_functions():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        handler = parser.get_default("func")
        if hasattr(handler, "handler"):  # lazy: "module:function"
            module, _, function = handler.handler.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), name


def test_embedded_default_is_configs_tiny():
    # one file: the package ships configs/tiny.yaml (a link in the source tree, a copy in a wheel)
    assert DEFAULT_CONFIG.resolve() == (ROOT / "configs" / "tiny.yaml").resolve()
    assert load_config(None) == load_config(ROOT / "configs" / "tiny.yaml")
    assert load_config(None, ["learner.iterations=3"]).learner.iterations == 3


# ------------------------------------------------------------------------ console without a terminal


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_without_a_terminal_prints_plain_lines_not_redraws(capsys):
    stream = _Pipe()
    progress = Progress(20, "eval", "images", every=5, stream=stream)
    for _ in range(10):
        progress.update(2)
    progress.write("a line of the run")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == ["eval: 6/20 images", "eval: 12/20 images", "eval: 18/20 images", "eval: 20/20 images"]
    assert capsys.readouterr().out == "a line of the run\n"
    quiet = _Pipe()
    steps = Progress(3, "E-GRPO", "step", stream=quiet)  # train: its step lines are the progress
    steps.set(1, reward="0.5")
    steps.set(3)
    assert quiet.getvalue() == ""


def test_eval_reports_progress(tmp_path, capsys):
    assert main(["eval", "--num-prompts", "3", "--batch-size", "2", "--set", "sampling.steps=2",
                 "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert [l for l in captured.err.splitlines() if l.startswith("eval:")][-1] == "eval: 3/3 images"
    assert "| base |" in captured.out


# ---------------------------------------------------------------------------------------- outputs


def test_grids_are_captioned_and_before_after_side_by_side(tmp_path):
    from PIL import Image

    images = torch.rand(5, 3, 32, 32)
    plain = Image.open(save_grid(images, tmp_path / "plain.png", columns=5))
    captioned = Image.open(save_grid(images, tmp_path / "captioned.png", columns=5,
                                     captions=[f"a prompt number {i}" for i in range(5)]))
    # tiles upscaled to MIN_TILE_WIDTH so that a caption line holds words; captions under each tile
    assert plain.size == (5 * 128 + 6 * 2, 128 + 2 * 2)
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1] + 20
    pixels = np.asarray(captioned)
    strip = pixels[2 + 128 : captioned.size[1] - 2, 2 : 2 + 128]  # the first caption
    assert (strip < 100).any() and (strip > 200).any()  # dark text on white
    with pytest.raises(ValueError, match="captions"):
        save_grid(images, tmp_path / "x.png", captions=["one"])

    before, after = torch.zeros(3, 3, 32, 32), torch.ones(3, 3, 32, 32)
    pair = np.asarray(Image.open(save_comparison(before, after, ["p0", "p1", "p2"], tmp_path / "ba.png", columns=3)))
    header = pair.shape[0] - (128 + 4 + 2 * 4) - _caption_height()
    row = pair[header + 4 + 64]  # through the middle of the first row of pairs
    # each pair: the before tile (black), a white gap, the after tile (white)
    assert (row[4 : 4 + 128] == 0).all() and (row[4 + 130 : 4 + 258] == 255).all()
    assert pair.shape[1] == 3 * 258 + 4 * 4


def _caption_height() -> int:
    from egrpo_ray.outputs import _caption_strip

    return _caption_strip("x", 100, 3).shape[1]


# ------------------------------------------------------------------------------------- LoRA export


def test_training_exports_a_diffusers_lora_at_the_end(tmp_path):
    """A LoRA run's checkpoint export, copied to <output_dir>/lora at the end of training, is what
    diffusers' FluxPipeline.load_lora_weights reads, and what `egrpo-ray eval --lora` and `--checkpoint` load
    into a tiny model with or without LoRA enabled."""
    from safetensors.torch import load_file

    from egrpo_ray.checkpoint import LORA_FILE, export_final_lora, load_export, load_lora, save_checkpoint
    from egrpo_ray.config import LoraConfig, ModelConfig
    from egrpo_ray.models import build_policy

    torch.manual_seed(0)
    policy = build_policy(ModelConfig(kind="tiny", lora=LoraConfig(enabled=True, rank=2, alpha=2.0)))
    trained = {}
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
                trained[name] = p.detach().clone()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    ckpt = save_checkpoint(tmp_path / "run", 2, policy, optimizer, {}, True, torch.float32)
    assert export_final_lora(ckpt, tmp_path / "run") == tmp_path / "run" / "lora"
    assert (tmp_path / "run" / "lora" / LORA_FILE).is_file()
    state = load_file(tmp_path / "run" / "lora" / LORA_FILE)  # diffusers' key names: "transformer.<module>..."
    exported = {k.removeprefix("transformer."): v for k, v in state.items() if "lora_B" in k}
    assert len(exported) == len(trained)
    for name, value in trained.items():  # "transformer.<module>.lora_B.default.weight" -> "<module>.lora_B.weight"
        key = name.removeprefix("transformer.").replace(".default.", ".")
        assert torch.equal(exported[key].float(), value.float())
    # into the adapter of a LoRA-enabled model (the run's config), and as a new adapter into a model without
    # one (the default config): both compute what was trained
    into_adapter = build_policy(ModelConfig(kind="tiny", lora=LoraConfig(enabled=True, rank=2, alpha=2.0)))
    load_lora(into_adapter, tmp_path / "run" / "lora")
    assert all(torch.equal(into_adapter.trainable_state()[k], v) for k, v in policy.trainable_state().items())
    new_adapter = build_policy(ModelConfig(kind="tiny"))
    load_export(new_adapter, ckpt)
    assert not new_adapter.training and not any(p.requires_grad for p in new_adapter.transformer.parameters())
    x, sigma, cond = torch.randn(2, *policy.latent_shape), torch.tensor([0.9, 0.3]), policy.encode_prompts(["a", "b"])
    for loaded in (into_adapter, new_adapter):
        torch.testing.assert_close(loaded(x, sigma, cond), policy(x, sigma, cond))
    # a full fine-tune's checkpoint has no LoRA to export
    assert export_final_lora(tmp_path / "nowhere", tmp_path / "run2") is None


def test_serve_info_lines_stay_off_the_console(tmp_path):
    """Serve's INFO lines go only where Serve logs to a file (controller, replicas); its warnings always pass."""
    import logging

    from egrpo_ray.distributed.cluster import quiet_serve_logger

    logger = logging.getLogger("ray.serve")
    saved = (list(logger.filters), list(logger.handlers), logger.level, logger.propagate)
    stream, logger.handlers, logger.propagate = io.StringIO(), [], False
    try:
        logger.setLevel(logging.INFO)  # as Serve sets it
        logger.addHandler(logging.StreamHandler(stream))
        quiet_serve_logger()
        quiet_serve_logger()  # once only
        logger.info("Started Serve in namespace")
        logger.warning("a real warning")
        assert stream.getvalue() == "a real warning\n"
        logger.addHandler(logging.FileHandler(tmp_path / "serve.log"))  # a controller's file log keeps INFO
        logger.info("Deploying new version")
        assert (tmp_path / "serve.log").read_text() == "Deploying new version\n"
    finally:
        for h in logger.handlers:
            h.close()
        logger.filters, logger.handlers, logger.propagate = saved[0], saved[1], saved[3]
        logger.setLevel(saved[2])
