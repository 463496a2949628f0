"""How to build a training config at a target average L0 ``k``, per registered architecture.

The benchmark trains whatever is registered (SAELens's registry, filled by the plugin host).
For each name it needs one fact: which config fields give an average of ``k`` active latents
per token. That is the table :data:`KNOWN` below; extend it with one line per architecture.

Rules, in order, for a registered training architecture ``name``:

1. ``name`` is in :data:`KNOWN`: use its entry (whoever provides it -- SAELens, us or a plugin).
2. ``name`` is another SAELens built-in (``standard``, ``jumprelu``, ``gated``, ...): skipped,
   since those have no L0 budget to match; only ``topk`` and ``batchtopk`` are baselines.
3. any other name (a third-party plugin without an entry): trained with ``k`` if its training
   config has a ``k`` field, else skipped with a printed reason.

Auxiliary losses: each architecture is trained with its own default config. To compare
aux_zipf with AuxK on the same allocator, an entry names its AuxK counterpart
(``auxk_counterpart``: ``topk_zipf`` -> SAELens's ``topk``), or asks for extra variants
(``aux_variants=("auxk",)`` trains ``feature_choice[aux=auxk]`` next to ``feature_choice``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    """How the benchmark builds one architecture's config."""

    fields: Callable[[float, "Context"], dict[str, Any]]
    #: ``False`` when the architecture picks its own L0 (trained once, its L0 is reported)
    fixed_l0: bool = True
    #: ``False`` when training on a language model needs more than cached activations: then it is
    #: trained from SAELens's live store (the one its config asks for; gradient_topk: the gradient
    #: store) on ``LMScale.live_training_tokens`` tokens
    lm_from_cache: bool = True
    #: for a live-store architecture, the registered name trained next to it from SAELens's plain
    #: live store on the same tokens in the same order (its control, label ``<name>[live]``)
    lm_live_control: str | None = None
    #: extra runs with ``aux_loss=<name>`` (labelled ``name[aux=<name>]``), when that loss is registered
    aux_variants: tuple[str, ...] = ()
    #: the label of the same selection trained with AuxK (for the aux_zipf vs AuxK comparison)
    auxk_counterpart: str | None = None
    #: extra runs ``(tag, config fields)``, labelled ``name[tag]`` (e.g. the outlier guard off)
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Context:
    """What an entry may look at: the sweep and the SAE size."""

    d_in: int
    d_sae: int
    ks: tuple[float, ...]
    has_lm_gradients: bool = False
    #: gradient_topk's beta on the language model (synthetic data has no gradients)
    gradient_beta: float = 1.0


def _int_k(k: float, ctx: Context) -> dict[str, Any]:
    return {"k": max(1, int(round(k)))}


def _float_k(k: float, ctx: Context) -> dict[str, Any]:
    return {"k": float(k)}


def _gradient_k(k: float, ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"k": max(1, int(round(k)))}
    if ctx.has_lm_gradients:
        out["beta"] = float(ctx.gradient_beta)
    return out


def _top_afa(k: float, ctx: Context) -> dict[str, Any]:
    # top-AFA chooses each token's L0 from norm matching; k_max is only the cap of its capped sort
    # (exact while a token's L0 stays below it). Its L0 is reported; whether it hit the cap is in p99.
    return {"k_max": min(ctx.d_sae, 16 * int(max(ctx.ks)))}


#: the batch rules trained without the outlier guard (sae_allocators.allocation.outliers), to compare
GUARD_OFF = ("guard=off", (("outlier_norm_ratio", 0.0),))

KNOWN: dict[str, Entry] = {
    # SAELens's baselines (AuxK)
    "topk": Entry(_int_k, note="SAELens baseline; AuxK"),
    "batchtopk": Entry(_float_k, note="SAELens baseline; AuxK; saved as jumprelu"),
    "abstopk": Entry(_int_k, note="signed codes; SAELens's own from 6.53, the project's port before"),
    # the same selections with this project's aux_zipf loss
    "topk_zipf": Entry(_int_k, auxk_counterpart="topk", note="SAELens topk + aux_zipf"),
    "batchtopk_zipf": Entry(_float_k, auxk_counterpart="batchtopk", note="SAELens batchtopk + aux_zipf"),
    "abstopk_zipf": Entry(_int_k, auxk_counterpart="abstopk", note="abstopk + aux_zipf (signed)"),
    # the project's allocators
    "mutual_choice": Entry(
        _float_k,
        auxk_counterpart="batchtopk",
        variants=(GUARD_OFF,),
        note="same selection as batchtopk; its AuxK run is batchtopk itself",
    ),
    "feature_choice": Entry(_float_k, aux_variants=("auxk",), variants=(GUARD_OFF,)),
    "gradient_topk": Entry(
        _gradient_k,
        lm_from_cache=False,
        lm_live_control="topk",
        note="on the LM: trained from its gradient store (a full forward and backward of the LM for "
        "every training token gives dL/dx), not from the activation cache, next to topk[live] (SAELens's "
        "topk from the plain live store, same tokens in the same order: the beta = 0 control); on "
        "synthetic data, which has no gradients, its selection is plain TopK",
    ),
    "top_afa": Entry(_top_afa, fixed_l0=False, note="chooses its own L0 per token (k_max is only a cap)"),
}


