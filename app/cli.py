"""`tpa-rag`: the command-line entry point. Reads the settings once and hands them to a sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from app.commands import COMMAND_MODULES
from app.errors import AppError, user_error_types
from app.settings import Settings

log = logging.getLogger("tpa_rag")


def _check_device(device: str) -> None:
    """`--device cuda` needs a GPU that PyTorch can use; say so before anything loads."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        reason = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise AppError(f"--device cuda: {reason}; use --device cpu (or auto)")


def _database_error(exc: BaseException, settings: Settings | None) -> str | None:
    """A message for a database that cannot be reached or opened; None for any other exception."""
    from sqlalchemy.exc import OperationalError

    if not isinstance(exc, OperationalError):
        return None
    from sqlalchemy.engine import make_url

    where = make_url(settings.db_url).render_as_string(hide_password=True) if settings else "the database"
    reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
    return f"cannot use the database {where}: {reason}"


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
    settings = None
    try:
        settings = Settings.from_env(data_dir=args.data_dir, model=args.model, device=args.device, verbose=args.verbose)
        _check_device(settings.device)
        return int(args.handler(args, settings) or 0)
    except user_error_types() as exc:
        print(f"tpa-rag: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = _database_error(exc, settings)
        if message is None:
            raise
        print(f"tpa-rag: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
