"""The ``rfbench`` command.

Each subcommand lives beside the code it drives, in a module that defines
``add_arguments(parser)`` and ``main(args) -> int``; only the invoked one is imported.
Errors print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rfbench.errors import RFBenchError

COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("rfbench.cli", "list feature maps, weight matrices, estimators or suites"),
    "run": ("rfbench.suite.runner", "run a suite (TOML) and write its results folder"),
    "report": ("rfbench.report.html", "render plots, tables and report.html from a results folder"),
    "compare": ("rfbench.report.compare", "compare two results folders; exit 1 on a regression"),
    "capture": ("rfbench.data.capture", "capture queries/keys/values from a local pretrained model"),
    "describe": ("rfbench.data.describe", "norms and anisotropy of captured queries/keys"),
    "audit": ("rfbench.audit.report", "conformance checks of an RF attention implementation"),
}

LIST_WHAT = ("feature-maps", "weight-matrices", "estimators", "suites")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="estimators", choices=LIST_WHAT)
    parser.add_argument(
        "--all", action="store_true", help="with estimators: also list pairs that cannot work, and why"
    )


def main(args: argparse.Namespace) -> int:
    from rfbench import registry

    if args.what == "feature-maps":
        for name in registry.feature_maps():
            cls = registry.feature_map_class(name)
            print(f"{name:<10} {cls.description}  [target: {cls.target}]")
    elif args.what == "weight-matrices":
        for name in registry.weight_matrices():
            print(f"{name:<10} {registry.weight_matrix_class(name).description}")
    elif args.what == "estimators":
        for fm in registry.feature_maps():
            for wm in registry.weight_matrices():
                reasons = registry.pair_reasons(fm, wm)
                if not reasons:
                    print(f"{fm}-{wm}")
                elif args.all:
                    print(f"{fm}-{wm}  (unsupported: {'; '.join(reasons)})")
    else:
        from rfbench.suite_paths import list_suites

        for path in list_suites():
            print(path)
    return 0


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rfbench",
        description="Benchmark random-feature approximations of the softmax kernel.",
        epilog="Add --debug anywhere to see the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main_entry(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).main(args) or 0)
    except RFBenchError as exc:
        if debug:
            raise
        print(f"rfbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rfbench: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    sys.exit(main_entry())


if __name__ == "__main__":
    run()
