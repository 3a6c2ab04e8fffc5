"""Loading a GGUF with resident quantized weights, and its entry in the model cache.

The entry is `<models_dir>/<fingerprint>/` with `config.json` (`"weights": "gguf-resident"`, the TPA config, the
resident size), the tokenizer files, and the matrices in the decode kernel's packed layout where this CPU uses it
(`packed_store`); every other weight is read from the GGUF itself, memory-mapped, on every load.
`<models_dir>/sources/<key>.resident.json` maps the source (path, size, mtime) to the fingerprint, so a later load
neither re-hashes the file nor re-parses its tokenizer.

The fingerprint hashes the file's bytes under its own version tag, so it never equals the fingerprint of the same
file converted to float32: factors computed with quantized weights (which differ from float32 ones) get their own
store namespace (tpa_core.store keys namespaces by fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

RESIDENT_KIND = "gguf-resident"
# /2: files from formats.ONE_LEVEL_MIN_BYTES up decode with one activation level (other numerics than /1's);
# /3: matrices in the packed layout sum their products in another order (float rounding differs)
FINGERPRINT_VERSION = "tpa-rag-fingerprint/gguf-resident/3"
_HASH_CHUNK = 16 * 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resident_fingerprint(path: Path, config, tokenizer, numerics: str = "") -> str:
    """sha256 over the version tag, the numerics this machine computes the model with (`_numerics`), the TPA
    config, the GGUF file's bytes and the tokenizer."""
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    digest.update(f"\n{numerics}\n".encode())
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(file_sha256(path).encode())
    digest.update(b"\ntokenizer\n")
    digest.update(tokenizer.fingerprint_text().encode() if tokenizer is not None else b"none")
    return digest.hexdigest()


def _index(models_dir: Path, key: str) -> Path:
    return models_dir / "sources" / f"{key}.resident.json"


_DENSE_TAG = "+dense"  # in an entry's numerics: prefill multiplies float32 copies of the projections


def _numerics(prefill, dense_prefill: bool = False) -> str:
    """What of the model's arithmetic depends on this machine or the load and changes its factors: the prefill
    GEMM's dtype (`formats.prefill_dtype`), and whether it multiplies float32 copies of the weights."""
    return f"prefill={str(prefill).removeprefix('torch.')}" + (_DENSE_TAG if dense_prefill else "")


def holds_dense_prefill(meta: dict) -> bool:
    """Whether a resident entry's model (its config.json `meta`) is loaded with float32 copies for prefill."""
    return str(meta.get("numerics", "")).endswith(_DENSE_TAG)


def _cached_entry(models_dir: Path, key: str, numerics: str) -> tuple[Path, dict] | None:
    from tpa_core.loading import CACHE_FORMAT, CONFIG_FILE

    try:
        fingerprint = json.loads(_index(models_dir, key).read_text(encoding="utf-8"))["fingerprint"]
        folder = models_dir / fingerprint
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (meta.get("format") != CACHE_FORMAT or meta.get("weights") != RESIDENT_KIND
            or meta.get("fingerprint_version") != FINGERPRINT_VERSION or meta.get("numerics", "") != numerics):
        return None
    return folder, meta


def _write_entry(models_dir: Path, key: str, source, config, tokenizer, resident_bytes: int,
                 numerics: str) -> tuple[Path, dict]:
    from tpa_core.loading import CACHE_FORMAT, CONFIG_FILE

    fingerprint = resident_fingerprint(source.path, config, tokenizer, numerics)
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / fingerprint
    meta = {"format": CACHE_FORMAT, "weights": RESIDENT_KIND, "name": source.name, "source": str(source.path),
            "kind": source.kind, "fingerprint": fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
            "numerics": numerics,
            "tpa_config": config.to_dict(),
            "resident_bytes": resident_bytes}
    tmp = Path(tempfile.mkdtemp(prefix=".resident-", dir=models_dir))
    try:
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index = _index(models_dir, key)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"fingerprint": fingerprint, "name": source.name, "source": str(source.path)}),
                     encoding="utf-8")
    return final, meta


def load_resident(source, models_dir: Path, require_tokenizer: bool = True, dense_prefill: bool = False):
    """A LoadedModel of the GGUF `source` with its matrices resident in their blocks (`weights="quantized"`);
    `dense_prefill`: the blocks' projections also held in float32 for prefill (`build_resident_model`). TPAError if
    it does not fit in the available memory (checked before any weight is read)."""
    from tpa_core.config import TPAConfig
    from tpa_core.gguf import GGUFFile
    from tpa_core.loading import QUANTIZED, QUANTIZED_DENSE_PREFILL, LoadedModel, source_key
    from tpa_core.memory import check_fits
    from tpa_core.quant.formats import prefill_dtype
    from tpa_core.quant.resident import build_resident_model, dense_prefill_nbytes, resident_nbytes
    from tpa_core.tokenizer import Tokenizer

    gguf = GGUFFile(source.path, writable_map=True)
    resident = resident_nbytes(gguf) + (dense_prefill_nbytes(gguf) if dense_prefill else 0)
    check_fits(resident, f"{source.name} with quantized weights", "close other programs or pick a smaller model "
               "(a smaller quantization type of it, or fewer parameters)")
    key = source_key(source)
    prefill = prefill_dtype(source.path.stat().st_size)
    numerics = _numerics(prefill, dense_prefill)
    entry = _cached_entry(models_dir, key, numerics)
    if entry is not None:
        folder, meta = entry
        config = TPAConfig.from_dict(meta["tpa_config"])
        tokenizer = Tokenizer.load(folder) if (folder / "tokenizer.json").is_file() else None
    else:
        config = TPAConfig.from_hf_config(gguf.hf_config())
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, source=source.path.name)
        folder, meta = _write_entry(models_dir, key, source, config, tokenizer, resident, numerics)
    if tokenizer is None and require_tokenizer:
        raise TPAError(f"no tokenizer found in {source.path}")
    model = build_resident_model(gguf, config, packed_dir=folder, prefill=prefill, dense_prefill=dense_prefill)
    logger.info("loaded %s with quantized weights%s: %.0f MiB resident", source.path.name,
                " (and float32 copies of the projections for prefill)" if dense_prefill else "", resident / 2**20)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, fingerprint=meta["fingerprint"],
                       chat_template=tokenizer.chat_template if tokenizer is not None else None,
                       name=meta.get("name", source.name), source=source.path, cache_dir=folder,
                       weights=QUANTIZED_DENSE_PREFILL if dense_prefill else QUANTIZED)
