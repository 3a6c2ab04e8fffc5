"""`tpa-rag`: the command-line entry point. Reads the settings once and hands them to a sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from app.commands import COMMAND_MODULES
from app.errors import user_error_types
from app.settings import Settings

log = logging.getLogger("tpa_rag")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpa-rag",
        description="Local long-context document and code assistant on Tensor Product Attention factor caches.",
    )
    parser.add_argument("--data-dir", help="data directory (env TPA_RAG_HOME; default: the user's data dir)")
    parser.add_argument("--model", help="model name, local folder or .gguf file (default: smollm2-135m-instruct)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the model runs (default auto)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # an area whose commands are not built yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        settings = Settings.from_env(data_dir=args.data_dir, model=args.model, device=args.device, verbose=args.verbose)
        return int(args.handler(args, settings) or 0)
    except user_error_types() as exc:
        print(f"tpa-rag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
