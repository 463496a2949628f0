"""A real language model: activations at one hook, cached once, read back by SAELens's runner for every
architecture; CE loss recovered and KL by splicing a SAE into the model's forward."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from sae_allocators import devices, patches
from sae_allocators.benchmark.sources import TrainResult, _log, _runner_kwargs, quiet_saelens
from sae_allocators.testing import OFFLINE_ENV


@dataclass
class LMScale:
    hook_layer: int = 6
    hook_point: str = "hook_resid_post"
    expansion: int = 2
    #: latents per SAE; None: ``expansion * d_in``
    d_sae: int | None = None
    training_tokens: int = 51_200
    train_batch_size: int = 128  # >= 300 steps: batch-level thresholds (EMA rate 0.01) settle
    eval_sequences: int = 128  # reconstruction and density figures (activations up to the hook only)
    ce_eval_sequences: int = 8  # CE/KL with the SAE spliced in (full forward passes)
    #: the best of {5e-4, 1e-3, 2e-3, 3e-3, 5e-3} for TopK (the baseline) at k = 16, 32 (docs/benchmark.md)
    lr: float = 2e-3
    dead_feature_window: int = 100
    store_batch_size_prompts: int = 8
    norm_estimate_batches: int = 10
    #: training tokens per SAE trained from a live store (gradient_topk and its control; None: as
    #: ``training_tokens``). The gradient store runs the whole LM forward and backward for every
    #: token (about 10x the cache's forward to the hook, recomputed for each SAE), so on a CPU the
    #: default keeps it at a quarter of the cached runs' tokens.
    live_training_tokens: int | None = 12_800
    #: sequences per forward (and backward) of the live stores
    live_store_batch_size_prompts: int = 8
    #: training sequences from which the live runs' input scale is estimated, once per source
    live_norm_estimate_sequences: int = 16
    #: tokens per training step of the live runs (None: ``train_batch_size``): smaller batches give
    #: the expensive gradient path more steps for its tokens
    live_train_batch_size: int | None = 32
    #: held-out tokens (cached after the training tokens) on which batch-level rules calibrate
    calibration_tokens: int = 8192


@dataclass
class LMData:
    """A model and token data, from the offline preparation step or a user's names."""

    model: Any  # HookedTransformer
    train_dataset: Any  # datasets.Dataset with a `tokens` column (rows of context_size)
    eval_tokens: torch.Tensor  # [n_seq, context_size] held-out
    name: str
    corpus: str
    special_ids: list[int] = field(default_factory=list)
    #: every sequence is made to start with this token (None: leave the rows as they are); it is
    #: one of ``special_ids``, so position 0 -- where models keep a huge "attention sink" norm --
    #: is excluded from training and evaluation
    bos_token_id: int | None = None
    cache_root: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


