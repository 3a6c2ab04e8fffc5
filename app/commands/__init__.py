"""Sub-commands of `tpa-rag`, one module per area. Each module has `register(subparsers)`; every parser it adds
sets `handler=fn(args, settings) -> int` with `set_defaults`."""

COMMAND_MODULES = (
    "app.commands.engine",  # generate, chat, models: the model alone, no documents
    "app.commands.cache",  # cache stats|verify|gc|clear
    "app.commands.corpus",  # ingest, search, collections
    "app.commands.assistant",  # serve, ask, sessions: the document assistant
)