@dataclass
class Plan:
    """One architecture (and aux-loss variant) the benchmark will train, or why it will not."""

    name: str  # registered architecture name
    label: str  # row label: name, or name[aux=zipf]
    provider: str
    entry: Entry | None
    extra: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None

    @property
    def batch_level(self) -> bool:
        """Batch-level selection at training time (inference L0 may drift from k): the kind the
        registered training class declares (:func:`sae_allocators.architectures.kinds.rule_kind_of`)."""
        from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

        from sae_allocators.architectures import kinds

        entry = SAE_TRAINING_CLASS_REGISTRY.get(self.name)
        return entry is not None and kinds.is_batch_rule(entry[0])

    @property
    def fixed_l0(self) -> bool:
        return bool(self.entry is None or self.entry.fixed_l0)

    @property
    def auxk_counterpart(self) -> str | None:
        """Label of the same selection trained with AuxK, when this run's loss is not AuxK."""
        if self.entry is None or self.extra:  # a variant (aux loss, guard off) has no counterpart
            return None
        if self.entry.auxk_counterpart:
            return self.entry.auxk_counterpart
        if "auxk" in self.entry.aux_variants:
            return f"{self.name}[aux=auxk]"
        return None

    def config_fields(self, k: float, ctx: Context) -> dict[str, Any]:
        assert self.entry is not None, self.skip_reason
        out = dict(self.entry.fields(k, ctx))
        out.update(self.extra)
        return out


def _config_fields(cfg_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cfg_cls)} if dataclasses.is_dataclass(cfg_cls) else {}


def _generic_entry(cfg_cls: type) -> Entry | None:
    f = _config_fields(cfg_cls).get("k")
    if f is None:
        return None
    is_int = isinstance(f.default, int) and not isinstance(f.default, bool) or f.type in (int, "int")
    return Entry(_int_k if is_int else _float_k, note="generic: config's `k` field")


