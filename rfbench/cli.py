"""The ``rfbench`` command.

Each subcommand lives beside the code it drives, in a module that defines
``add_arguments(parser)`` and ``main(args) -> int``; only the invoked one is imported.
Errors print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rfbench._version import __version__
from rfbench.errors import RFBenchError

COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("rfbench.cli", "list feature maps, weight matrices, estimators or suites"),
    "run": ("rfbench.suite.runner", "run a suite (TOML) and write its results folder"),
    "status": ("rfbench.suite.status", "cells done / failed / pending of a run (local or on a cluster)"),
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


def printable(text: str) -> str:
    """``text`` on one line with control characters (newlines, ANSI escapes) shown escaped, so an
    error quoting a user's key or file name cannot rewrite the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def main_entry(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    parser.add_argument("--version", action="version", version=f"rfbench {__version__}")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).main(args) or 0)
    except RFBenchError as exc:
        if debug:
            raise
        print(f"rfbench {args.command}: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rfbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rfbench list | head`: the reader left; nothing more to say
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush to a closed pipe stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run() -> None:
    code = main_entry()
    try:  # what is still buffered goes now, while a closed pipe can be caught
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(code)


if __name__ == "__main__":
    run()
