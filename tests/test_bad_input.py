"""Bad input through the CLI: one line naming the problem, exit 2, before the cluster starts, and the
output directory neither created nor modified.

Every case runs ``egrpo_ray.cli.main`` in-process from inside a fresh temporary directory (so a
relative default output directory would show up too). Nothing here starts Ray: each case must fail in
the driver's checks (egrpo_ray/preflight.py): starting the cluster (``init_ray``) fails the test.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from egrpo_ray.cli import main
from egrpo_ray.models import tiny

OUT = "out"  # every command that writes is pointed at <tmp>/out


class _Payload:
    """Unpickling this creates the marker file: a checkpoint that must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------- fixtures


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def tiny_copy(t: Path, name: str = "model") -> Path:
    d = t / name
    d.mkdir()
    for f in (tiny.WEIGHTS_FILE, tiny.MANIFEST_FILE):
        shutil.copy(tiny.ASSET_DIR / f, d / f)
    return d


def set_manifest(d: Path, **changes) -> None:
    m = json.loads((d / tiny.MANIFEST_FILE).read_text())
    m.update(changes)
    for k, v in list(m.items()):
        if v is None:
            del m[k]
    (d / tiny.MANIFEST_FILE).write_text(json.dumps(m))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def run_dir(t: Path, step: int = 3, meta: dict | str | bytes | None = None, state: bool = True) -> Path:
    """<t>/out/checkpoints/step_<N> with meta.json (valid by default) and DCP-looking state files."""
    ckpt = t / OUT / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    meta = {"step": step, "policy_version": step, "prompt_batches_by_worker": {"0": 2}} if meta is None else meta
    write(ckpt / "meta.json", meta if isinstance(meta, (str, bytes)) else json.dumps(meta))
    if state:
        write(ckpt / "state" / ".metadata", b"\x80\x04dcp")
        write(ckpt / "state" / "__0_0.distcp", b"\x00" * 64)
    write(t / OUT / "metrics.jsonl", '{"step": 1}\n')
    return ckpt


def trained_with(*sets: str) -> dict:
    """A checkpoint's meta.json whose run had these settings (over the default config)."""
    from egrpo_ray.config import load_config

    return {"step": 3, "policy_version": 3, "config": load_config(None, list(sets)).model_dump(mode="json")}


def file_prompts(t: Path, train: str | bytes | None = "a red circle\n", test: str | bytes | None = None,
                 train_name: str = "train.txt", test_name: str = "test.txt") -> list[str]:
    sets = ["prompts.source=file", f"prompts.train_path={t / train_name}"]
    if train is not None:
        write(t / train_name, train)
    if test is not None:
        write(t / test_name, test)
        sets.append(f"prompts.test_path={t / test_name}")
    return sets


def with_sets(cmd: list[str], sets: list[str]) -> list[str]:
    for s in sets:
        cmd += ["--set", s]
    return cmd


def train(t: Path, *sets: str, resume: bool = False, out: Path | None = None) -> list[str]:
    return with_sets(["train", "--output-dir", str(out or t / OUT)] + (["--resume"] if resume else []), list(sets))


