"""Llama-shaped GGUF files with random valid blocks, for benchmarking quantized weights at real model sizes.

    .venv/bin/python benchmarks/synthetic_gguf.py OUT_DIR [--shapes 1b,3b] [--mixes q4_k_m,q5_k_m,q8_0,q4_0]

Shapes follow Llama-3.2-1B and -3B (tied embeddings). Mixes follow llama.cpp's file types: Q4_K_M puts attn_v and
ffn_down in Q6_K on the first and last eighth of the layers and every third layer between (llama.cpp's
"use_more_bits"), Q4_K elsewhere, and the tied embedding (also the LM head) in Q6_K; Q5_K_M the same with Q5_K
for Q4_K; Q8_0 and Q4_0 are all one
type but the embedding (Q8_0 and Q6_K). Random codes with finite random scales are valid blocks of any type, so
the files load in llama.cpp and in our engine alike; their output is noise, their speed is that of a real model.
The vocabulary is GPT-2 style: the 256 byte tokens and numbered filler tokens (prompts are given as token ids).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

SHAPES = {
    "1b": {"layers": 16, "d": 2048, "heads": 32, "kv_heads": 8, "head_dim": 64, "ffn": 8192, "vocab": 128256},
    "3b": {"layers": 28, "d": 3072, "heads": 24, "kv_heads": 8, "head_dim": 128, "ffn": 8192, "vocab": 128256},
}
MIXES = ("q4_k_m", "q5_k_m", "q8_0", "q4_0")


def tensor_type(mix: str, role: str, layer: int, n_layers: int) -> str:
    """The GGML type of a tensor of role `role` ("attn_q", ..., "token_embd") in layer `layer` of a `mix` file."""
    if role == "token_embd":
        return "Q8_0" if mix == "q8_0" else "Q6_K"
    if mix == "q8_0":
        return "Q8_0"
    if mix == "q4_0":
        return "Q4_0"
    more_bits = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    return "Q6_K" if role in ("attn_v", "ffn_down") and more_bits else "Q5_K" if mix == "q5_k_m" else "Q4_K"


def write(path: Path, shape: str, mix: str, seed: int = 0) -> Path:
    import gguf

    from tpa_core.quant.formats import random_blocks
    from tpa_core.tokenizer import bytes_to_unicode

    c = SHAPES[shape]
    rng = np.random.default_rng(seed)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["to", "tok"]  # the two merges' results
    tokens += [f"tok{i}" for i in range(c["vocab"] - len(tokens))]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-llama-{shape}-{mix}")
    w.add_context_length(4096)
    w.add_embedding_length(c["d"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name: str, rows: int, cols: int, kind: str) -> None:
        raw = random_blocks(kind, rows, cols, rng, scale=0.02)
        w.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))

    def norm() -> np.ndarray:
        return (1 + 0.05 * rng.standard_normal(c["d"])).astype(np.float32)

    d, H, G, D, F, n = c["d"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"], c["layers"]
    add("token_embd.weight", c["vocab"], d, tensor_type(mix, "token_embd", 0, n))
    w.add_tensor("output_norm.weight", norm())
    shapes = {"attn_q": (H * D, d), "attn_k": (G * D, d), "attn_v": (G * D, d), "attn_output": (d, H * D),
              "ffn_gate": (F, d), "ffn_up": (F, d), "ffn_down": (d, F)}
    for i in range(n):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        for role, (rows, cols) in shapes.items():
            add(f"blk.{i}.{role}.weight", rows, cols, tensor_type(mix, role, i, n))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", default="1b")
    parser.add_argument("--mixes", default=",".join(MIXES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        for mix in args.mixes.split(","):
            target = args.out / f"synthetic-{shape}-{mix}.gguf"
            if not target.is_file():
                write(target, shape, mix)
            print(f"{target} {target.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
