"""Prompt lists from files: HPD-style train and test sets.

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped; surrounding
  whitespace is stripped.
- ``.jsonl``: one JSON object per line with a ``prompt`` (or ``caption``) string; blank lines skipped.
- ``.json``: a list of strings or of objects as in .jsonl (HPD's test files are JSON lists).

Every problem raises ``ConfigError`` with one line naming the file (and line): a missing file, an
empty list, an undecodable file, a malformed JSON line, a record without a prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

from egrpo_ray.config import ConfigError

PROMPT_FIELDS = ("prompt", "caption")


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
    return text


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt, .jsonl or .json file (see the module doc)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"prompt file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"prompt file is not a file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror})") from None
    suffix = p.suffix.lower()
    prompts: list[str] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
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
        for line in text.splitlines():
            s = line.strip()
            if s and not s.startswith("#"):
                prompts.append(s)
    else:
        raise ConfigError(f"{p}: unsupported prompt file type '{suffix}' (use .txt, .jsonl or .json)")
    if not prompts:
        raise ConfigError(f"{p}: no prompts in file")
    return prompts