def evaluate(t: Path, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["eval", "--output-dir", str(t / OUT)] if "--output-dir" not in extra else ["eval"]
    return with_sets(args + list(extra), list(sets))


def reference(t: Path, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    return with_sets(["reference", "--output-dir", str(t / OUT), *extra], list(sets))


def config(t: Path, text: str | bytes | None = None, *sets: str, command: str = "config") -> list[str]:
    args = [command]
    if text is not None:
        args += ["--config", str(write(t / "cfg.yaml", text))]
    return with_sets(args, list(sets))


def hps(path: Path | str | None) -> str:
    return f"rewards=[{{name: hps, path: {path}}}]" if path is not None else "rewards=[{name: hps}]"


def evil_pt(t: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "x": _Payload(str(t / "PAYLOAD_RAN"))}, t / "state.pt")
    return t / "state.pt"


def lora_ckpt(t: Path) -> Path:
    from safetensors.torch import save_file

    d = t / "ckpt" / "lora"
    d.mkdir(parents=True)
    save_file({"transformer.a.lora_A.weight": torch.zeros(64, 64)}, str(d / "pytorch_lora_weights.safetensors"))
    truncate(d / "pytorch_lora_weights.safetensors", 1000)
    return t / "ckpt"


def tiny_lora(t: Path) -> Path:
    """A rank-4 LoRA of the tiny model, as training exports it."""
    from egrpo_ray.checkpoint import save_lora
    from egrpo_ray.config import LoraConfig, ModelConfig
    from egrpo_ray.models import build_policy

    save_lora(build_policy(ModelConfig(kind="tiny", lora=LoraConfig(enabled=True, rank=4))), t / "lora")
    return t / "lora"


def tiny_export(t: Path) -> Path:
    """A checkpoint directory with a full fine-tune's export of the tiny model."""
    from egrpo_ray.checkpoint import export_weights
    from egrpo_ray.config import ModelConfig
    from egrpo_ray.models import build_policy

    export_weights(build_policy(ModelConfig(kind="tiny")), t / "ckpt", lora=False, dtype=torch.float32)
    return t / "ckpt"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

# (id, builder(tmp) -> argv, expected text in the one error line)
CASES = [
    # --- config files and values (config / plan)
    ("config-binary", lambda t: config(t, b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"), "not a UTF-8 text file"),
    ("config-control-char", lambda t: config(t, "seed: 1\x07\n"), "invalid YAML: special characters are not allowed"),
    ("config-nul-byte", lambda t: config(t, "seed: 1\x00\n"), "NUL byte"),
    ("config-is-a-list", lambda t: config(t, "- seed\n- 1\n"), "the top level must be a mapping"),
    ("config-is-a-scalar", lambda t: config(t, "just text\n"), "the top level must be a mapping"),
    ("config-is-a-directory", lambda t: ["config", "--config", str(t)], "config file is not a file"),
    ("config-missing", lambda t: ["config", "--config", str(t / "nope.yaml")], "config file not found"),
    ("config-too-large", lambda t: config(t, "# " + "x" * (1 << 20) + "\n"), "too large for a config file"),
    ("config-anchor-bomb", lambda t: config(t, BOMB), "YAML aliases"),
    ("config-duplicate-key", lambda t: config(t, "seed: 1\nseed: 2\n"), "duplicate key 'seed'"),
    ("config-python-tag", lambda t: config(t, "seed: !!python/object/apply:os.getcwd []\n"), "invalid YAML (line 1)"),
    ("config-bad-yaml", lambda t: config(t, "model: {kind: tiny\n"), "invalid YAML"),
    ("iterations-true", lambda t: config(t, None, "learner.iterations=true"), "learner.iterations: Input should be a valid integer, not a boolean"),
    ("lr-false", lambda t: config(t, None, "learner.lr=false"), "learner.lr: Input should be a valid number, not a boolean"),
    ("bool-given-int", lambda t: config(t, None, "model.lora.enabled=1"), "model.lora.enabled: Input should be true or false"),
    ("weight-nan", lambda t: config(t, "rewards: [{name: alignment, weight: .nan}]\n"), "rewards.0.weight: Input should be a finite number"),
    ("timeout-inf", lambda t: config(t, None, "cluster.startup_timeout_s=.inf"), "cluster.startup_timeout_s: Input should be a finite number"),
    ("seed-huge", lambda t: config(t, None, f"seed={2**70}"), "seed: Input should be less than or equal to"),
    ("output-dir-empty", lambda t: config(t, None, "logging.output_dir="), "logging.output_dir: String should have at least 1 character"),
    ("path-with-nul", lambda t: config(t, 'model: {path: "a\\0b"}\n'), "model.path: control character"),
    ("duplicate-rewards", lambda t: config(t, "rewards: [{name: alignment}, {name: alignment}]\n"), "rewards lists 'alignment' twice"),
    ("resources-cpu-key", lambda t: config(t, None, "rollout.resources={CPU: 1}"), "rollout.resources: 'CPU' is not a custom resource"),
    ("resources-negative", lambda t: config(t, None, "learner.resources={gpu_node: -1}"), "must be >= 0"),
    ("reward-device", lambda t: config(t, "rewards: [{name: alignment, device: gpu0}]\n"), "rewards.0.device: String should match pattern"),
    ("lora-no-targets", lambda t: config(t, None, "model.lora.target_modules=[]"), "model.lora.target_modules: List should have at least 1 item"),
    ("plan-binary-config", lambda t: config(t, b"\xff\xfe\x00\x01", command="plan"), "not a UTF-8 text file"),
    ("plan-memory-list-config", lambda t: config(t, "[1, 2]\n", command="plan") + ["--memory"], "the top level must be a mapping"),
    ("plan-group-size", lambda t: ["plan", "--group-size", "0"], "--group-size must be >= 1"),
    # --- prompt files (train)
    ("prompts-missing", lambda t: train(t, *file_prompts(t, train=None)), "prompt file not found"),
    ("prompts-empty", lambda t: train(t, *file_prompts(t, train="")), "no prompts in file"),
    ("prompts-only-comments", lambda t: train(t, *file_prompts(t, train="# header\n\n   \n")), "no prompts in file"),
    ("prompts-not-utf8", lambda t: train(t, *file_prompts(t, train=b"a red circle\n\xff\xfe latin-1 \xe9\n")), "not UTF-8 text (byte 13)"),
    ("prompts-control-bytes", lambda t: train(t, *file_prompts(t, train=b"a red circle\nblue\x1b[31m square\n")), "train.txt:2: control character '\\x1b'"),
    ("prompts-nul-in-json", lambda t: train(t, *file_prompts(t, train='["ok", "bad\\u0000"]', train_name="p.json")), "item 1: control character '\\x00'"),
    ("prompts-test-malformed-jsonl", lambda t: train(t, *file_prompts(t, test='{"prompt": "a"}\n{"prompt": \n', test_name="t.jsonl")), "t.jsonl:2: malformed JSON"),
    ("prompts-is-directory", lambda t: train(t, "prompts.source=file", f"prompts.train_path={t}"), "prompt file is not a file"),
    ("prompts-bad-suffix", lambda t: train(t, *file_prompts(t, train_name="p.csv")), "unsupported prompt file type '.csv'"),
    # --- model files (train)
    ("model-dir-missing", lambda t: train(t, f"model.path={t / 'nope'}"), "tiny model directory not found"),
    ("model-weights-missing", lambda t: (os.remove(tiny_copy(t) / tiny.WEIGHTS_FILE), train(t, f"model.path={t / 'model'}"))[1], "tiny model files missing"),
    ("model-truncated-sha", lambda t: (truncate(tiny_copy(t) / tiny.WEIGHTS_FILE, 4096), train(t, f"model.path={t / 'model'}"))[1], "does not match the manifest"),
    ("model-truncated-header", lambda t: (truncate(tiny_copy(t) / tiny.WEIGHTS_FILE, 4096),
                                          set_manifest(t / "model", sha256=tiny.file_sha256(t / "model" / tiny.WEIGHTS_FILE)),
                                          train(t, f"model.path={t / 'model'}"))[2], "truncated safetensors file"),
    ("model-not-safetensors", lambda t: (write(tiny_copy(t) / tiny.WEIGHTS_FILE, b"PK\x03\x04 not safetensors at all"),
                                         set_manifest(t / "model", sha256=tiny.file_sha256(t / "model" / tiny.WEIGHTS_FILE)),
                                         train(t, f"model.path={t / 'model'}"))[2], "corrupt or truncated safetensors file"),
    ("manifest-corrupt", lambda t: (write(tiny_copy(t) / tiny.MANIFEST_FILE, '{"sha256": '), train(t, f"model.path={t / 'model'}"))[1], "not a valid JSON manifest"),
    ("manifest-no-model-config", lambda t: (set_manifest(tiny_copy(t), model_config=None), train(t, f"model.path={t / 'model'}"))[1], "no valid 'model_config'"),
    ("model-resolution", lambda t: train(t, "model.resolution=64"), "the tiny model generates 32x32 images, not 64"),
    ("flux-path-missing", lambda t: train(t, "model.kind=flux", f"model.path={t / 'FLUX.1-dev'}"), "no such directory"),
    ("flux-not-diffusers", lambda t: (write(t / "flux" / "model_index.json", "{}"), train(t, "model.kind=flux", f"model.path={t / 'flux'}"))[1], "not a diffusers model directory"),
    ("sd3-transformer-config-corrupt", lambda t: (write(t / "sd3" / "transformer" / "config.json", "{"), train(t, "model.kind=sd3", f"model.path={t / 'sd3'}"))[1], "transformer/config.json is unreadable"),
    # --- reward checkpoints (train)
    ("hps-no-path", lambda t: train(t, hps(None)), "reward hps (rewards.0.path): needs a path"),
    ("hps-path-missing", lambda t: train(t, hps(t / "HPS_v2.1_compressed.pt")), "not found"),
    ("hps-path-is-dir", lambda t: train(t, hps(t)), "is not a file"),
    ("hps-pickle-payload", lambda t: train(t, hps(evil_pt(t))), "not a weights-only checkpoint (its pickle references io.open)"),
    ("hps-raw-pickle", lambda t: train(t, hps(write(t / "raw.pt", pickle.dumps({"w": [1.0]})))), "not a torch.save checkpoint"),
    ("hps-truncated-pt", lambda t: (torch.save({"w": torch.zeros(512)}, t / "h.pt"), truncate(t / "h.pt", 300), train(t, hps(t / "h.pt")))[2], "h.pt: corrupt or truncated torch checkpoint"),
    ("hps-empty-safetensors", lambda t: train(t, hps(write(t / "h.safetensors", b""))), "is empty"),
    ("clip-path-is-file", lambda t: train(t, f"rewards=[{{name: clip, path: {write(t / 'clip.bin', b'x')}}}]"), "is not a directory"),
    ("pickscore-no-config", lambda t: (os.mkdir(t / "ps"), train(t, f"rewards=[{{name: pickscore, path: {t / 'ps'}}}]"))[1], "has no config.json"),
    # --- resume checkpoints and the output directory (train)
    ("resume-no-checkpoint", lambda t: train(t, resume=True), "--resume: no checkpoint under"),
    ("resume-meta-not-json", lambda t: (run_dir(t, meta="{step: 3"), train(t, resume=True))[1], "meta.json: not valid JSON"),
    ("resume-meta-binary", lambda t: (run_dir(t, meta=b"\xff\x00\x01"), train(t, resume=True))[1], "meta.json: not UTF-8"),
    ("resume-meta-list", lambda t: (run_dir(t, meta="[3]"), train(t, resume=True))[1], "meta.json: expected a JSON object, got list"),
    ("resume-meta-no-version", lambda t: (run_dir(t, meta={"step": 3}), train(t, resume=True))[1], "no 'policy_version'"),
    ("resume-meta-step-string", lambda t: (run_dir(t, meta={"step": "3", "policy_version": 3}), train(t, resume=True))[1], "'step' must be a non-negative integer"),
    ("resume-meta-step-mismatch", lambda t: (run_dir(t, meta={"step": 7, "policy_version": 7}), train(t, resume=True))[1], "'step' is 7 but the directory is step_000003"),
    ("resume-meta-bad-cursor", lambda t: (run_dir(t, meta={"step": 3, "policy_version": 3, "prompt_batches_by_worker": [1]}), train(t, resume=True))[1], "'prompt_batches_by_worker' must map"),
    ("resume-no-state", lambda t: (run_dir(t, state=False), train(t, resume=True))[1], "state: missing"),
    ("resume-empty-metadata", lambda t: (write(run_dir(t) / "state" / ".metadata", b""), train(t, resume=True))[1], ".metadata: missing or empty"),
    ("resume-changed-algorithm", lambda t: (run_dir(t, meta=trained_with("algorithm.clip_range=0.5")), train(t, resume=True))[1], "the config changes what the checkpoint was trained with: algorithm.clip_range (0.5 -> "),
    ("resume-past-iterations", lambda t: (run_dir(t, step=50), train(t, resume=True))[1], "not below learner.iterations = 40"),
    ("fresh-run-over-checkpoints", lambda t: (run_dir(t), train(t))[1], "already holds checkpoints"),
    ("output-dir-under-file", lambda t: train(t, out=write(t / "f", "x") / "run"), "cannot be created: " ),
    ("output-dir-is-file", lambda t: train(t, out=write(t / OUT, "x")), "exists and is not a directory"),
    ("output-dir-under-proc", lambda t: train(t, out=Path("/proc/egrpo_ray_test/run")), "/proc/egrpo_ray_test/run cannot be created or written"),
    # --- eval
    ("eval-truncated-lora", lambda t: evaluate(t, "--checkpoint", str(lora_ckpt(t))), "lora/pytorch_lora_weights.safetensors: truncated safetensors file"),
    ("eval-not-a-checkpoint", lambda t: (os.mkdir(t / "ck"), evaluate(t, "--checkpoint", str(t / "ck")))[1], "not a checkpoint"),
    ("eval-run-without-checkpoints", lambda t: (os.makedirs(t / "run" / "checkpoints"), evaluate(t, "--checkpoint", str(t / "run")))[1], "no checkpoint in"),
    ("eval-checkpoint-missing", lambda t: evaluate(t, "--checkpoint", str(t / "nope")), "not found"),
    ("eval-lora-dir-without-lora", lambda t: (os.mkdir(t / "l"), evaluate(t, "--lora", str(t / "l")))[1], "no pytorch_lora_weights.safetensors"),
    ("eval-lora-of-another-rank", lambda t: evaluate(t, "--lora", str(tiny_lora(t)), sets=("model.lora.enabled=true", "model.lora.rank=2")), "size mismatch for transformer_blocks.0.attn.to_q.lora_A.default.weight"),
    ("eval-lora-of-other-modules", lambda t: evaluate(t, "--lora", str(tiny_lora(t)), sets=("model.lora.enabled=true", "model.lora.rank=4", "model.lora.target_modules=[to_q]")), "LoRA keys not in this model, e.g. 'transformer_blocks.0.attn.to_k.lora_A.weight'"),
    ("eval-full-export-into-lora", lambda t: evaluate(t, "--checkpoint", str(tiny_export(t)), sets=("model.lora.enabled=true",)), "a full fine-tune's export: load it with model.lora.enabled=false"),
    ("eval-truncated-lora-dir", lambda t: evaluate(t, "--lora", str(lora_ckpt(t) / "lora")), "truncated safetensors file"),
    ("eval-device", lambda t: evaluate(t, "--device", "gpu0"), "--device 'gpu0': not a torch device"),
    ("eval-output-under-file", lambda t: ["eval", "--output-dir", str(write(t / "f", "x") / "eval")], "--output-dir"),
    ("eval-test-prompts-not-utf8", lambda t: evaluate(t, sets=tuple(file_prompts(t, test=b"\xc3\x28\n"))), "not UTF-8 text (byte 0)"),
    ("eval-reward-path-missing", lambda t: evaluate(t, "--rewards", "hps", "--reward-path", f"hps={t / 'hps.pt'}"), "hps.pt not found"),
    ("eval-reward-pickle-payload", lambda t: evaluate(t, "--rewards", "hps", "--reward-path", f"hps={evil_pt(t)}"), "not a weights-only checkpoint"),
    ("eval-unknown-reward", lambda t: evaluate(t, "--rewards", "aesthetic"), "unknown reward 'aesthetic'"),
    ("eval-corrupt-model", lambda t: (write(tiny_copy(t) / tiny.MANIFEST_FILE, "[]"), evaluate(t, sets=(f"model.path={t / 'model'}",)))[1], "not a valid manifest"),
    ("eval-num-prompts", lambda t: evaluate(t, "--num-prompts", "0"), "--num-prompts must be >= 1"),
    ("eval-config-binary", lambda t: config(t, b"\x00\x01\x02\xff", command="eval"), "not a UTF-8 text file"),
    # --- reference
    ("reference-prompts-missing", lambda t: reference(t, *file_prompts(t, train=None)), "prompt file not found"),
    ("reference-output-under-file", lambda t: ["reference", "--output-dir", str(write(t / "f", "x") / "ref")], "cannot be created"),
    ("reference-model-truncated", lambda t: (truncate(tiny_copy(t) / tiny.WEIGHTS_FILE, 100), reference(t, f"model.path={t / 'model'}"))[1], "does not match the manifest"),
    ("reference-iterations", lambda t: reference(t, extra=("--iterations", "0")), "--iterations must be >= 1"),
    ("reference-reward-pickle-payload", lambda t: reference(t, hps(evil_pt(t))), "not a weights-only checkpoint"),
    ("reference-iterations-true", lambda t: reference(t, "learner.iterations=true"), "not a boolean"),
    # --- serve-rewards (a reward checkpoint is checked before the cluster starts)
    ("serve-rewards-hps-missing", lambda t: with_sets(["serve-rewards"], [hps(t / "hps.pt")]), "hps.pt not found"),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file's size and mtime, and every directory (a directory's own mtime changes when the
    writability probe creates and removes its temporary file, so only its existence counts)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, monkeypatch, capsys, build, expected):
    import egrpo_ray.distributed.cluster as cluster

    started = []
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: started.append(a) or False)
    t = tmp_path / "case"
    t.mkdir()
    argv = build(t)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(t)  # a relative default output directory would appear in the snapshot
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("egrpo-ray: error: "), err
    assert expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing created, written or removed
    assert not started  # the cluster was never started
    assert not (t / "PAYLOAD_RAN").exists()  # no checkpoint was unpickled
    assert not list(Path("/proc").glob("egrpo_ray_test*"))


def test_table_size():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1](Path("/nonexistent"))[0] for c in CASES if c[0].startswith(("config-", "plan-", "eval-device"))}
    assert {"config", "plan", "eval"} <= commands