def plan_architectures(only: list[str] | None = None) -> list[Plan]:
    """Every registered training architecture with how it will be trained (or why not)."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_allocators import host
    from sae_allocators.losses import registry as loss_registry

    providers = host.providers()
    losses = set(loss_registry.available())
    plans: list[Plan] = []
    for name in sorted(SAE_TRAINING_CLASS_REGISTRY):
        prov = providers.get(name)
        provider = f"{prov.distribution} {prov.version}".strip() if prov is not None else "sae-lens"
        _, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[name]
        if only and name not in only:
            continue
        entry = KNOWN.get(name)
        reason = None
        if entry is None:
            if prov is None or prov.is_saelens:
                reason = "SAELens built-in without an L0 budget (only topk and batchtopk are baselines)"
            else:
                entry = _generic_entry(cfg_cls)
                if entry is None:
                    reason = (
                        f"no entry in sae_allocators.benchmark.configs.KNOWN and its config "
                        f"{cfg_cls.__name__} has no `k` field; add an entry to benchmark it"
                    )
        plans.append(Plan(name, name, provider, entry, skip_reason=reason))
        if entry is not None and "aux_loss" in _config_fields(cfg_cls):
            for v in entry.aux_variants:
                if v in losses:
                    plans.append(Plan(name, f"{name}[aux={v}]", provider, entry, extra={"aux_loss": v}))
        if entry is not None:
            for tag, extra in entry.variants:
                if all(key in _config_fields(cfg_cls) for key, _ in extra):
                    plans.append(Plan(name, f"{name}[{tag}]", provider, entry, extra=dict(extra)))
    if only:
        missing = sorted(set(only) - {p.name for p in plans})
        if missing:
            raise ValueError(
                f"--arch {', '.join(missing)}: not a registered training architecture. "
                f"Registered: {', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))}"
            )
    return plans


#: variants trained only when a run asks for their label (``Settings.labels``, e.g. ``--preset large``)
OPTIONAL_VARIANTS: dict[str, tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]] = {
    "feature_choice": (("capacity=uniform", (("capacity", "uniform"),)),),
}


#: SAELens baselines with an exact twin on this project's sparse training step: the same selection,
#: decode, MSE and AuxK (SAELens's, over the trainer's dead set), so the same loss and gradients to float
#: tolerance (tests/benchmark/test_sparse_baselines.py), at a quarter of SAELens's dense step on the CPU.
#: ``--preset large`` trains its ``topk``, ``abstopk`` and ``batchtopk`` baselines this way
#: (``Settings.sparse_baselines``). ``batchtopk``'s twin also takes SAELens's threshold: its EMA from 0,
#: no export correction, no calibration, and no outlier guard (SAELens ranks every row as it is), so
#: the saved JumpReLU threshold is the one SAELens's ``batchtopk`` saves.
SPARSE_TWINS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "topk": ("topk_zipf", (("aux_loss", "auxk"), ("sparse_step", True))),
    "abstopk": ("abstopk_zipf", (("aux_loss", "auxk"), ("sparse_step", True))),
    "batchtopk": (
        "batchtopk_zipf",
        (
            ("aux_loss", "auxk"),
            ("sparse_step", True),
            ("threshold_rule", "saelens"),
            ("calibrate", False),
            ("outlier_norm_ratio", 0),
        ),
    ),
}


def on_sparse_step(plans: list[Plan], labels: tuple[str, ...] | list[str]) -> list[Plan]:
    """``plans`` with the baselines named in ``labels`` trained by their sparse twin (:data:`SPARSE_TWINS`):
    same label, same entry (k), the twin's registered name and provider, its AuxK fields as ``extra``."""
    unknown = sorted(set(labels) - set(SPARSE_TWINS))
    if unknown:
        raise ValueError(f"sparse baselines {', '.join(unknown)}: no sparse twin (known: {', '.join(SPARSE_TWINS)})")
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_allocators import host

    providers = host.providers()
    out = []
    for p in plans:
        if p.label in labels and p.skip_reason is None and p.entry is not None:
            twin, extra = SPARSE_TWINS[p.label]
            if twin not in SAE_TRAINING_CLASS_REGISTRY or twin not in providers:
                raise ValueError(
                    f"sparse baseline {p.label}: its twin {twin} is not registered (is sae-allocators installed?)"
                )
            prov = providers[twin]
            note = f"{p.entry.note}; trained as {twin} with SAELens's AuxK on the sparse step (same loss and gradients)"
            p = Plan(
                twin,
                p.label,
                f"{prov.distribution} {prov.version}".strip(),
                dataclasses.replace(p.entry, note=note),
                extra=dict(extra),
            )
        out.append(p)
    return out


def select_labels(plans: list[Plan], labels: tuple[str, ...] | list[str]) -> list[Plan]:
    """The plans of these labels, in the order of ``plans``, optional variants added after their base
    architecture (the base need not be asked for); an unknown label is an error naming the known ones."""
    wanted = list(labels)
    out: list[Plan] = []
    for p in plans:
        if p.label in wanted:
            out.append(p)
        if p.label == p.name and p.entry is not None and p.skip_reason is None:
            for tag, extra in OPTIONAL_VARIANTS.get(p.name, ()):
                if f"{p.name}[{tag}]" in wanted:
                    out.append(Plan(p.name, f"{p.name}[{tag}]", p.provider, p.entry, extra=dict(extra)))
    missing = [lab for lab in wanted if lab not in {p.label for p in out}]
    if missing:
        known = [p.label for p in plans] + [f"{n}[{t}]" for n, vs in OPTIONAL_VARIANTS.items() for t, _ in vs]
        raise ValueError(f"labels {', '.join(missing)}: not planned here (known: {', '.join(known)})")
    return out


def build_training_config(plan: Plan, k: float, ctx: Context, **common: Any):
    """Instantiate the training config of ``plan`` at target L0 ``k``."""
    from sae_lens.registry import get_sae_training_class

    _, cfg_cls = get_sae_training_class(plan.name)
    known = _config_fields(cfg_cls)
    kwargs = {key: value for key, value in common.items() if key in known}
    kwargs.update(plan.config_fields(k, ctx))
    return cfg_cls(d_in=ctx.d_in, d_sae=ctx.d_sae, **kwargs)
