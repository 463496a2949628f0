"""``sae-allocators push OUTPUT_DIR --repo org/name``: upload a trained SAE with SAELens's upload path.

The output *folder* goes to ``sae_lens.upload_saes_to_huggingface`` (so the inference
``cfg.json`` is uploaded, never the training config), without SAELens's generic README; then a
model card describing this SAE is uploaded unless the repo already has one (``--overwrite-card``).
The token comes from ``huggingface_hub`` (``HF_TOKEN``, or the store written by ``hf auth login``);
it is never printed, and any error text is scrubbed of it.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from sae_allocators import devices
from sae_allocators.sae_folder import (
    METRICS_FILENAME,
    RUNNER_CFG_FILENAME,
    SaeFolderError,
    SaeFolderInfo,
    check_loadable,
)
from sae_allocators.names import DISTRIBUTION

HELP = "upload a trained SAE output folder to the Hugging Face Hub, with a model card"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PushError(RuntimeError):
    """The upload could not be done; the message says why and what to do (never the token)."""


def needs_this_project(architecture: str) -> bool:
    """True when the saved (inference) architecture is not SAELens's own."""
    from sae_allocators import host

    prov = host.providers().get(architecture)
    return prov is None or not prov.is_saelens


def default_sae_id(info: SaeFolderInfo) -> str:
    hook = info.metadata.get("hook_name")
    return hook if isinstance(hook, str) and hook else info.path.resolve().name


def _check_sae_id(sae_id: str) -> str:
    parts = sae_id.split("/")
    if not sae_id or sae_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SaeFolderError(
            f"--sae-id {sae_id!r} is not a valid path inside the repo; use e.g. 'blocks.8.hook_resid_post'."
        )
    return sae_id


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def training_summary(info: SaeFolderInfo) -> dict[str, Any]:
    """Training tokens and final metrics, from ``final_metrics.json`` or, failing that, SAELens's files."""
    out: dict[str, Any] = {"training_tokens": None, "metrics": {}, "metrics_source": None}
    metrics_path = info.path / METRICS_FILENAME
    if metrics_path.is_file():
        try:
            data = json.loads(metrics_path.read_text())
            out["training_tokens"] = data.get("training_tokens")
            out["metrics"] = dict(data.get("metrics") or {})
            out["metrics_source"] = data.get("source")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # optional file: the card then says "not recorded"
    runner_path = info.path / RUNNER_CFG_FILENAME
    if out["training_tokens"] is None and runner_path.is_file():
        try:
            out["training_tokens"] = json.loads(runner_path.read_text()).get("training_tokens")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    meta = info.metadata
    if not out["metrics"]:
        for key in ("l0", "num_dead_features"):  # SAELens >= 6.4x records these at the end of training
            if meta.get(key) is not None:
                out["metrics"][key] = meta[key]
        if out["metrics"]:
            out["metrics_source"] = "SAELens metadata in cfg.json"
    return out


