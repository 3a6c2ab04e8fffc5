"""Quantized GGUF weights that stay in their blocks in memory, and the compiled op that computes with them.

- `formats`: the GGML block types computed with (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16; F32
  stays a float tensor) and what each path keeps exact: the codes, block scales and mins always (they are the
  file's bytes); decode rounds activations to int8 per 32 values; prefill dequantizes exactly and rounds only in
  the float32 GEMM.
- `ops`: building and loading tpa_core/csrc/gguf_matmul.cpp (AVX2 integer dot products; a portable fallback).
- `linear`: `QuantMatrix`, `QuantLinear` (fused parts of mixed types), `QuantEmbedding`.
- `resident`: a TPAModel built straight from the memory-mapped GGUF; `cache`: its model-cache entry.
"""
