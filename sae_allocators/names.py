"""Names this project provides, importable without torch or SAELens (used in error hints)."""

DISTRIBUTION = "sae-allocators"

#: every architecture name this project provides (hints in error messages use it)
PROVIDED_ARCHITECTURES: tuple[str, ...] = (
    "feature_choice",
    "mutual_choice",
    "abstopk",
    "gradient_topk",
    "top_afa",
    "topk_zipf",
    "batchtopk_zipf",
    "abstopk_zipf",
)

#: architecture name -> the module of this package that registers it
OWN_ARCHITECTURES: dict[str, str] = {
    "mutual_choice": "sae_allocators.architectures.mutual_choice",
    "feature_choice": "sae_allocators.architectures.feature_choice",
    "topk_zipf": "sae_allocators.architectures.topk_zipf",
    "batchtopk_zipf": "sae_allocators.architectures.batchtopk_zipf",
    "abstopk": "sae_allocators.architectures.abstopk",
    "abstopk_zipf": "sae_allocators.architectures.abstopk_zipf",
    "top_afa": "sae_allocators.architectures.top_afa",
    "gradient_topk": "sae_allocators.architectures.gradient_topk",
}

#: modules that register auxiliary losses through the same hook machinery
OWN_LOSS_MODULES: tuple[str, ...] = ("sae_allocators.losses.builtin",)

ENV_DISABLE_PLUGINS = "SAE_ALLOCATORS_DISABLE_PLUGINS"
ENV_NO_AUTOLOAD = "SAE_ALLOCATORS_NO_AUTOLOAD"