def test_good_inputs_pass_preflight(tmp_path):
    """The checks refuse bad input only: a valid resume point, prompt files with tabs, CRLF and a BOM,
    the shipped model and a weights-only reward checkpoint all pass, and nothing is written."""
    from egrpo_ray.config import load_config
    from egrpo_ray.preflight import preflight

    write(tmp_path / "p.txt", "\ufeffa red circle\r\n# comment\r\nblue\tsquare\r\n")
    torch.save({"w": torch.zeros(2)}, tmp_path / "hps.pt")
    ckpt = run_dir(tmp_path)
    cfg = load_config(None, ["prompts.source=file", f"prompts.train_path={tmp_path / 'p.txt'}",
                             f"rewards=[{{name: alignment}}, {{name: hps, path: {tmp_path / 'hps.pt'}}}]"])
    before = _snapshot(tmp_path)
    checkpoint, meta = preflight(cfg, tmp_path / OUT, resume=True)
    assert checkpoint == ckpt and meta["step"] == 3 and meta["prompt_batches_by_worker"] == {"0": 2}
    assert preflight(cfg, tmp_path / "fresh" / "run", resume=False) == (None, {})
    assert _snapshot(tmp_path) == before and not (tmp_path / "fresh").exists()
    from egrpo_ray.prompts import load_prompt_file

    assert load_prompt_file(tmp_path / "p.txt") == ["a red circle", "blue\tsquare"]
