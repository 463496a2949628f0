"""The plugin host: loads plugins with pluggy and registers what they offer into SAELens.

Order of work in :func:`load` (run once per process; ``import sae_allocators`` calls it):

1. A ``pluggy.PluginManager`` gets the contract (:mod:`sae_allocators.hookspecs`).
2. The project's own modules (``names.OWN_ARCHITECTURES``, ``names.OWN_LOSS_MODULES``) are
   registered as plugins -- the same ``@hookimpl`` functions a third party writes.
3. Entry points in the group ``sae_allocators`` are loaded one by one, unless
   ``SAE_ALLOCATORS_DISABLE_PLUGINS`` says otherwise. A plugin that fails to import, has a
   misspelled hook, or whose hook raises, is reported in a warning naming its distribution, and
   every other plugin still loads.
4. Each plugin's hooks are called separately, so every registration is attributed to its
   distribution. Offers are validated (real SAE classes, matching ``architecture()``), and then
   written into SAELens's registries with these rules:

   - a name SAELens itself provides (e.g. ``abstopk`` on SAELens >= 6.53) stays SAELens's; the
     offer is recorded as deferred;
   - two plugins offering one name: the first (ours before third parties, then by distribution
     name) keeps it, and a warning names both distributions;
   - re-loading (``importlib.reload``, a second ``load(force=True)``) replaces a provider's own
     earlier registration silently: never SAELens's "already registered" error.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pluggy

from sae_allocators import hookspecs, names, patches, plugin_state
from sae_allocators import saelens_registry as reg
from sae_allocators.plugin_state import SAELENS, LoadReport, LossEntry, PluginState, Provider, Source

__all__ = [
    "SAELENS",
    "LoadReport",
    "PluginState",
    "PluginWarning",
    "Provider",
    "Source",
    "external_plugins_disabled",
    "load",
    "plugin_manager",
    "providers",
    "state",
    "validate_offer",
]


class PluginWarning(UserWarning):
    """A plugin could not be loaded, or one of its registrations was refused."""


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "(not installed)"


def _own_source(module: str) -> Source:
    return Source(plugin=module, distribution=names.DISTRIBUTION, version=_version(names.DISTRIBUTION), builtin=True)


#: warnings raised while loading, emitted only once every registration is done, so that a
#: warnings filter turning them into errors (``python -W error``, pytest's ``filterwarnings =
#: error``) cannot stop this project's own architectures from being registered
_pending: list[str] | None = None


def _warn(msg: str) -> None:
    if _pending is not None:
        _pending.append(msg)
    else:
        warnings.warn(msg, PluginWarning, stacklevel=3)


def external_plugins_disabled() -> set[str] | bool:
    """``True`` when ``SAE_ALLOCATORS_DISABLE_PLUGINS`` is 1/true/all; else the set of
    entry-point or distribution names it lists (comma-separated); empty set when unset."""
    raw = os.environ.get(names.ENV_DISABLE_PLUGINS, "").strip()
    if raw.lower() in ("1", "true", "yes", "all", "*"):
        return True
    return {part.strip().lower() for part in raw.split(",") if part.strip() and part.strip() != "0"}


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: ((ep.dist.name if ep.dist else "").lower(), ep.name))


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _register_plugin(pm: pluggy.PluginManager, plugin: Any, source: Source, report: LoadReport) -> bool:
    """Register one plugin object with pluggy; refuse it (with a warning) if it breaks the contract."""
    try:
        pm.register(plugin, name=source.plugin)
        pm.check_pending()
    except Exception as exc:  # pluggy.PluginValidationError, ValueError on duplicate names
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        report.failed.append((source.describe(), f"{type(exc).__name__}: {exc}"))
        _warn(
            f"sae-allocators: plugin {source.plugin!r} from {source.describe()} breaks the hook "
            f"contract and was not loaded: {exc}. See docs/plugins.md for the hook signatures."
        )
        return False
    if not pm.get_hookcallers(plugin):
        # an entry point naming a function or class ("pkg.plugin:register_architectures"), or a module
        # without @hookimpl functions: pluggy registers it and it adds nothing, so say so
        pm.unregister(plugin)
        what = "a module" if inspect.ismodule(plugin) else f"a {type(plugin).__name__}, not a module"
        reason = f"it is {what} and implements no sae_allocators hook"
        report.failed.append((source.describe(), reason))
        _warn(
            f"sae-allocators: plugin {source.plugin!r} from {source.describe()} registers nothing: {reason}. "
            f"Its entry point must name the module holding the @sae_allocators.hookimpl functions "
            f"(e.g. 'my_package.plugin', not 'my_package.plugin:register_architectures'); see docs/plugins.md."
        )
        return False
    return True


def _load_plugins(pm: pluggy.PluginManager, report: LoadReport) -> list[tuple[Any, Source]]:
    plugins: list[tuple[Any, Source]] = []
    for module_name in (*names.OWN_ARCHITECTURES.values(), *names.OWN_LOSS_MODULES):
        module = importlib.import_module(module_name)  # our own: an ImportError is a real bug
        src = _own_source(module_name)
        if _register_plugin(pm, module, src, report):
            plugins.append((module, src))

    disabled = external_plugins_disabled()
    report.external_enabled = disabled is not True
    if disabled is True:
        return plugins
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else "(unknown distribution)"
        version = ep.dist.version if ep.dist else ""
        src = Source(plugin=ep.name, distribution=dist, version=version)
        if ep.name.lower() in disabled or dist.lower() in disabled:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # ImportError, AttributeError, a malformed value, anything
            report.failed.append((src.describe(), f"{type(exc).__name__}: {exc}"))
            _warn(
                f"sae-allocators: plugin {ep.name!r} ({ep.value}) from distribution {src.describe()} "
                f"failed to load: {type(exc).__name__}: {exc}. Other plugins are unaffected; fix or "
                f"uninstall {dist}, or skip it with {names.ENV_DISABLE_PLUGINS}={ep.name}."
            )
            continue
        if _register_plugin(pm, plugin, src, report):
            plugins.append((plugin, src))
    return plugins


# --- architecture offers --------------------------------------------------------------------


@dataclass
class _Offer:
    name: str
    training: tuple[type, type] | None
    inference: tuple[type, type] | None
    description: str
    source: Source


def _check_pair(name: str, pair: Any, base_sae: type, base_cfg: type, what: str) -> str | None:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        return f"{what} must be a (class, config class) tuple, got {pair!r}"
    cls, cfg = pair
    if not (isinstance(cls, type) and issubclass(cls, base_sae)):
        return f"{what} class {cls!r} is not a subclass of sae_lens {base_sae.__name__}"
    if not (isinstance(cfg, type) and issubclass(cfg, base_cfg)):
        return f"{what} config {cfg!r} is not a subclass of sae_lens {base_cfg.__name__}"
    try:
        arch = cfg.architecture()
    except Exception as exc:
        return f"{what} config {cfg.__name__}.architecture() raised {exc!r}"
    if arch != name:
        return f"{what} config {cfg.__name__}.architecture() returns {arch!r}, not {name!r}"
    return None


def validate_offer(offer: _Offer) -> str | None:
    """Return why an offer is refused, or None when it is acceptable."""
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

    if not isinstance(offer.name, str) or not offer.name.isidentifier():
        return f"architecture name {offer.name!r} must be a non-empty identifier-like string"
    if offer.training is None and offer.inference is None:
        return "neither training nor inference classes were given"
    if offer.training is not None:
        if problem := _check_pair(offer.name, offer.training, TrainingSAE, TrainingSAEConfig, "training"):
            return problem
        cfg = offer.training[1]
        if offer.inference is None and cfg.get_inference_config_class is TrainingSAEConfig.get_inference_config_class:
            return (
                f"training-only architecture: {cfg.__name__} must override get_inference_config_class() "
                f"(SAELens looks up the inference registry under {offer.name!r} when a config is built)"
            )
    if offer.inference is not None:
        if problem := _check_pair(offer.name, offer.inference, SAE, SAEConfig, "inference"):
            return problem
    return None


def _commit(offers: list[_Offer]) -> dict[str, Provider]:
    records = reg.provider_records()
    providers: dict[str, Provider] = {}
    for offer in offers:
        name, src = offer.name, offer.source
        existing = records.get(name)
        taken_now = providers.get(name)
        if taken_now is not None:  # two plugins in this load
            taken_now.deferred.append(src.describe())
            _warn(
                f"sae-allocators: architecture {name!r} is offered by both {taken_now.distribution} "
                f"{taken_now.version} (plugin {taken_now.plugin!r}) and {src.describe()} (plugin "
                f"{src.plugin!r}); keeping {taken_now.distribution}'s. Uninstall one, or disable one "
                f"with {names.ENV_DISABLE_PLUGINS}=<plugin>."
            )
            continue
        in_saelens = reg.get(reg.TRAINING, name) or reg.get(reg.INFERENCE, name)
        if in_saelens and (existing is None or existing.get("distribution") == SAELENS):
            # SAELens itself (or someone outside this host) provides it: defer.
            providers[name] = Provider(
                name=name,
                distribution=SAELENS,
                version=_version(SAELENS),
                plugin="sae_lens",
                has_training=reg.get(reg.TRAINING, name) is not None,
                has_inference=reg.get(reg.INFERENCE, name) is not None,
                description="provided by SAELens itself",
                deferred=[src.describe()],
            )
            continue
        if existing is not None:  # our own earlier registration (reload): replace it
            for side in (reg.TRAINING, reg.INFERENCE):
                reg.remove(side, name)
        if offer.training is not None:
            reg.put(reg.TRAINING, name, offer.training)
        if offer.inference is not None:
            reg.put(reg.INFERENCE, name, offer.inference)
        providers[name] = Provider(
            name=name,
            distribution=src.distribution,
            version=src.version,
            plugin=src.plugin,
            has_training=offer.training is not None,
            has_inference=offer.inference is not None,
            description=offer.description,
        )
    for name, prov in providers.items():
        records[name] = {"distribution": prov.distribution, "plugin": prov.plugin}
    return providers


def _collect(
    pm: pluggy.PluginManager, plugins: list[tuple[Any, Source]], report: LoadReport
) -> tuple[dict[str, Provider], dict[str, LossEntry]]:
    """Call each plugin's hooks; return the architectures committed to SAELens and the losses."""
    from sae_allocators.losses import registry as loss_registry  # here: import order as before

    offers: list[_Offer] = []
    loss_table: dict[str, LossEntry] = {}
    for plugin, src in plugins:
        others = [p for p in pm.get_plugins() if p is not plugin]
        mine: list[_Offer] = []
        losses: list[tuple[str, Any, str]] = []

        def register_architecture(
            name: str,
            *,
            training: tuple[type, type] | None = None,
            inference: tuple[type, type] | None = None,
            description: str = "",
            _src: Source = src,
            _mine: list[_Offer] = mine,
        ) -> None:
            _mine.append(_Offer(name, training, inference, description, _src))

        def register_loss(name: str, loss: Any, *, description: str = "", _losses: list = losses) -> None:
            _losses.append((name, loss, description))

        for hook_name, registrar in (
            ("register_architectures", register_architecture),
            ("register_aux_losses", register_loss),
        ):
            try:
                pm.subset_hook_caller(hook_name, remove_plugins=others)(register=registrar)
            except Exception as exc:
                report.failed.append((src.describe(), f"{type(exc).__name__}: {exc}"))
                _warn(
                    f"sae-allocators: plugin {src.plugin!r} from {src.describe()} raised in its "
                    f"{hook_name} hook: {type(exc).__name__}: {exc}. Its registrations from that hook "
                    f"were dropped; other plugins are unaffected."
                )
                if hook_name == "register_architectures":
                    mine.clear()
                else:
                    losses.clear()
        for offer in mine:
            if problem := validate_offer(offer):
                report.failed.append((src.describe(), problem))
                _warn(
                    f"sae-allocators: plugin {src.plugin!r} from {src.describe()} offered architecture "
                    f"{offer.name!r}, refused: {problem}."
                )
            else:
                offers.append(offer)
        for name, loss, description in losses:
            if problem := loss_registry.add(loss_table, name, loss, description=description, provider=src.describe()):
                _warn(f"sae-allocators: plugin {src.plugin!r} from {src.describe()}: {problem}")
    return _commit(offers), loss_table