def model_card(info: SaeFolderInfo, repo_id: str, sae_id: str) -> str:
    meta = info.metadata
    arch = info.architecture
    train_arch = info.training_architecture  # SAELens 6.38 does not record it; `train` does
    ours = needs_this_project(arch)
    summary = training_summary(info)
    tags = ["saelens", "sparse-autoencoder", DISTRIBUTION] + ([train_arch] if train_arch else [])
    lines = ["---", "library_name: saelens", "tags:"]
    lines += [f"- {t}" for t in dict.fromkeys(tags)]
    lines += ["---", "", f"# {repo_id} / {sae_id}", ""]
    if train_arch:
        by = f" (from {DISTRIBUTION}, a SAELens plugin)" if needs_this_project(train_arch) else " (SAELens's own)"
        lines.append(f"A sparse autoencoder trained with the `{train_arch}` architecture{by}, saved as a `{arch}` SAE.")
    else:
        lines.append(f"A sparse autoencoder saved as a `{arch}` SAE (its training architecture was not recorded).")
    lines += ["", "| | |", "|---|---|"]
    rows = [
        ("Training architecture", f"`{train_arch}`" if train_arch else "not recorded"),
        ("Saved (inference) architecture", f"`{arch}`"),
        ("Model", f"`{public_name(meta.get('model_name')) or 'not recorded'}`"),
        ("Hook", f"`{meta.get('hook_name', 'not recorded')}`"),
        ("d_in / d_sae", f"{info.cfg.get('d_in')} / {info.cfg.get('d_sae')}"),
        (
            "Training tokens",
            _fmt(summary["training_tokens"]) if summary["training_tokens"] is not None else "not recorded",
        ),
    ]
    shares = meta.get("budget_shares")
    if isinstance(shares, dict) and shares.get("budget_share_outlier_rows") is not None:
        guard = shares.get("guard_ratio")
        rows.append(
            (
                "Budget on outlier-norm tokens",
                f"{shares['budget_share_outlier_rows']:.1%} of the kept entries on tokens above "
                f"{_fmt(shares.get('outlier_ratio'))}x the batch median norm; top 1 % of tokens: "
                f"{float(shares.get('budget_share_top1pct') or 0):.1%} (training average; outlier guard "
                + (f"ratio {_fmt(guard)})" if guard else "off)"),
            )
        )
    if meta.get("thresholds_calibrated") is not None:
        rows.append(
            (
                "Thresholds",
                "calibrated on held-out activations" if meta["thresholds_calibrated"] else "running (not calibrated)",
            )
        )
    if meta.get("dataset_path"):
        dataset = public_name(meta["dataset_path"])
        rows.insert(4, ("Dataset", f"`{dataset or 'not recorded'}`"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Final metrics", ""]
    if summary["metrics"]:
        lines.append(f"Source: {summary['metrics_source']}.")
        lines.append("")
        lines += [f"- {k}: {_fmt(v)}" for k, v in summary["metrics"].items()]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Load", "", "```bash"]
    if ours:
        lines.append(f"pip install {DISTRIBUTION}  # provides the `{arch}` architecture; pulls in sae-lens")
    else:
        lines.append("pip install sae-lens")
    lines += ["```", "", "```python"]
    if ours:
        lines.append("import sae_allocators  # registers its architectures (automatic once installed)")
    lines += [
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{sae_id}")',
        "```",
        "",
    ]
    if not ours:
        lines.append(f"`{arch}` is a SAELens architecture: plain SAELens loads this SAE, {DISTRIBUTION} is not needed.")
        lines.append("")
    return "\n".join(lines)


def check_loadable_like_from_pretrained(output_dir: str | Path) -> SaeFolderInfo:
    """Refuse, before any network call, a folder that ``SAE.from_pretrained`` could not load into a
    usable SAE: the header checks, then :func:`sae_allocators.sae_folder.check_loadable` (config field
    types, tensor names / shapes / dtypes, finite weights), then SAELens's own loader on the CPU."""
    from sae_lens import SAE

    info = check_loadable(output_dir)
    try:
        SAE.load_from_disk(str(info.path), device=devices.CPU)
    except Exception as exc:  # noqa: BLE001 - whatever SAELens still refuses: one line, no traceback
        text = str(exc).strip()
        first = text.splitlines()[0] if text else "(no message)"
        raise SaeFolderError(
            f"SAELens cannot load {info.path}, so it is not uploaded: {type(exc).__name__}: {first}"
        ) from None
    return info


#: the files ``push`` uploads (SAELens's ``upload_saes_to_huggingface`` allows these names)
UPLOADED_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", RUNNER_CFG_FILENAME)


def check_upload_files(folder: str | Path) -> list[Path]:
    """The files of ``folder`` that would be uploaded, each a regular file inside the folder.

    A symlink (or a name resolving) outside the folder is refused by name, before any upload:
    following it would publish whatever it points to (a token file, ...)."""
    folder = Path(folder)
    root = folder.resolve()
    out: list[Path] = []
    for name in UPLOADED_FILES:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        target = path.resolve()
        if path.is_symlink() and (root not in target.parents or not target.is_file()):
            raise SaeFolderError(
                f"{path} is a symlink to {target}, outside the SAE folder: push uploads only the folder's own files, "
                f"so it is refused (it would publish that file). Replace the link by the file itself (cp --remove-destination), "
                f"or remove it."
            )
        if not target.is_file():
            raise SaeFolderError(
                f"{path} is not a regular file; push uploads only regular files. Remove it or replace it by the file."
            )
        out.append(path)
    return out


def check_no_secrets(folder: str | Path, token: str | None) -> None:
    """Refuse (``PushError``) a folder whose text files hold the push token or a secret-named field."""
    from sae_allocators.redaction import REDACTED, find_secrets

    found = find_secrets(folder, token)
    if found:
        shown = "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise PushError(
            f"{folder} holds a secret, so nothing is uploaded: {shown}. Replace the value by {REDACTED!r} (or delete the "
            f"field) in that file, then push again; folders saved by this version are redacted already."
        )


_HUB_CACHE_RE = re.compile(r"(?:^|[\\/])models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+?)(?:[\\/]|$)")


def public_name(value: Any) -> str | None:
    """What the model card may say for a model or dataset name: the name itself, never a local path.

    A Hugging Face cache folder (``.../models--org--name/snapshots/...``) gives ``org/name``; any
    other local path (absolute, ``./``, ``~``, a Windows path, or an existing file or folder) gives
    its last component only (``/data/models/gpt2-small`` -> ``gpt2-small``)."""
    if not isinstance(value, str) or not value:
        return None
    m = _HUB_CACHE_RE.search(value)
    if m:
        return f"{m['org']}/{m['name']}"
    looks_local = (
        value.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in value
        or re.match(r"^[A-Za-z]:[\\/]", value) is not None
    )
    if not looks_local and value.count("/") <= 1:
        try:
            looks_local = Path(value).expanduser().exists()
        except OSError:
            looks_local = False
    if looks_local:
        last = re.split(r"[\\/]+", value.rstrip("/\\"))[-1]
        return last or None
    return value


