"""The ``sae-allocators`` command line: ``list``, ``train``, ``calibrate``, ``push``, ``load``, ``bench``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from sae_allocators.benchmark import cli as bench_cli
from sae_allocators.workflow import calibrate, load, push, train


@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(args)`` returns the exit status.

    ``raw=True``: the command parses the rest of the line itself (``train`` hands it to SAELens's
    parser); it gets ``Namespace(argv=[...rest of the line])``.
    """

    run: Callable[[argparse.Namespace], int]
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    raw: bool = False


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also list SAELens's own architectures")


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


#: every subcommand, in the order ``--help`` lists them
COMMANDS: dict[str, Command] = {
    "list": Command(cmd_list, "list SAE architectures and what provides them", _list_args),
    "train": Command(train.cmd_train, train.HELP, raw=True),
    "push": Command(push.cmd_push, push.HELP, push.add_arguments),
    "load": Command(load.cmd_load, load.HELP, load.add_arguments),
    "bench": Command(bench_cli.cmd_bench, bench_cli.HELP, raw=True),
    "calibrate": Command(calibrate.cmd_calibrate, calibrate.HELP, raw=True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-allocators", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        if cmd.raw:
            sub.add_parser(name, help=cmd.help, add_help=False, allow_abbrev=False).add_argument(
                "argv", nargs=argparse.REMAINDER
            )
            continue
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, allow_abbrev=False)  # `--rep` is not --repo
        if cmd.configure is not None:
            cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].raw:
        return COMMANDS[argv[0]].run(argparse.Namespace(command=argv[0], argv=argv[1:]))
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
