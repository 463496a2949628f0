"""Secrets never leave the machine: redact them from what we save, refuse to upload them.

A Hugging Face token passed the usual way for gated models
(``--model_from_pretrained_kwargs '{"token": "hf_..."}'``) ends up, through SAELens, in
``cfg.json`` (``metadata.model_from_pretrained_kwargs``) and ``runner_cfg.json``. Every folder our
CLI and our runner integration save goes through :func:`redact` / :func:`redact_json_files`:
a string value under a key whose name says token / secret / password / auth (as a word of the
key: ``token``, ``hf_token``, ``use_auth_token``, ``api_key``; not ``training_tokens``), and any
string that looks like a Hugging Face token (``hf_`` + 30 or more letters and digits), is
replaced by :data:`REDACTED`. ``push`` refuses a folder that still holds one
(:func:`find_secrets`), or the token it is about to upload with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

REDACTED = "<redacted>"

_SECRET_WORDS = {
    "token",
    "secret",
    "secrets",
    "password",
    "passwd",
    "auth",
    "apikey",
    "api_key",
    "credential",
    "credentials",
}
#: keys whose name has a secret word but whose value is not secret (SAELens's own fields)
_NOT_SECRET = {"sequence_separator_token"}
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
#: the text files an SAE folder holds (``push`` scans these)
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml")


def is_secret_key(key: Any) -> bool:
    """True for a key whose name says it holds a secret (``token``, ``hf_token``, ``use_auth_token``, ...)."""
    if not isinstance(key, str):
        return False
    low = key.lower()
    if low in _NOT_SECRET:
        return False
    words = [w for w in re.split(r"[^a-z0-9]+", low) if w]
    joined = "_".join(words)
    return any(w in _SECRET_WORDS for w in words) or "api_key" in joined or "access_key" in joined


def _is_secret_value(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", REDACTED)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (JSON-like) with every secret replaced by :data:`REDACTED`."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and _is_secret_value(v) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _HF_TOKEN_RE.sub(REDACTED, obj)
    return obj


def secrets_in(obj: Any, where: str = "") -> list[str]:
    """The JSON paths (``metadata.model_from_pretrained_kwargs.token``) in ``obj`` that hold a secret."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{where}.{k}" if where else str(k)
            if is_secret_key(k) and _is_secret_value(v):
                found.append(path)
            else:
                found += secrets_in(v, path)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += secrets_in(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _HF_TOKEN_RE.search(obj):
        found.append(where or "(value)")
    return found


def redact_json_files(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Rewrite (atomically) every JSON file of ``folder`` that holds a secret; return those rewritten."""
    from sae_allocators.io import atomic_write_text

    folder = Path(folder)
    done: list[Path] = []
    paths = [folder / n for n in names] if names is not None else sorted(folder.glob("*.json"))
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        clean = redact(data)
        if clean != data:
            atomic_write_text(path, json.dumps(clean))
            done.append(path)
    return done


def find_secrets(folder: str | Path, token: str | None = None) -> list[str]:
    """``"FILE: where"`` for each secret in the text files of ``folder`` (the given ``token`` anywhere,
    secret-named fields, strings that look like a Hugging Face token)."""
    folder = Path(folder)
    found: list[str] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith(TEXT_SUFFIXES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if token and token in text:
            found.append(f"{path.name}: the Hugging Face token this push would use")
            continue
        if path.suffix == ".json":
            try:
                fields = secrets_in(json.loads(text))
            except json.JSONDecodeError:
                fields = []
            found += [f"{path.name}: {f}" for f in fields]
        elif _HF_TOKEN_RE.search(text):
            found.append(f"{path.name}: a Hugging Face token (hf_...)")
    return found
