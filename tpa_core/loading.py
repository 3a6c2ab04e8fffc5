"""Loading a model: a known name, a GGUF file, a Hugging Face safetensors folder or an official T6 checkpoint.

    loaded = load_model("smollm2-135m-instruct", settings.models_dir)   # or a folder / .gguf path
    loaded.model, loaded.tokenizer, loaded.config, loaded.fingerprint

The first load of a source converts it (dequantize a GGUF, map HF or T6 weights to TPA names), computes the
model's fingerprint - sha256 over the TPA config, every weight (name, dtype, shape, bytes), the tokenizer and the
chat template - and keeps the result in the model cache, `<models_dir>/<fingerprint>/`:

    model.safetensors     TPA state dict (docs/interfaces.md names), float32
    config.json           {"format", "name", "source", "fingerprint", "tpa_config": TPAConfig.to_dict()}
    tokenizer.json, tokenizer_meta.json, chat_template.jinja   (tpa_core.tokenizer; absent without a tokenizer)

`<models_dir>/sources/<key>.json` remembers which fingerprint a source (path, size, mtime of its files) gave, so a
later load goes straight to the cache: safetensors memory-mapped, the model built on the meta device and the
weights assigned, no conversion and no re-hashing.

Every user mistake (unknown name, missing or damaged file, unsupported architecture, missing tokenizer) is a
`TPAError` with a message that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpa_core import registry
from tpa_core.config import HF_ARCHITECTURES, TPAConfig
from tpa_core.errors import TPAError
from tpa_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_FORMAT = "tpa-rag-model/2"  # the layout of a cache folder
FINGERPRINT_VERSION = "tpa-rag-fingerprint/1"  # what the fingerprint hashes (changing it re-keys every store)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHT_MODES = ("auto", "float", "quantized")
# Under weights="auto" (see choose_weights), GGUF files from AUTO_QUANTIZED_MIN_BYTES up load with quantized
# resident weights, and from AUTO_DENSE_PREFILL_MIN_BYTES up to that size with quantized weights for decode and
# float32 copies of the projections for prefill (the default model: decode 5x faster than float32, prefill the
# float32 model's; benchmarks/NOTES.md). Smaller files load in float32: their weights stream from the CPU's caches.
AUTO_QUANTIZED_MIN_BYTES = 256 * 2**20
AUTO_DENSE_PREFILL_MIN_BYTES = 16 * 2**20
# What choose_weights returns: how the loaded model holds its weights.
FLOAT, QUANTIZED, QUANTIZED_DENSE_PREFILL = "float", "quantized", "quantized+float32 prefill"
T6_KEYS = ("n_layer", "n_head", "n_embd", "rank")
# Files of a source folder whose size/mtime identify a version of it.
_SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "chat_template.json", "pytorch_model.bin", "model.safetensors.index.json")


@dataclass
class LoadedModel:
    """A model ready to run: `model` (TPAModel, eval mode), `tokenizer` (None only when loaded with
    `require_tokenizer=False` from a source without one), `config`, `fingerprint` (64 hex chars),
    `chat_template` (None if the model has none), `name` (the known name, or the source's file/folder name),
    `source` (the original path), `cache_dir` (the converted copy)."""

    model: Any
    tokenizer: Tokenizer | None
    config: TPAConfig
    fingerprint: str
    chat_template: str | None
    name: str
    source: Path
    cache_dir: Path
    weights: str = "float"  # FLOAT, QUANTIZED or QUANTIZED_DENSE_PREFILL: how the matrices are held (choose_weights)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The factor cache's dtype (`TPAModel.cache_dtype`): what the store's namespace is keyed by."""
        return self.model.cache_dtype

    @property
    def context_window(self) -> int:
        return self.config.max_position_embeddings


@dataclass(frozen=True)
class Source:
    """A resolved model source: `kind` is "gguf", "hf" or "t6"."""

    name: str
    path: Path
    kind: str


def load_model(name_or_path: str | Path, models_dir: str | Path, device: str = "auto",
               dtype: torch.dtype | None = None, *, fetch: bool = True, require_tokenizer: bool = True,
               weights: str = "auto") -> LoadedModel:
    """Load a model by known name (fetched on first use when `fetch`) or local path, through the model cache.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". dtype: None = `default_dtype` (bfloat16 on
    CUDA; float32 on the CPU but for bfloat16 Hugging Face weights on a CPU with a fast bf16 GEMM). A T6
    checkpoint folder without a tokenizer.json loads only with `require_tokenizer=False` (token ids in, token ids
    out). weights (`choose_weights`): "float" (converted to `dtype`), "quantized" (a
    GGUF's matrices stay in their blocks on the CPU, `tpa_core.quant`) or "auto" (by the file's size on the CPU:
    quantized, quantized for decode with float32 copies for prefill, or float). TPAError when the model will not
    fit in the available memory, before anything large is read.
    """
    if weights not in WEIGHT_MODES:
        raise TPAError(f"unknown weights mode {weights!r}: use {', '.join(WEIGHT_MODES)}")
    models_dir = Path(models_dir).expanduser()
    target_device = resolve_device(device)
    source = resolve_source(name_or_path, models_dir, fetch=fetch)
    mode = choose_weights(weights, source, target_device, dtype)
    if mode != FLOAT:
        from tpa_core.quant.cache import load_resident

        return load_resident(source, models_dir, require_tokenizer, dense_prefill=mode == QUANTIZED_DENSE_PREFILL)
    if dtype is None:
        dtype = default_dtype(source, target_device)
    return _load_converted(source, models_dir, target_device, dtype, require_tokenizer)


def default_dtype(source: Source, device: torch.device) -> torch.dtype:
    """The compute dtype when none is asked for: bfloat16 on CUDA. On the CPU float32, except a Hugging Face
    folder whose weights are bfloat16 on a CPU whose bf16 GEMM is fast (`tpa_core.quant.ops.fast_bf16_gemm`:
    AMX or AVX-512 BF16; there a bf16 prefill GEMM ran 2-6x and a decode GEMV 1.2-1.5x float32's,
    benchmarks/NOTES.md): it stays
    bfloat16 rather than doubling to float32. float16 weights become float32 (no fast float16 GEMM measured)."""
    from tpa_core.quant.ops import fast_bf16_gemm

    if device.type == "cuda":
        return torch.bfloat16
    if source.kind == "hf" and _hf_weights_dtype(source.path) == "bfloat16" and fast_bf16_gemm():
        return torch.bfloat16
    return torch.float32


def _hf_weights_dtype(folder: Path) -> str | None:
    """The dtype a Hugging Face folder's config.json gives its weights ("torch_dtype", or "dtype" in newer
    transformers), or None when it names none or cannot be read."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("torch_dtype", config.get("dtype")) if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def choose_weights(weights: str, source: Source, device: torch.device, dtype: torch.dtype | None) -> str:
    """FLOAT, QUANTIZED or QUANTIZED_DENSE_PREFILL for a weights mode ("auto", "float", "quantized"); TPAError for
    a quantized request that cannot run (not a GGUF, not the CPU, a dtype other than float32, no compiled op)."""
    if weights == "float":
        return FLOAT
    from tpa_core.quant import ops

    runnable = source.kind == "gguf" and device.type == "cpu" and dtype in (None, torch.float32)
    if weights == "auto":
        if not (runnable and ops.available()):
            return FLOAT
        size = source.path.stat().st_size
        if size >= AUTO_QUANTIZED_MIN_BYTES:
            return QUANTIZED
        return QUANTIZED_DENSE_PREFILL if size >= AUTO_DENSE_PREFILL_MIN_BYTES else FLOAT
    if not runnable:
        raise TPAError(f"quantized weights run GGUF models on the CPU in float32; {source.path} is a "
                       f"{source.kind} model on {device} ({dtype or 'default dtype'}): use --weights float")
    try:
        ops.load()
    except ops.OpsUnavailable as exc:
        raise TPAError(f"quantized weights need the compiled op, which is not available: {exc}\n"
                       f"run `make setup` (it builds the op), or use --weights float") from None
    return QUANTIZED


def _load_converted(source: Source, models_dir: Path, target_device: torch.device, dtype: torch.dtype,
                    require_tokenizer: bool) -> LoadedModel:
    from tpa_core.memory import check_fits

    cache_dir = cached_dir_for(source, models_dir)
    if cache_dir is None:
        if source.kind == "gguf":  # conversion holds the float32 HF state dict and the model's copy of it
            check_fits(2 * _gguf_float32_bytes(source.path), f"converting {source.name} to float32",
                       "load it with --weights quantized instead (its matrices stay in their GGUF blocks)")
        cache_dir = convert_to_cache(source, models_dir)
    weight_bytes = (cache_dir / WEIGHTS_FILE).stat().st_size * torch.finfo(dtype).bits // 32
    check_fits(weight_bytes, f"{source.name} in {str(dtype).removeprefix('torch.')}",
               "load a GGUF of it with --weights quantized, or pick a smaller model")
    try:
        return _load_cached(cache_dir, source, target_device, dtype, require_tokenizer)
    except _DamagedCache as exc:
        logger.warning("model cache %s is damaged (%s); converting %s again", cache_dir, exc, source.path)
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir = convert_to_cache(source, models_dir)
        return _load_cached(cache_dir, source, target_device, dtype, require_tokenizer)


def _gguf_float32_bytes(path: Path) -> int:
    """Bytes of every tensor of a GGUF file in float32."""
    from tpa_core.gguf import GGUFFile

    gguf = GGUFFile(path)
    return sum(4 * torch.Size(gguf.shape(name)).numel() for name in gguf.tensor_names)


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TPAError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise TPAError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


# ----- sources ---------------------------------------------------------------------------------------------
def resolve_source(name_or_path: str | Path, models_dir: Path, *, fetch: bool = True) -> Source:
    """A known model name (fetched if missing and `fetch`) or a local .gguf file / model folder."""
    text = str(name_or_path)
    if text in registry.KNOWN_MODELS:
        if not registry.is_fetched(text, models_dir):
            if not fetch:
                raise TPAError(f"model {text!r} is not fetched yet: run `tpa-rag models fetch {text}`")
            logger.warning("fetching %s (first use)", text)
            registry.fetch(text, models_dir)
        return Source(name=text, path=registry.download_path(text, models_dir), kind="gguf")
    path = Path(text).expanduser()
    if not path.exists():
        if os.sep in text or text.endswith((".gguf", ".bin", ".safetensors")) or text.startswith("."):
            raise TPAError(f"model path not found: {path}")
        raise TPAError(f"unknown model {text!r}: known models are {', '.join(registry.known_names())}; "
                       f"or pass a local Hugging Face folder, T6 checkpoint folder or .gguf file")
    path = path.resolve()
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise TPAError(f"{path} is not a GGUF file (no GGUF magic); a model is a .gguf file or a folder "
                           f"with config.json")
        return Source(name=path.stem, path=path, kind="gguf")
    config = _read_config(path)
    if config.get("model_type") == "gpt2" and all(key in config for key in T6_KEYS):
        return Source(name=path.name, path=path, kind="t6")
    model_type = config.get("model_type")
    if model_type in HF_ARCHITECTURES:
        return Source(name=path.name, path=path, kind="hf")
    raise TPAError(f"unsupported architecture in {path / CONFIG_FILE}: model_type={model_type!r} "
                   f"(architectures={config.get('architectures')!r}); supported: {', '.join(HF_ARCHITECTURES)} "
                   f"Hugging Face folders, GGUF files of those, and official T6 checkpoints")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise TPAError(f"{folder} is not a model folder: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TPAError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TPAError(f"{path} does not hold a JSON object")
    return data


def source_key(source: Source) -> str:
    """sha256 over the source's path and the sizes/mtimes of its files (changes when any file changes)."""
    entries = [source.kind, str(source.path)]
    files = [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.name in _SOURCE_FILES or p.suffix == ".safetensors")
    for p in files:
        stat = p.stat()
        entries.append(f"{p.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _index_path(models_dir: Path, key: str) -> Path:
    return models_dir / "sources" / f"{key}.json"


def cached_dir_for(source: Source, models_dir: Path) -> Path | None:
    """The cache folder this exact source was converted into before, if it is still there."""
    index = _index_path(models_dir, source_key(source))
    if not index.is_file():
        return None
    try:
        fingerprint = json.loads(index.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None
    folder = models_dir / fingerprint
    return folder if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file() else None


# ----- conversion ------------------------------------------------------------------------------------------
def convert_source(source: Source) -> tuple[TPAConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Read a source and convert it: (TPA config, TPA state dict in float32, tokenizer or None)."""
    from tpa_core import convert

    if source.kind == "gguf":
        from tpa_core.gguf import GGUFFile

        gguf = GGUFFile(source.path)
        config = TPAConfig.from_hf_config(gguf.hf_config())
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=source.path.name)
        state = convert.hf_llama_family_to_tpa(gguf.hf_state_dict(), config)
        return config, state, tokenizer
    if source.kind == "hf":
        hf_config = _read_config(source.path)
        config = TPAConfig.from_hf_config(hf_config)
        tokenizer = Tokenizer.from_hf_folder(source.path, eos_token_ids=list(config.eos_token_ids))
        state = convert.hf_llama_family_to_tpa(_read_hf_weights(source.path), config)
        return config, state, tokenizer
    if source.kind == "t6":
        t6_config = _read_config(source.path)
        weights = _read_torch_bin(source.path / "pytorch_model.bin")
        kv_only = any(key.endswith("attn.c_qkv.c_q.weight") for key in weights)
        config = TPAConfig.from_t6_config(t6_config, kv_only=kv_only)
        state = convert.t6_to_tpa(weights, config)
        tokenizer = None
        if (source.path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_hf_folder(source.path, eos_token_ids=list(config.eos_token_ids))
        return config, state, tokenizer
    raise TPAError(f"unknown source kind {source.kind!r}")


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if (folder / "pytorch_model.bin").is_file():
            return _read_torch_bin(folder / "pytorch_model.bin")
        raise TPAError(f"no weights in {folder}: expected *.safetensors (or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TPAError(f"{path} is not a readable safetensors file ({exc})") from None
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TPAError(f"missing weights file {path}")
    try:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        raise TPAError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TPAError(f"{path} does not hold a state dict of tensors")
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def fingerprint(config: TPAConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer | None) -> str:
    """sha256 over the TPA config, every weight (name, dtype, shape, bytes), the tokenizer and chat template."""
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    digest.update(b"\ntokenizer\n")
    digest.update(tokenizer.fingerprint_text().encode() if tokenizer is not None else b"none")
    return digest.hexdigest()


def convert_to_cache(source: Source, models_dir: Path) -> Path:
    """Convert `source` and write it into the model cache (atomically); returns the cache folder."""
    from safetensors.torch import save_file

    logger.info("converting %s (%s) into the model cache", source.path, source.kind)
    config, state, tokenizer = convert_source(source)
    state = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    fp = fingerprint(config, state, tokenizer)
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / fp
    if not (final / CONFIG_FILE).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=models_dir))
        try:
            # Stored as the model's own parameters (fused projections included), so a load assigns the
            # memory-mapped tensors without a copy; the fingerprint above is over the interface names.
            model = build_model(config, state, "cpu", torch.float32)
            params = {name: p.detach().contiguous() for name, p in model.named_parameters()}
            save_file(params, str(tmp / WEIGHTS_FILE), metadata={"format": CACHE_FORMAT})
            del model, params
            if tokenizer is not None:
                tokenizer.save(tmp)
            meta = {"format": CACHE_FORMAT, "name": source.name, "source": str(source.path), "kind": source.kind,
                    "fingerprint": fp, "tpa_config": config.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if final.exists():  # a damaged earlier copy
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    index = _index_path(models_dir, source_key(source))
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"fingerprint": fp, "name": source.name, "source": str(source.path)}),
                     encoding="utf-8")
    return final


def list_cached(models_dir: str | Path) -> list[dict[str, Any]]:
    """The models in the cache: name, fingerprint, kind, source, size_mb (on disk in the cache), weights
    ("float32", "quantized" or "quantized+float32 prefill"), resident_mb (memory its weights take when loaded),
    n_layers, arch, path."""
    models_dir = Path(models_dir)
    out = []
    if not models_dir.is_dir():
        return out
    for folder in sorted(models_dir.iterdir()):
        if not (folder / CONFIG_FILE).is_file() or folder.name.startswith("."):
            continue
        try:
            meta = read_cache_meta(folder)
        except _DamagedCache:
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        config = meta.get("tpa_config", {})
        resident = meta.get("resident_bytes")  # quantized entries; a float32 entry holds its weights file
        if resident is None and (folder / WEIGHTS_FILE).is_file():
            resident = (folder / WEIGHTS_FILE).stat().st_size
        out.append({"name": meta.get("name"), "fingerprint": meta.get("fingerprint"), "kind": meta.get("kind"),
                    "source": meta.get("source"), "size_mb": round(size / 2**20, 1),
                    "weights": _weights_of(meta),
                    "resident_mb": None if resident is None else round(resident / 2**20, 1),
                    "n_layers": config.get("n_layers"), "arch": config.get("arch"), "path": str(folder)})
    return out


def _weights_of(meta: dict[str, Any]) -> str:
    """How a cached model holds its weights once loaded, for `list_cached`."""
    from tpa_core.quant.cache import RESIDENT_KIND, holds_dense_prefill

    if meta.get("weights") != RESIDENT_KIND:
        return "float32"
    return QUANTIZED_DENSE_PREFILL if holds_dense_prefill(meta) else QUANTIZED


# ----- loading from the cache ------------------------------------------------------------------------------
class _DamagedCache(Exception):
    pass


def read_cache_meta(cache_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((cache_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _DamagedCache(f"config.json: {exc}") from None
    if meta.get("format") != CACHE_FORMAT:
        raise _DamagedCache(f"unknown cache format {meta.get('format')!r}")
    return meta


def _load_cached(cache_dir: Path, source: Source, device: torch.device, dtype: torch.dtype,
                 require_tokenizer: bool) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_cache_meta(cache_dir)
    config = TPAConfig.from_dict(meta["tpa_config"])
    try:
        # load_file memory-maps the file: the tensors are views of the page cache until written to.
        params = load_file(str(cache_dir / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _DamagedCache(f"{WEIGHTS_FILE}: {exc}") from None
    tokenizer = Tokenizer.load(cache_dir) if (cache_dir / "tokenizer.json").is_file() else None
    if tokenizer is None and require_tokenizer:
        raise TPAError(f"no tokenizer found for {source.path}: a T6 checkpoint folder must bring a GPT-2 "
                       f"tokenizer.json next to its config.json (tiktoken's 'gpt2' needs the internet)")
    model = assign_parameters(config, params, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, fingerprint=meta["fingerprint"],
                       chat_template=tokenizer.chat_template if tokenizer is not None else None,
                       name=meta.get("name", source.name), source=source.path, cache_dir=cache_dir)


@contextlib.contextmanager
def skip_init():
    """Make torch.nn.init's in-place initializers no-ops while a model whose weights will be loaded is built.

    Random init is wasted work here, and on meta tensors it goes through torch._refs, whose first use imports
    torch._dynamo (about 2 s on this CPU): more than the whole load from the model cache otherwise takes.
    """
    names = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "trunc_normal_", "orthogonal_")
    saved = {name: getattr(torch.nn.init, name) for name in names if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def assign_parameters(config: TPAConfig, params: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32):
    """A TPAModel whose parameters are `params` (named as `model.named_parameters()`), assigned without a copy
    when device and dtype already match. A layout that does not fit the model is a damaged cache entry."""
    from tpa_core.model import TPAModel

    with skip_init():
        model = TPAModel(config, device="meta", dtype=dtype)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: tuple(t.shape) for name, t in params.items()}
    if expected != found:
        raise _DamagedCache(f"parameter layout differs from the model's ({sorted(set(expected) ^ set(found))[:3]})")
    declared = {name: p.dtype for name, p in model.named_parameters()}  # norms: float32 in a 16-bit model
    for name, tensor in params.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, attr, torch.nn.Parameter(tensor.to(device=device, dtype=declared[name]), requires_grad=False))
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise _DamagedCache("some model tensors were not in the file")
    return model.eval()


def build_model(config: TPAConfig, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32):
    """A TPAModel holding `state` (TPA names), in eval mode, without a random initialization pass."""
    from tpa_core.model import TPAModel

    device = torch.device(device)
    # Parameters on the meta device cost nothing to create; to_empty allocates them once, uninitialized, and
    # load_state_dict fills them (the fused projections are concatenated from their named parts there).
    with skip_init():
        model = TPAModel(config, device="meta", dtype=dtype)
    model = model.to_empty(device=device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise TPAError(f"the weights do not fit the model config: {exc}") from None
    if missing or unexpected:
        raise TPAError(f"the weights do not fit the model config: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()