def load(force: bool = False) -> LoadReport:
    """Load every plugin and register its architectures into SAELens (once per process).

    Builds a new :class:`~sae_allocators.plugin_state.PluginState` and publishes it; every other
    module reads that (:func:`state`, :func:`sae_allocators.plugin_state.current`)."""
    global _pending
    if plugin_state.loaded() and not force:
        return plugin_state.current().report
    patches.install()  # every change to SAELens's objects, and why: sae_allocators.patches
    report = LoadReport()
    pm = _new_manager()
    _pending = []
    try:
        plugins = _load_plugins(pm, report)
        report.plugins = [src for _, src in plugins]
        architectures, losses = _collect(pm, plugins, report)
        plugin_state.publish(PluginState(report=report, manager=pm, architectures=architectures, losses=losses))
    finally:
        pending, _pending = _pending, None
    for msg in pending:  # everything is registered; a filter may now turn these into errors
        warnings.warn(msg, PluginWarning, stacklevel=2)
    return report


def state() -> PluginState:
    """The plugin state of the last load (loading first if needed)."""
    load()
    return plugin_state.current()


def providers() -> dict[str, Provider]:
    """Every architecture in SAELens's registries, with who provides it (fresh copies: the
    training / inference flags say what SAELens's registries hold now)."""
    committed = state().architectures
    out: dict[str, Provider] = {}
    for name in reg.all_names():
        prov = committed.get(name)
        if prov is None:
            rec = reg.provider_records().get(name)
            dist, plugin = (rec["distribution"], rec["plugin"]) if rec else _owner_of(name)
            prov = Provider(
                name=name,
                distribution=dist,
                version=_version(dist),
                plugin=plugin,
                has_training=False,
                has_inference=False,
            )
        out[name] = replace(
            prov,
            has_training=reg.get(reg.TRAINING, name) is not None,
            has_inference=reg.get(reg.INFERENCE, name) is not None,
            deferred=list(prov.deferred),
        )
    return out


def _owner_of(name: str) -> tuple[str, str]:
    """(distribution, module) of a name registered outside this host: SAELens's own, or code that
    called ``register_sae_class`` directly."""
    entry = reg.get(reg.TRAINING, name) or reg.get(reg.INFERENCE, name)
    module = entry[0].__module__ if entry else "sae_lens"
    top = module.split(".")[0]
    if top == "sae_lens":
        return SAELENS, "sae_lens"
    dists = md.packages_distributions().get(top, [])
    return (dists[0] if dists else f"(module {top})"), module


def plugin_manager() -> pluggy.PluginManager:
    return state().manager


# modules below the host (sae_folder) load the plugins through plugin_state, not by importing the
# host; looked up at call time, so a patched ``host.load`` is the one that runs
plugin_state.set_loader(lambda: load())