class LMSource:
    kind = "lm"

    def __init__(
        self,
        data: LMData,
        scale: LMScale,
        workdir: Path,
        device: Any = devices.AUTO,
        kind: str = "lm",
        live_only: bool = False,
    ):
        self.kind = kind
        #: only the architectures that train from a live store run here (gradient_topk, topk[live])
        self.live_only = live_only
        data = with_bos(data)
        self.data = data
        self.scale = scale
        self.device = devices.resolve(device)
        if _model_device(data.model) != self.device:
            data.model = _move(data.model, self.device)
        self.model = data.model
        self.hook_name = f"blocks.{scale.hook_layer}.{scale.hook_point}"
        self.d_in = int(self.model.cfg.d_model)
        self.d_sae = int(scale.d_sae) if scale.d_sae else self.d_in * scale.expansion
        self.train_batch_size = scale.train_batch_size
        self.context_size = len(data.train_dataset[0]["tokens"])
        self.name = f"{data.name} @ {self.hook_name}, {data.corpus}"
        self.workdir = workdir
        self.cache_seconds: float | None = None
        self.cache_reused = False
        #: seconds the cache took when it was built (this run or the one that built a reused cache)
        self.cache_build_seconds: float | None = None
        self._activation_path: Path | None = None
        self._eval_x: torch.Tensor | None = None
        self._clean: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # activation cache -------------------------------------------------------------------------
    @property
    def activation_path(self) -> Path:
        """The activation cache, computed the first time a run needs it."""
        if self._activation_path is None:
            self._activation_path = self._prepare_activations()
        return self._activation_path

    def _cache_tokens(self) -> int:
        """Tokens to cache: the training tokens (plus the norm estimate's, and 15% for the special
        tokens filtered out), at most the training data there is; SAELens's store then reads the
        cache again from the start (one more pass) for as long as training needs."""
        s = self.scale
        extra = (s.norm_estimate_batches + 4) * s.train_batch_size + s.calibration_tokens
        wanted = int((s.training_tokens + extra) * 1.15)  # special tokens are filtered out
        return min(wanted, self.available_tokens())

    def available_tokens(self) -> int:
        return len(self.data.train_dataset) * self.context_size

    def passes(self) -> float:
        """How many times each cached token is read in one SAE's training (>1: the data ran out)."""
        return self.scale.training_tokens / max(1, self._cache_tokens() * self.kept_fraction())

    def kept_fraction(self) -> float:
        """Share of training positions that are not special tokens (those are not trained on)."""
        if not self.data.special_ids:
            return 1.0
        rows = torch.tensor(self.data.train_dataset[: min(len(self.data.train_dataset), 256)]["tokens"])
        return float(self._keep_mask(rows).float().mean())

    def _cache_key(self) -> str:
        d = self.data
        fp = getattr(d.train_dataset, "_fingerprint", None) or str(len(d.train_dataset))
        key: list[Any] = [d.name, self.hook_name, self.context_size, self._cache_tokens(), fp, self.d_in]
        if self.device.type != devices.CPU:
            key.append(self.device.type)  # another device's kernels give slightly different activations
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _prepare_activations(self) -> Path:
        from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
        import sae_lens.cache_activations_runner as car

        root = self.data.cache_root or self.workdir
        path = Path(root) / "activations" / self._cache_key()
        done = path / "benchmark_done.json"
        if done.exists():
            self.cache_reused = True
            try:
                self.cache_build_seconds = float(json.loads(done.read_text()).get("seconds"))
            except (ValueError, TypeError):
                pass
            _log(f"[activations] reusing cached activations of {self.hook_name}: {path}")
            return path
        if path.exists():
            shutil.rmtree(path)
        n_tokens = self._cache_tokens()
        n_tokens -= n_tokens % (self.scale.store_batch_size_prompts * self.context_size)
        n_tokens = max(n_tokens, self.scale.store_batch_size_prompts * self.context_size)
        bytes_per_token = self.d_in * 4
        # shards of ~32 MB so that the progress bar moves; a whole number of model batches each
        cfg = CacheActivationsRunnerConfig(
            dataset_path="(in-memory dataset, see the report)",
            model_name=self.data.name,
            model_batch_size=self.scale.store_batch_size_prompts,
            hook_name=self.hook_name,
            d_in=self.d_in,
            training_tokens=n_tokens,
            context_size=self.context_size,
            new_cached_activations_path=str(path),
            shuffle=True,
            seed=0,
            dtype="float32",
            device=str(self.device),
            buffer_size_gb=min(32e6, n_tokens * bytes_per_token) / 1e9,
            prepend_bos=False,
            streaming=False,
        )
        _log(
            f"[activations] computing {n_tokens:,} activations of {self.hook_name} once "
            f"(SAELens CacheActivationsRunner) -> {path}"
        )
        t0 = time.perf_counter()
        # CacheActivationsRunner has no override_model (6.38-6.54): it calls the module-level
        # load_model by name, so that name is pointed at our model while the runner is built.
        original = car.load_model
        car.load_model = lambda *a, **k: self.model
        try:
            runner = CacheActivationsRunner(cfg, override_dataset=self.data.train_dataset)
        finally:
            car.load_model = original
        runner.run()
        self.cache_seconds = self.cache_build_seconds = time.perf_counter() - t0
        done.write_text(json.dumps({"tokens": n_tokens, "seconds": self.cache_seconds, "hook": self.hook_name}))
        _log(f"[activations] done in {self.cache_seconds:.1f} s")
        return path

    def describe(self) -> dict[str, Any]:
        s = self.scale
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.data.name,
            "corpus": self.data.corpus,
            "hook_name": self.hook_name,
            "context_size": self.context_size,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "training_tokens": s.training_tokens,
            "train_batch_size": s.train_batch_size,
            "eval_tokens": int(self.eval_x().shape[0]),
            "ce_eval_tokens": int(min(s.ce_eval_sequences, self.data.eval_tokens.shape[0]) * self.context_size),
            "lr": s.lr,
            "dead_feature_window_steps": s.dead_feature_window,
            "device": str(self.device),
            "live_training_tokens": self.live_tokens(),
            "live_input_scale": getattr(self, "_live_scale", None),
            "live_train_batch_size": s.live_train_batch_size or s.train_batch_size,
            "live_only": self.live_only,
            "cached_tokens": self._cache_tokens(),
            "available_training_tokens": self.available_tokens(),
            "passes_over_training_data": self.passes(),
            "activation_cache": None if self._activation_path is None else str(self._activation_path),
            "activation_cache_seconds": self.cache_seconds,
            "activation_cache_build_seconds": self.cache_build_seconds,
            "activation_cache_reused": self.cache_reused,
            "excluded_token_ids": self.data.special_ids,
            "provenance": self.data.provenance,
        }

    # training ---------------------------------------------------------------------------------
    def sae_fields(self) -> dict[str, Any]:
        """Config fields every SAE gets here: inputs scaled to mean norm sqrt(d_in) (SAELens folds
        the factor into the saved weights, so the saved model takes raw activations). The gradient
        store's packed ``[x | g]`` rows are scaled by one factor too, which gradient_topk's
        self-normalised gradient (``grad_normalization="batch"``) does not see."""
        return {
            "normalize_activations": "expected_average_only_in",
            "calibration_tokens": self.scale.calibration_tokens,
        }

    def live_tokens(self) -> int:
        s = self.scale
        return int(s.training_tokens if s.live_training_tokens is None else s.live_training_tokens)

    def train(self, sae_cfg: Any, seed: int, out_dir: Path) -> TrainResult:
        """Train from the activation cache (every architecture that needs nothing but activations)."""
        return self._train(sae_cfg, seed, out_dir, live=False)

    def train_live(self, sae_cfg: Any, seed: int, out_dir: Path) -> TrainResult:
        """Train from the store the config asks for, computing activations as it goes: for
        gradient_topk its gradient store (``[x | dL/dx]`` rows: the whole model forward and backward),
        for the control SAELens's plain store (the model forward up to the hook). The token data and
        order are those of the dataset (no cache shuffle), the same for every live run of a seed."""
        return self._train(sae_cfg, seed, out_dir, live=True)

    def _train(self, sae_cfg: Any, seed: int, out_dir: Path, live: bool) -> TrainResult:
        from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        s = self.scale
        tokens = self.live_tokens() if live else s.training_tokens
        store_prompts = s.live_store_batch_size_prompts if live else s.store_batch_size_prompts
        batch = (s.live_train_batch_size or s.train_batch_size) if live else s.train_batch_size
        cfg = LanguageModelSAERunnerConfig(
            **_runner_kwargs(
                LanguageModelSAERunnerConfig,
                sae=sae_cfg,
                model_name=self.data.name,
                hook_name=self.hook_name,
                dataset_path="",
                is_dataset_tokenized=True,
                streaming=False,
                context_size=self.context_size,
                training_tokens=tokens,
                train_batch_size_tokens=batch,
                store_batch_size_prompts=store_prompts,
                n_batches_in_buffer=max(2 if live else 4, -(-2 * batch // self.context_size)),
                use_cached_activations=not live,
                cached_activations_path=None if live else str(self.activation_path),
                exclude_special_tokens=list(self.data.special_ids) or False,
                prepend_bos=False,
                device=str(self.device),
                lr=s.lr,
                checkpoint_path=None,
                output_path=str(out_dir),
                logger=LoggingConfig(log_to_wandb=False),
                verbose=False,
                dead_feature_window=s.dead_feature_window,
                feature_sampling_window=s.dead_feature_window,
                n_batches_for_norm_estimate=s.norm_estimate_batches,
                seed=seed,
            )
        )
        torch.manual_seed(seed)
        scale = patches.fixed_input_scale(self.live_input_scale()) if live else contextlib.nullcontext()
        with quiet_saelens(), scale:
            runner = LanguageModelSAETrainingRunner(
                cfg, override_model=self.model, override_dataset=self.data.train_dataset
            )
            torch.manual_seed(1_000_003 * (seed + 1))
            devices.synchronize(self.device)
            t0 = time.perf_counter()
            sae = runner.run()
            devices.synchronize(self.device)
        seconds = time.perf_counter() - t0
        store = type(runner.activations_store).__name__
        return TrainResult(
            sae,
            out_dir,
            seconds,
            tokens // batch,
            tokens,
            "live" if live else "cache",
            store,
            runner.calibration_result,
        )

    @torch.no_grad()
    def live_input_scale(self) -> float:
        """SAELens's ``expected_average_only_in`` factor ``sqrt(d_in) / mean ||x||``, estimated once from
        the first training sequences (special tokens excluded) and given to every live run. SAELens would
        estimate it per run from the rows it trains on, which for the gradient store are ``[x | g]``: a
        slightly different factor than the control's, and a forward and backward per estimate batch."""
        if getattr(self, "_live_scale", None) is None:
            n = min(self.scale.live_norm_estimate_sequences, len(self.data.train_dataset))
            toks = torch.tensor(self.data.train_dataset[:n]["tokens"]).to(self.device)
            norms = []
            for i in range(0, n, 4):
                batch = toks[i : i + 4]
                _, cache = self.model.run_with_cache(
                    batch, names_filter=[self.hook_name], stop_at_layer=self.scale.hook_layer + 1
                )
                norms.append(cache[self.hook_name][self._keep_mask(batch)].float().norm(dim=-1))
            self._live_scale = float(self.d_in**0.5 / torch.cat(norms).mean())
        return self._live_scale

    # evaluation -------------------------------------------------------------------------------
    def _keep_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        for t in self.data.special_ids:
            keep &= tokens != t
        return keep

    @torch.no_grad()
    def eval_x(self) -> torch.Tensor:
        """The evaluation activations: the held-out stream without the excluded (special) tokens."""
        if self._eval_x is None:
            stream = self.stream_eval()
            self._eval_x = stream["x"][stream["keep"]]
        return self._eval_x

    @torch.no_grad()
    def stream_eval(self) -> dict[str, torch.Tensor]:
        """The held-out contexts as a user's token stream sees them: every token kept (BOS rows and
        separators too, as SAELens's default data options give), in order. ``x`` ``[n, d]``,
        ``position`` ``[n]`` (0: BOS / special token, 1: first token of a document, 2: the rest),
        ``tokens`` ``[n]`` and ``keep`` ``[n]`` (not an excluded special token: :meth:`eval_x`)."""
        if getattr(self, "_stream", None) is None:
            toks = self.data.eval_tokens[: self.scale.eval_sequences].to(self.device)
            xs = []
            for i in range(0, toks.shape[0], 4):
                batch = toks[i : i + 4]
                _, cache = self.model.run_with_cache(
                    batch, names_filter=[self.hook_name], stop_at_layer=self.scale.hook_layer + 1
                )
                xs.append(cache[self.hook_name].reshape(-1, self.d_in))
            special = ~self._keep_mask(toks)
            after = torch.zeros_like(special)
            after[:, 1:] = special[:, :-1]
            position = torch.full_like(toks, 2)
            position[after & ~special] = 1
            position[special] = 0
            self._stream = {
                "x": torch.cat(xs).float(),
                "position": position.reshape(-1),
                "tokens": toks.reshape(-1),
                "keep": ~special.reshape(-1),
            }
        return self._stream

    def eval_batches(self, batch_size: int = 2048) -> Iterator[torch.Tensor]:
        x = self.eval_x()
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]

    def _ce_batches(self) -> list[torch.Tensor]:
        toks = self.data.eval_tokens[: self.scale.ce_eval_sequences].to(self.device)
        return [toks[i : i + 4] for i in range(0, toks.shape[0], 4)]

    @torch.no_grad()
    def _run(self, tokens: torch.Tensor, replace: Any | None) -> torch.Tensor:
        keep = self._keep_mask(tokens)

        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            new = replace(act)
            return torch.where(keep.unsqueeze(-1), new.to(act.dtype), act)

        hooks = [] if replace is None else [(self.hook_name, hook)]
        return self.model.run_with_hooks(tokens, fwd_hooks=hooks)

    @staticmethod
    def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logp = logits[:, :-1].double().log_softmax(-1)
        return -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)

    @property
    def _resumable(self) -> bool:
        """The spliced forward can start from the hooked activation (a residual-stream output): the
        blocks before it are run once, in :meth:`clean_reference`, not once per SAE."""
        return self.scale.hook_point == "hook_resid_post"

    @torch.no_grad()
    def _run_from_hook(self, act: torch.Tensor, tokens: torch.Tensor, replace: Any) -> torch.Tensor:
        """The logits of ``_run(tokens, replace)`` from the cached hooked activation ``act``: the
        replacement (special tokens kept), then only the blocks after the hook and the unembedding."""
        keep = self._keep_mask(tokens)
        new = torch.where(keep.unsqueeze(-1), replace(act).to(act.dtype), act)
        return self.model(new, start_at_layer=self.scale.hook_layer + 1)

    @torch.no_grad()
    def clean_reference(self) -> dict[str, float]:
        if self._clean is None:
            self._clean = []
            self._clean_acts = []
            for toks in self._ce_batches():
                if self._resumable:
                    logits, cache = self.model.run_with_cache(toks, names_filter=[self.hook_name])
                    self._clean_acts.append(cache[self.hook_name])
                else:
                    logits = self._run(toks, None)
                zero = self._run(toks, torch.zeros_like)
                self._clean.append((toks, logits[:, :-1].float().log_softmax(-1), self._ce(zero, toks)))
        ce_clean = torch.cat([self._ce_from_logp(lp, t) for t, lp, _ in self._clean]).mean()
        ce_zero = torch.cat([z for _, _, z in self._clean]).mean()
        return {"ce_clean": float(ce_clean), "ce_zero_ablation": float(ce_zero)}

    @staticmethod
    def _ce_from_logp(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return -logp.double().gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def splice(self, sae: Any) -> dict[str, float]:
        """CE loss and KL with ``sae``'s reconstruction in place of the hooked activation."""
        from sae_allocators.benchmark.metrics import ce_loss_recovered

        ref = self.clean_reference()
        assert self._clean is not None
        ces, kls = [], []
        for i, (toks, clean_logp, _) in enumerate(self._clean):
            if self._resumable:
                logits = self._run_from_hook(self._clean_acts[i], toks, lambda a: sae(a))
            else:
                logits = self._run(toks, lambda a: sae(a))
            ces.append(self._ce(logits, toks))
            logq = logits[:, :-1].double().log_softmax(-1)
            p = clean_logp.double()
            kls.append((p.exp() * (p - logq)).sum(-1))
        ce_sae = float(torch.cat([c.reshape(-1) for c in ces]).mean())
        return {
            "ce_sae": ce_sae,
            "ce_loss_recovered": ce_loss_recovered(ref["ce_clean"], ce_sae, ref["ce_zero_ablation"]),
            "kl_div": float(torch.cat([k.reshape(-1) for k in kls]).mean()),
            **ref,
        }


def with_bos(data: LMData) -> LMData:
    """Rows that do not start with ``bos_token_id`` get it prepended (their last token dropped)."""
    bos = data.bos_token_id
    if bos is None:
        return data
    if bos not in data.special_ids:
        data.special_ids = sorted({*data.special_ids, bos})

    def fix(row: list[int]) -> list[int]:
        return row if row[0] == bos else [bos, *row[:-1]]

    ds = data.train_dataset
    if any(r[0] != bos for r in ds[: min(len(ds), 64)]["tokens"]):
        ds = ds.map(lambda ex: {"tokens": fix(list(ex["tokens"]))}, desc="prepending BOS")
    ev = data.eval_tokens
    if (ev[:, 0] != bos).any():
        ev = torch.cat([torch.full_like(ev[:, :1], bos), ev[:, :-1]], dim=1)
    data.train_dataset, data.eval_tokens = ds, ev
    return data


def _model_device(model: Any) -> torch.device:
    cfg_device = getattr(getattr(model, "cfg", None), "device", None)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return devices.resolve(cfg_device or devices.CPU)


def _move(model: Any, device: torch.device) -> Any:
    try:
        return model.to(device, print_details=False)  # HookedTransformer (updates cfg.device too)
    except TypeError:
        return model.to(device)
