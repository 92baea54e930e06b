"""Prompts: the train/held-out split, the deterministic prompt stream, and prompt lists from files.

Files are HPD-style train and test sets:

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped; surrounding
  whitespace is stripped.
- ``.jsonl``: one JSON object per line with a ``prompt`` (or ``caption``) string; blank lines skipped.
- ``.json``: a list of strings or of objects as in .jsonl (HPD's test files are JSON lists).

Every problem raises ``ConfigError`` with one line naming the file (and line): a missing file, an
empty list, an undecodable (not UTF-8) file, control characters other than tab (a binary file, a NUL),
a malformed JSON line, a record without a prompt.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from egrpo_ray.config import ConfigError, PromptsConfig

PROMPT_FIELDS = ("prompt", "caption")
MAX_PROMPT_FILE_BYTES = 1 << 30


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls except tab
_CONTROL_IN_FILE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # ... and except newline, CR


def _control_char(text: str, pattern: re.Pattern = _CONTROL) -> int | None:
    """Index of the first control character the pattern matches, or None."""
    m = pattern.search(text)
    return m.start() if m else None


def _check_text(text: str, where: str) -> None:
    i = _control_char(text)
    if i is not None:
        raise ConfigError(f"{where}: control character {text[i]!r} in a prompt (only tab is allowed)")


def _record_prompt(record, where: str) -> str:
    if isinstance(record, str):
        text = record
    elif isinstance(record, dict):
        text = next((record[f] for f in PROMPT_FIELDS if f in record), None)
        if text is None:
            raise ConfigError(f"{where}: no 'prompt' or 'caption' field")
    else:
        raise ConfigError(f"{where}: expected an object with a 'prompt' field, got {type(record).__name__}")
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: empty prompt")
    _check_text(text, where)
    return text


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt, .jsonl or .json file (see the module doc)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"prompt file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"prompt file is not a file: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise ConfigError(f"{p}: {size} bytes is too large for a prompt file (limit {MAX_PROMPT_FILE_BYTES})")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    bad = _control_char(text, _CONTROL_IN_FILE)
    if bad is not None:
        line = text.count("\n", 0, bad) + 1
        raise ConfigError(f"{p}:{line}: control character {text[bad]!r} (a binary file? only tab is allowed in prompts)")
    suffix = p.suffix.lower()
    prompts: list[str] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{p}:{n}: malformed JSON ({err.msg})") from None
            prompts.append(_record_prompt(record, f"{p}:{n}"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{p}: expected a JSON list of prompts")
        prompts = [_record_prompt(r, f"{p}: item {i}") for i, r in enumerate(data)]
    elif suffix in (".txt", ""):
        for line in text.split("\n"):
            s = line.strip()
            if s and not s.startswith("#"):
                prompts.append(s)
    else:
        raise ConfigError(f"{p}: unsupported prompt file type '{suffix}' (use .txt, .jsonl or .json)")
    if not prompts:
        raise ConfigError(f"{p}: no prompts in file")
    return prompts


def prompt_splits(cfg: PromptsConfig) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) from the configured source.

    The tiny source: training combinations of ``tiny_train_kinds`` and held-out combinations of
    ``tiny_heldout_kinds`` (never seen in pre-training), each interleaved by kind so that a prefix of
    ``heldout_count`` keeps the mixture (tasks/scenes.py). ``train_count`` keeps a prefix of the training list."""
    if cfg.source == "tiny":
        from egrpo_ray.tasks import scenes

        train, test = scenes.prompts("train", cfg.tiny_train_kinds), scenes.prompts("heldout", cfg.tiny_heldout_kinds)
    else:
        train = load_prompt_file(cfg.train_path)
        test = load_prompt_file(cfg.test_path) if cfg.test_path else train
    return train[: cfg.train_count], test[: cfg.heldout_count]


def validation_prompts(cfg: PromptsConfig) -> list[str]:
    """Prompts for choosing hyper-parameters (learning-rate sweeps), never the held-out ones.

    The tiny source: its validation combinations of ``tiny_train_kinds``, disjoint from both the RL
    training prompts and the held-out ones (and, for relations and counts, unseen in pre-training).
    A file source: an evenly spread subset of the training file (it has no third split; the held-out
    file stays untouched). At most ``validation_count`` prompts."""
    if cfg.source == "tiny":
        from egrpo_ray.tasks import scenes

        return scenes.prompts("validation", cfg.tiny_train_kinds)[: cfg.validation_count]
    train = load_prompt_file(cfg.train_path)
    return train[:: max(1, len(train) // cfg.validation_count)][: cfg.validation_count]


def train_probe(train_prompts: Sequence[str], count: int = 24) -> list[str]:
    """``count`` images' prompts, evenly spread over the training prompts: scored before and after (ODE, fixed
    noise) they tell whether training-prompt reward went up, without per-step prompt noise. Fewer prompts than
    ``count`` are repeated (each repeat gets its own noise), so a small training set is not judged on one draw."""
    spread = list(train_prompts[:: max(1, len(train_prompts) // count)][:count])
    return [spread[i % len(spread)] for i in range(count)]


@dataclass
class PromptCursor:
    """Deterministic prompt stream: a seeded shuffle per epoch, resumable from (epoch, position)."""

    prompts: list[str]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        self._order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if not self._order:
                self._shuffle()
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out
