"""Runtime settings: one object, read once at the entry point and passed down.

Nothing else in the code base reads environment variables; library code takes what it needs from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CACHE_BUDGET_BYTES = 4 * 1024**3


def _default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("tpa-rag", appauthor=False))


def _number(env, name: str, kind: type, default):
    """A numeric environment variable; a malformed value is a user error that names the variable."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        from app.errors import AppError

        raise AppError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


WEIGHT_MODES = ("auto", "float", "quantized")  # as tpa_core.loading.WEIGHT_MODES (app may not import it here)


def _flag(env, name: str, default: bool | None) -> bool | None:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off, `default` when unset; anything else is a
    user error."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    from app.errors import AppError

    raise AppError(f"{name}={raw!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")


def _check_data_dir(path: Path) -> Path:
    """`path` unless it, or the nearest of its parents that exists, is not a folder."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                from app.errors import AppError

                raise AppError(f"the data directory {str(path)!r} cannot be made: {str(existing)!r} is a file, not "
                               "a folder (--data-dir or TPA_RAG_HOME)")
            break
    return path


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Everything the app, the CLI and the services are configured with."""

    data_dir: Path
    database_url: str = ""  # "" = SQLite file in the data directory
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    weights: str = "auto"  # auto | float | quantized (tpa_core.loading.choose_weights)
    attention_backend: str = "auto"  # auto | torch | triton
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES
    embedding_model: str = ""  # "" = the offline all-MiniLM-L6-v2 package
    top_k: int | None = None  # None = chosen for the model (app.retrieval_plan); a number always wins
    context_tokens: int | None = None  # a token budget for retrieved chunks instead of the model's default
    context_order: str = "canonical"  # canonical | relevance (app.asking.CONTEXT_ORDERS)
    max_new_tokens: int = 256
    temperature: float = 0.0
    max_ingest_chunks: int = 100_000  # chunks one ingestion may embed (retrieval.IngestLimits.max_chunks)
    # Retrieval mode: assemble retrieved chunks from their chunk caches, recomputing the first
    # `chunk_boundary_tokens` of each and the `chunk_recompute_ratio` share that deviates most (README, "Chunk reuse";
    # False = exact prefix reuse only; None = where it pays, `app.chunk_reuse.reuse_pays_on`).
    chunk_reuse: bool | None = None
    chunk_boundary_tokens: int = 16
    chunk_recompute_ratio: float = 0.0
    verbose: int = 0
    allowed_hosts: tuple[str, ...] = ()  # Host names the web server answers to besides loopback and --host
    use_server: bool = True  # `ask` answers through a server running on the same data folder, if there is one
    ingest_roots: tuple[Path, ...] = ()  # folders whose insides web visitors may ingest by path; () = uploads only
    models: tuple[str, ...] = ()  # models web visitors may switch to, besides `model`
    api_keys: tuple[str, ...] = ()  # keys the OpenAI-compatible API accepts; () = no key needed (loopback only)
    extra: dict = field(default_factory=dict)

    # The data directory's layout (README, "Settings": TPA_RAG_HOME).
    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "tpa_rag.sqlite"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def indexes_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    def ingest_limits(self):
        """The ingestion's safety limits (`retrieval.IngestLimits`), with the chunk cap set here."""
        from retrieval.sources import IngestLimits

        if self.max_ingest_chunks < 1:
            from app.errors import AppError

            raise AppError(f"TPA_RAG_MAX_INGEST_CHUNKS must be positive, got {self.max_ingest_chunks}")
        return IngestLimits(max_chunks=self.max_ingest_chunks)

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from TPA_RAG_* environment variables; explicit overrides (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict = {
            "data_dir": Path(env["TPA_RAG_HOME"]) if env.get("TPA_RAG_HOME") else None,
            "database_url": env.get("TPA_RAG_DATABASE_URL", ""),
            "model": env.get("TPA_RAG_MODEL", DEFAULT_MODEL),
            "device": env.get("TPA_RAG_DEVICE", "auto"),
            "weights": env.get("TPA_RAG_WEIGHTS", "auto"),
            "attention_backend": env.get("TPA_RAG_ATTENTION_BACKEND", "auto"),
            "cache_budget_bytes": _number(env, "TPA_RAG_CACHE_BUDGET_BYTES", int, DEFAULT_CACHE_BUDGET_BYTES),
            "embedding_model": env.get("TPA_RAG_EMBEDDING_MODEL", ""),
            "top_k": _number(env, "TPA_RAG_TOP_K", int, None),
            "context_tokens": _number(env, "TPA_RAG_CONTEXT_TOKENS", int, None),
            "context_order": env.get("TPA_RAG_CONTEXT_ORDER", "canonical"),
            "max_new_tokens": _number(env, "TPA_RAG_MAX_NEW_TOKENS", int, cls.max_new_tokens),
            "temperature": _number(env, "TPA_RAG_TEMPERATURE", float, cls.temperature),
            "max_ingest_chunks": _number(env, "TPA_RAG_MAX_INGEST_CHUNKS", int, cls.max_ingest_chunks),
            "allowed_hosts": _names(env.get("TPA_RAG_ALLOWED_HOSTS", "")),
            "use_server": _flag(env, "TPA_RAG_USE_SERVER", cls.use_server),
            "ingest_roots": tuple(Path(p) for p in env.get("TPA_RAG_INGEST_ROOTS", "").split(os.pathsep) if p),
            "models": _names(env.get("TPA_RAG_MODELS", "")),
            "api_keys": _names(env.get("TPA_RAG_API_KEYS", "")) + _names(env.get("TPA_RAG_API_KEY", "")),
            "chunk_reuse": _flag(env, "TPA_RAG_CHUNK_REUSE", cls.chunk_reuse),
            "chunk_boundary_tokens": _number(env, "TPA_RAG_CHUNK_BOUNDARY_TOKENS", int, cls.chunk_boundary_tokens),
            "chunk_recompute_ratio": _number(env, "TPA_RAG_CHUNK_RECOMPUTE_RATIO", float, cls.chunk_recompute_ratio),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["weights"] not in WEIGHT_MODES:
            from app.errors import AppError

            raise AppError(f"TPA_RAG_WEIGHTS={values['weights']!r} is not one of {', '.join(WEIGHT_MODES)}")
        if values["data_dir"] is None:
            values["data_dir"] = _default_data_dir()
        values["data_dir"] = _check_data_dir(Path(values["data_dir"]).expanduser().resolve())
        values["ingest_roots"] = tuple(Path(p).expanduser().resolve() for p in values["ingest_roots"])
        return cls(**values)
