"""``sae-allocators load org/name SAE_ID`` (or a local output folder): load an SAE and say what it is.

Loads with SAELens's own ``SAE.from_pretrained`` (or ``SAE.load_from_disk`` for a folder) after
checking the files, and reports the architecture, the training architecture, tensor shapes and
whether plain SAELens -- without this project -- could load it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_allocators import devices
from sae_allocators.sae_folder import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    SaeFolderError,
    SaeFolderInfo,
    check_loadable,
)
from sae_allocators.names import DISTRIBUTION

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HELP = "load an SAE from the Hub (or the local cache, or a folder) and describe it"


@dataclass
class Loaded:
    sae: Any
    info: SaeFolderInfo
    source: str
    provider: str
    plain_saelens: bool

    def describe(self) -> str:
        sae, info = self.sae, self.info
        lines = [
            f"Loaded {self.source}",
            f"  architecture:          {info.architecture} ({type(sae).__module__}.{type(sae).__name__}, provided by {self.provider})",
            f"  training architecture: {info.training_architecture or '(not recorded)'}",
            f"  d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae} dtype={sae.dtype} device={sae.device}",
            f"  hook: {info.metadata.get('hook_name', '(not recorded)')}   model: {info.metadata.get('model_name', '(not recorded)')}",
            "  tensors:",
        ]
        for name, t in sae.state_dict().items():
            lines.append(f"    {name:<12} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        if self.plain_saelens:
            lines.append(
                f"  plain SAELens can load it: yes ({info.architecture!r} is a SAELens architecture; {DISTRIBUTION} is not needed)"
            )
        else:
            lines.append(
                f"  plain SAELens can load it: no (needs `pip install {DISTRIBUTION}` for {info.architecture!r})"
            )
        return "\n".join(lines)


def _provider(arch: str) -> tuple[str, bool]:
    from sae_allocators import host

    prov = host.providers().get(arch)
    if prov is None:
        return "(unknown)", False
    return f"{prov.distribution} {prov.version}".strip(), prov.is_saelens


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _cached_folder(repo_id: str, sae_id: str) -> Path:
    """Download (or, offline, find in the cache) the SAE's files; return their folder."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    where = f"{repo_id!r} (sae id {sae_id!r})"
    try:
        cfg_path = Path(hf_hub_download(repo_id, f"{sae_id}/{CFG_FILENAME}"))
        hf_hub_download(repo_id, f"{sae_id}/{WEIGHTS_FILENAME}")
    except LocalEntryNotFoundError:
        if offline:
            raise SaeFolderError(
                f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: unset HF_HUB_OFFLINE (with network access) to download it, or check the repo id and "
                f"sae id (`hf cache ls` lists what is cached)."
            ) from None
        raise SaeFolderError(
            f"{where} could not be downloaded from {constants.ENDPOINT} and is not cached: check the network connection "
            f"(and HF_ENDPOINT)."
        ) from None
    except RepositoryNotFoundError:
        raise SaeFolderError(
            f"Hub repo {repo_id!r} not found (or private without a token): check the name, or set HF_TOKEN."
        ) from None
    except EntryNotFoundError:
        raise SaeFolderError(
            f"{repo_id!r} has no {sae_id}/{CFG_FILENAME} or {sae_id}/{WEIGHTS_FILENAME}: "
            "check the sae id (the folder name inside the repo)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - connection errors (httpx / requests), refused requests, ...
        raise SaeFolderError(
            f"{where} could not be downloaded from {constants.ENDPOINT}: {type(exc).__name__}: {_first_line(exc)}. "
            f"Check the network connection, HF_ENDPOINT and HF_TOKEN."
        ) from None
    try:  # optional, as in SAELens
        hf_hub_download(repo_id, f"{sae_id}/{SPARSITY_FILENAME}")
    except Exception:  # noqa: BLE001 - absent sparsity is normal
        pass
    return cfg_path.parent


def _saelens_load(fn: Any, what: str) -> Any:
    """Run SAELens's loader; anything it still refuses becomes one SaeFolderError line."""
    try:
        return fn()
    except SaeFolderError:
        raise
    except Exception as exc:  # noqa: BLE001 - the checks above should have caught it; never a traceback
        raise SaeFolderError(f"SAELens could not load {what}: {type(exc).__name__}: {_first_line(exc)}") from None


def load(source: str, sae_id: str | None = None, *, device: str = devices.CPU) -> Loaded:
    """Load an SAE from a Hub repo (``source`` = ``org/name`` and ``sae_id``) or from a local folder."""
    from sae_allocators import host

    host.load()
    from sae_lens import SAE

    if sae_id is None:
        folder = Path(source)
        if not folder.exists() and not folder.is_symlink():
            hub = ""
            if _REPO_RE.match(source):
                hub = f" If {source!r} is a Hub repo id, give the SAE id too: `sae-allocators load {source} SAE_ID`."
            raise SaeFolderError(
                f"{source}: no such local folder ({folder.resolve()} does not exist); give the --output_path of "
                f"`sae-allocators train`.{hub}"
            )
        info = check_loadable(folder)
        sae = _saelens_load(lambda: SAE.load_from_disk(str(folder), device=device), str(folder))
        label = str(folder)
    else:
        if not _REPO_RE.match(source):
            local = (
                " (and no local folder has that name)"
                if not Path(source).exists()
                else " (a local folder is loaded without an SAE id)"
            )
            raise SaeFolderError(
                f"{source!r} is not a Hub repo id{local}; use the form 'org/name' with an SAE id, or a local folder alone."
            )
        folder = _cached_folder(source, sae_id)
        info = check_loadable(folder)
        sae = _saelens_load(lambda: SAE.from_pretrained(source, sae_id, device=device), f"{source} / {sae_id}")
        label = f"{source} / {sae_id}"
    provider, plain = _provider(info.architecture)
    return Loaded(sae=sae, info=info, source=label, provider=provider, plain_saelens=plain)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hub repo id (org/name) or a local SAE output folder")
    p.add_argument("sae_id", nargs="?", default=None, help="SAE id inside the repo (omit for a local folder)")
    p.add_argument("--device", default=devices.CPU)


def cmd_load(args: argparse.Namespace) -> int:
    try:
        loaded = load(args.source, args.sae_id, device=args.device)
    except SaeFolderError as exc:
        print(f"sae-allocators load: error: {exc}", file=sys.stderr)
        return 1
    print(loaded.describe())
    if os.environ.get("HF_HUB_OFFLINE") and args.sae_id:
        print("  (loaded from the local Hugging Face cache: HF_HUB_OFFLINE is set)")
    return 0