def _connection_error(exc: BaseException) -> bool:
    """True for a transport failure (no answer from the endpoint), whichever HTTP client raised it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {k.__name__ for k in type(exc).__mro__}
        if names & {
            "ConnectError",
            "ConnectTimeout",
            "ConnectionError",
            "TimeoutException",
            "TransportError",
            "ProxyError",
            "ReadTimeout",
        }:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push(
    output_dir: str | Path,
    repo_id: str,
    sae_id: str | None = None,
    *,
    private: bool = False,
    overwrite_card: bool = False,
    revision: str = "main",
) -> dict[str, Any]:
    """Upload ``output_dir`` as ``repo_id/<sae_id>/`` plus a model card; return what was done."""
    if not _REPO_RE.match(repo_id or ""):
        raise SaeFolderError(f"--repo {repo_id!r} is not a Hub repo id; use the form 'org/name' (or 'user/name').")
    files = check_upload_files(output_dir)
    info = check_loadable_like_from_pretrained(output_dir)
    sae_id = _check_sae_id(sae_id if sae_id is not None else default_sae_id(info))

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HfHubHTTPError

    token = get_token()
    check_no_secrets(output_dir, token)
    if not token:
        raise PushError(
            "No Hugging Face token found. Set the HF_TOKEN environment variable or run `hf auth login` "
            "(a token with write access to the repo)."
        )
    import shutil
    import tempfile

    staging = tempfile.TemporaryDirectory(prefix="sae-allocators-push-")
    try:
        # what is uploaded is a copy of the checked regular files, so nothing can change under the upload
        stage = Path(staging.name) / "sae"
        stage.mkdir()
        for f in files:
            shutil.copyfile(f, stage / f.name, follow_symlinks=True)
        check_upload_files(stage)
        check_no_secrets(stage, token)
        from sae_lens import upload_saes_to_huggingface

        api = HfApi()
        if private:
            api.create_repo(repo_id, private=True, exist_ok=True)
        upload_saes_to_huggingface(
            {sae_id: stage}, repo_id, hf_revision=revision, show_progress=False, add_default_readme=False
        )
        card_exists = api.file_exists(repo_id, "README.md", revision=revision)
        card_written = False
        if overwrite_card or not card_exists:
            card = model_card(info, repo_id, sae_id)
            api.upload_file(
                path_or_fileobj=io.BytesIO(card.encode("utf-8")),
                path_in_repo="README.md",
                repo_id=repo_id,
                revision=revision,
                commit_message=f"Model card for {sae_id}",
            )
            card_written = True
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {
            401: "the token was refused: check HF_TOKEN / `hf auth login`",
            403: f"the token has no write access to {repo_id}: use a write token for that org or user",
            404: f"{repo_id} or revision {revision!r} was not found",
        }.get(status, "see the Hub's message above and retry")
        raise PushError(_scrub(f"Upload to {repo_id} failed ({status}): {exc}. Fix: {hint}.", token)) from None
    except ValueError as exc:  # e.g. the Hub refusing the card's metadata
        raise PushError(_scrub(f"Upload to {repo_id} failed: {exc}", token)) from None
    except Exception as exc:  # noqa: BLE001 - connection errors (httpx, requests), offline mode, anything else
        from huggingface_hub import constants

        text = str(exc).strip()
        first = text.splitlines()[0] if text else "(no message)"
        if _connection_error(exc):
            msg = (
                f"Upload to {repo_id} failed: cannot reach {constants.ENDPOINT} ({type(exc).__name__}: {first}). "
                f"Check the network connection and HF_ENDPOINT, then push again."
            )
        else:
            msg = f"Upload to {repo_id} failed: {type(exc).__name__}: {first}. Check the network and that HF_HUB_OFFLINE is not set."
        raise PushError(_scrub(msg, token)) from None
    finally:
        staging.cleanup()
    return {
        "repo_id": repo_id,
        "sae_id": sae_id,
        "card_written": card_written,
        "card_existed": card_exists,
        "info": info,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="the SAE's output folder (--output_path of `train`)")
    p.add_argument("--repo", required=True, help="Hub repo id, org/name")
    p.add_argument("--sae-id", default=None, help="folder in the repo (default: the SAE's hook name)")
    p.add_argument("--private", action="store_true", help="create the repo as private if it does not exist")
    p.add_argument("--overwrite-card", action="store_true", help="replace an existing README.md model card")
    p.add_argument("--revision", default="main", help="branch to push to (default: main)")


def cmd_push(args: argparse.Namespace) -> int:
    try:
        done = push(
            args.output_dir,
            args.repo,
            args.sae_id,
            private=args.private,
            overwrite_card=args.overwrite_card,
            revision=args.revision,
        )
    except (SaeFolderError, PushError) as exc:
        print(f"sae-allocators push: error: {exc}", file=sys.stderr)
        return 1
    print(f"Uploaded {args.output_dir} to {done['repo_id']} as {done['sae_id']}/")
    if done["card_written"]:
        print("Wrote the model card README.md")
    else:
        print("Kept the existing README.md (pass --overwrite-card to replace it)")
    print(f'Load it with: SAE.from_pretrained("{done["repo_id"]}", "{done["sae_id"]}")')
    return 0
