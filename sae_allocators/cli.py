"""The ``sae-allocators`` command line: ``list``, ``train``, ``calibrate``, ``push``, ``load``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}
#: subcommands that parse their own arguments: they get ``Namespace(argv=[...rest of the line])``
_RAW: set[str] = set()


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None, raw: bool = False):
    """Decorator registering a subcommand (each module adding one stays self-contained).

    ``raw=True``: the command parses the rest of the line itself (``train`` hands it to SAELens's parser).
    """

    def wrap(fn: Command) -> Command:
        _COMMANDS[name] = fn
        if raw:
            _RAW.add(name)
        if all(n != name for n, _, _ in _PARSER_SETUP):
            _PARSER_SETUP.append((name, help, configure))
        return fn

    return wrap


_PARSER_SETUP: list[tuple[str, str, Callable[[argparse.ArgumentParser], None] | None]] = []


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also list SAELens's own architectures")


@command("list", "list SAE architectures and what provides them", _list_args)
def cmd_list(args: argparse.Namespace) -> int:
    from sae_allocators import host

    report = host.load()
    rows = [("architecture", "provided by", "training", "inference", "notes")]
    for name, prov in sorted(host.providers().items()):
        if prov.is_saelens and not args.all and not prov.deferred:
            continue
        notes = prov.description
        if prov.deferred:
            notes = f"also offered by {', '.join(prov.deferred)} (deferred)"
        rows.append(
            (
                name,
                f"{prov.distribution} {prov.version}",
                "yes" if prov.has_training else "no",
                "yes" if prov.has_inference else "no",
                notes,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    if not report.external_enabled:
        print("(external plugins disabled by SAE_ALLOCATORS_DISABLE_PLUGINS)")
    for who, err in report.failed:
        print(f"failed: {who}: {err}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="sae-allocators", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help, configure in _PARSER_SETUP:
        if name in _RAW:
            sub.add_parser(name, help=help, add_help=False).add_argument("argv", nargs=argparse.REMAINDER)
            continue
        p = sub.add_parser(name, help=help, description=help)
        if configure is not None:
            configure(p)
    return parser


#: modules that add subcommands with @command (imported lazily so `list` stays fast)
COMMAND_MODULES: tuple[str, ...] = (
    "sae_allocators.workflow.train",
    "sae_allocators.workflow.push",
    "sae_allocators.workflow.load",
    "sae_allocators.benchmark.cli",
    "sae_allocators.workflow.calibrate",
)


def _load_command_modules() -> None:
    import importlib

    for mod in COMMAND_MODULES:
        importlib.import_module(mod)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_command_modules()
    if argv and argv[0] in _RAW:
        return _COMMANDS[argv[0]](argparse.Namespace(command=argv[0], argv=argv[1:]))
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    # `python -m sae_allocators.cli`: run the importable module, where subcommands register themselves
    from sae_allocators.cli import main as _main

    raise SystemExit(_main())
