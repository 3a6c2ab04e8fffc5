// y = x @ W^T with W kept in its GGUF blocks, and W's rows dequantized to float32 on demand.
//
// Registered as torch.ops.tpa_gguf.{matmul, dequantize}. A weight is a uint8 tensor [N, row_bytes] holding N rows
// of GGML blocks (a row of K values = K / block_values blocks). `matmul` quantizes each row of x to int8 per
// 32 values (one float scale per 32, as llama.cpp does for its decode path), with `levels` = 2 plus a second int8
// level for the rounding error of the first, and takes integer dot products against the weight's codes: the codes
// are exact, the activations are rounded to about 2^-7 (one level) or 2^-15 (two) of the block's largest |x|
// (see XBlock). A second level doubles the integer work.
// F16 and BF16 rows are multiplied in float32 against x as given. `dequantize` writes the float32 rows that
// gguf's reference `dequantize` gives, for prefill (a float GEMM over a chunk of dequantized rows).
//
// Block layouts (GGML, little-endian; d, dmin, m are IEEE float16):
//   Q4_0  18 B / 32:  d, qs[16]                w = d (q - 8);  value j < 16: low nibble of qs[j], else high of qs[j-16]
//   Q4_1  20 B / 32:  d, m, qs[16]             w = d q + m
//   Q5_0  22 B / 32:  d, qh u32, qs[16]        w = d (q - 16); q = nibble | bit j of qh << 4
//   Q5_1  24 B / 32:  d, m, qh u32, qs[16]     w = d q + m
//   Q8_0  34 B / 32:  d, qs[32] int8           w = d q
//   Q4_K 144 B / 256: d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, 6-bit scale sc and min mn each,
//                     w = d sc q - dmin mn; sub-block j: nibble (j & 1) of qs[32 (j / 2) ...]
//   Q5_K 176 B / 256: d, dmin, scales[12], qh[32], qs[128]: as Q4_K, plus bit j of qh[i] as the fifth bit
//   Q6_K 210 B / 256: ql[128], qh[64], scales[16] int8, d: w = d sc (q - 32), one scale per 16 values
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "gguf_matmul.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TPA_GGUF_AVX2 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define TPA_GGUF_VNNI 1  // one instruction for the u8 x s8 -> int32 dot products of 4 values
#endif
#endif

namespace tpa_gguf {

struct Layout {
  int64_t values;  // per block
  int64_t bytes;   // per block
};

Layout layout_of(int64_t type) {
  switch (type) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: TORCH_CHECK(false, "tpa_gguf: unsupported GGML type id ", type);
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef TPA_GGUF_AVX2
  return _cvtsh_ss(h);  // one instruction (F16C) instead of c10's bit manipulation
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block, from its 12 scale bytes.
inline void k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ----- dequantization (reference arithmetic: the same float32 products as gguf's numpy code) -----------------
void dequantize_row(int64_t type, const uint8_t* row, int64_t k, float* out) {
  const Layout lay = layout_of(type);
  const int64_t nb = k / lay.values;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * lay.bytes;
    float* o = out + b * lay.values;
    switch (type) {
      case F32: std::memcpy(o, blk, 4); break;
      case F16: o[0] = half_at(blk); break;
      case BF16: { uint16_t h; std::memcpy(&h, blk, 2); o[0] = bf16_bits_to_float(h); break; }
      case Q4_0: {
        const float d = half_at(blk);
        for (int j = 0; j < 16; ++j) {
          o[j] = d * static_cast<float>((blk[2 + j] & 0x0F) - 8);
          o[j + 16] = d * static_cast<float>((blk[2 + j] >> 4) - 8);
        }
        break;
      }
      case Q4_1: {
        const float d = half_at(blk), m = half_at(blk + 2);
        for (int j = 0; j < 16; ++j) {
          o[j] = d * static_cast<float>(blk[4 + j] & 0x0F) + m;
          o[j + 16] = d * static_cast<float>(blk[4 + j] >> 4) + m;
        }
        break;
      }
      case Q5_0: case Q5_1: {
        const bool has_min = type == Q5_1;
        const float d = half_at(blk), m = has_min ? half_at(blk + 2) : 0.0f;
        uint32_t qh;
        std::memcpy(&qh, blk + (has_min ? 4 : 2), 4);
        const uint8_t* qs = blk + (has_min ? 8 : 6);
        const int offset = has_min ? 0 : 16;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
          const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          if (has_min) {
            o[j] = d * static_cast<float>(lo) + m;
            o[j + 16] = d * static_cast<float>(hi) + m;
          } else {
            o[j] = d * static_cast<float>(lo - offset);
            o[j + 16] = d * static_cast<float>(hi - offset);
          }
        }
        break;
      }
      case Q8_0: {
        const float d = half_at(blk);
        for (int j = 0; j < 32; ++j) o[j] = static_cast<float>(static_cast<int8_t>(blk[2 + j])) * d;
        break;
      }
      case Q4_K: case Q5_K: {
        const float d = half_at(blk), dmin = half_at(blk + 2);
        const uint8_t* scales = blk + 4;
        const bool five = type == Q5_K;
        const uint8_t* qh = blk + 16;
        const uint8_t* qs = blk + (five ? 48 : 16);
        for (int j = 0; j < 8; ++j) {
          int sc, mn;
          k_scale_min(scales, j, &sc, &mn);
          const float dj = d * static_cast<float>(sc), mj = dmin * static_cast<float>(mn);
          const uint8_t* q = qs + 32 * (j / 2);
          const int shift = 4 * (j & 1);
          for (int i = 0; i < 32; ++i) {
            int v = (q[i] >> shift) & 0x0F;
            if (five) v |= ((qh[i] >> j) & 1) << 4;
            o[32 * j + i] = dj * static_cast<float>(v) - mj;
          }
        }
        break;
      }
      case Q6_K: {
        const uint8_t* ql = blk;
        const uint8_t* qh = blk + 128;
        const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
        const float d = half_at(blk + 208);
        for (int h = 0; h < 2; ++h) {
          for (int t = 0; t < 4; ++t) {
            const uint8_t* l = ql + 64 * h + 32 * (t & 1);
            const uint8_t* hb = qh + 32 * h;
            for (int i = 0; i < 32; ++i) {
              const int v = (((l[i] >> (4 * (t >> 1))) & 0x0F) | (((hb[i] >> (2 * t)) & 3) << 4)) - 32;
              const int idx = 128 * h + 32 * t + i;
              o[idx] = d * static_cast<float>(scales[idx / 16]) * static_cast<float>(v);
            }
          }
        }
        break;
      }
      default: TORCH_CHECK(false, "tpa_gguf: unsupported GGML type id ", type);
    }
  }
}

// ----- activations in one or two int8 levels per 32 values (XBlock: gguf_matmul.h) --------------------------------
int64_t activation_group(int64_t type) { return layout_of(type).values / 32; }

// `group` blocks of 32 share one scale: 8 for the K-quants (one per 256-value super-block, so that their kernels
// sum the sub-blocks' integer products before converting to float), 1 for the other types.
void quantize_activations(const float* x, int64_t k, int64_t group, bool two, XBlock* out) {
  for (int64_t g = 0; g < k / (32 * group); ++g) {
    float amax = 0.0f;
    for (int64_t i = 0; i < 32 * group; ++i) amax = std::max(amax, std::fabs(x[32 * group * g + i]));
    const float d1 = amax / 127.0f;
    const float id1 = d1 > 0.0f ? 1.0f / d1 : 0.0f;
    const float id2 = 256.0f * id1;
    const float d = two ? d1 / 256.0f : d1;
    for (int64_t b = group * g; b < group * (g + 1); ++b) {
      const float* v = x + 32 * b;
      int sums[2] = {0, 0};
      for (int i = 0; i < 32; ++i) {
        const int q = static_cast<int>(std::nearbyint(v[i] * id1));
        const float rest = v[i] - d1 * static_cast<float>(q);
        const int r = two ? std::max(-127, std::min(127, static_cast<int>(std::nearbyint(rest * id2)))) : 0;
        out[b].q[i] = static_cast<int8_t>(q);
        out[b].r[i] = static_cast<int8_t>(r);
        sums[i / 16] += two ? 256 * q + r : q;
      }
      out[b].d = d;
      out[b].sum = sums[0] + sums[1];
      out[b].sum16[0] = sums[0];
      out[b].sum16[1] = sums[1];
      out[b].dsum16[0] = d * static_cast<float>(sums[0]);
      out[b].dsum16[1] = d * static_cast<float>(sums[1]);
      out[b].dsum = d * static_cast<float>(sums[0] + sums[1]);
    }
  }
}

#ifdef TPA_GGUF_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 unsigned codes (<= 128) times 32 signed activations -> 8 int32 partial sums (no saturation: with maddubs a
// pair sums to at most 2 * 128 * 127 < 2^15).
inline __m256i dot_unsigned(__m256i q, __m256i x) {
#ifdef TPA_GGUF_VNNI
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#else
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, x);
#endif
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

// 32 signed codes times 32 signed activations -> 8 int32 partial sums: |w| times x with w's sign (|w| <= 128).
inline __m256i dot_signed(__m256i w, __m256i x) {
  return dot_unsigned(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// w . v per int32 lane: w . q with one level, 256 (w . q) + (w . r) with two (|w . q| per lane <= 4 * 128 * 127:
// no overflow).
template <bool kTwo>
inline __m256i dotx_signed(__m256i w, const XBlock& x) {
  const __m256i hi = dot_signed(w, load32(x.q));
  if constexpr (!kTwo) return hi;
  return _mm256_add_epi32(_mm256_slli_epi32(hi, 8), dot_signed(w, load32(x.r)));
}

template <bool kTwo>
inline __m256i dotx_unsigned(__m256i q, const XBlock& x) {
  const __m256i hi = dot_unsigned(q, load32(x.q));
  if constexpr (!kTwo) return hi;
  return _mm256_add_epi32(_mm256_slli_epi32(hi, 8), dot_unsigned(q, load32(x.r)));
}

// 16 bytes of packed nibbles -> 32 codes: values 0..15 the low nibbles, 16..31 the high ones.
inline __m256i nibbles_16(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), m), _mm_and_si128(t, m));
}

// Bit j of a 32-bit word -> byte j of the result: 0x10 where set, 0 elsewhere (the fifth bit of a Q5 code).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuffle);
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// For each of R weight rows: the sum over n blocks of scale_b * (8 int32 lanes p_b) + term_b, where
// block(row, b, p, scale, term) fills in block b's values. Several rows at once keep several independent streams of
// weight loads in flight, which a decode GEMV, bound by memory latency rather than arithmetic, needs (benchmarks/
// NOTES.md, "Several rows per pass"). One row alternates two accumulators, even and odd blocks: a single chain of
// float adds (4-cycle latency) would otherwise bound the loop; rows are independent chains of their own.
template <int R, typename Block>
inline void sum_blocks(int64_t n, const uint8_t* const* rows, Block block, float* out) {
  constexpr int A = R == 1 ? 2 : 1;  // accumulators per row
  __m256 acc[R][A];
  float terms[R][A];
  for (int r = 0; r < R; ++r) {
    for (int a = 0; a < A; ++a) {
      acc[r][a] = _mm256_setzero_ps();
      terms[r][a] = 0.0f;
    }
  }
  auto step = [&](int64_t b, int a) {
    for (int r = 0; r < R; ++r) {
      __m256i p;
      float scale, term;
      block(rows[r], b, p, scale, term);
      acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc[r][a]);
      terms[r][a] += term;
    }
  };
  int64_t b = 0;
  for (; b + A <= n; b += A) {
    for (int a = 0; a < A; ++a) step(b + a, a);
  }
  for (; b < n; ++b) step(b, 0);
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    float term = terms[r][0];
    for (int a = 1; a < A; ++a) {
      total = _mm256_add_ps(total, acc[r][a]);
      term += terms[r][a];
    }
    out[r] = hsum(total) + term;
  }
}

// w . x for R rows of a 32-value block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) into out[0..R); false for other types.
// Per 32-block: p = the integer dot products of the codes with x's level(s), scale = d_w d_x, and term the min or
// offset: + m d_x sum(x) (Q4_1, Q5_1), - 8 d_w d_x sum(x) (Q4_0), - 16 ... (Q5_0).
template <bool kTwo, int R>
bool dot_rows32(int64_t type, const uint8_t* const* rows, const XBlock* x, int64_t k, float* out) {
  switch (type) {
    case Q4_0:
      sum_blocks<R>(k / 32, rows, [&](const uint8_t* row, int64_t b, __m256i& p, float& scale, float& term) {
        const uint8_t* blk = row + 18 * b;
        const float d = half_at(blk);
        p = dotx_unsigned<kTwo>(nibbles_16(blk + 2), x[b]);
        scale = d * x[b].d;
        term = -8.0f * d * x[b].dsum;
      }, out);
      return true;
    case Q4_1:
      sum_blocks<R>(k / 32, rows, [&](const uint8_t* row, int64_t b, __m256i& p, float& scale, float& term) {
        const uint8_t* blk = row + 20 * b;
        p = dotx_unsigned<kTwo>(nibbles_16(blk + 4), x[b]);
        scale = half_at(blk) * x[b].d;
        term = half_at(blk + 2) * x[b].dsum;
      }, out);
      return true;
    case Q5_0:
      sum_blocks<R>(k / 32, rows, [&](const uint8_t* row, int64_t b, __m256i& p, float& scale, float& term) {
        const uint8_t* blk = row + 22 * b;
        const float d = half_at(blk);
        p = dotx_unsigned<kTwo>(_mm256_or_si256(nibbles_16(blk + 6), fifth_bits(blk + 2)), x[b]);
        scale = d * x[b].d;
        term = -16.0f * d * x[b].dsum;
      }, out);
      return true;
    case Q5_1:
      sum_blocks<R>(k / 32, rows, [&](const uint8_t* row, int64_t b, __m256i& p, float& scale, float& term) {
        const uint8_t* blk = row + 24 * b;
        p = dotx_unsigned<kTwo>(_mm256_or_si256(nibbles_16(blk + 8), fifth_bits(blk + 4)), x[b]);
        scale = half_at(blk) * x[b].d;
        term = half_at(blk + 2) * x[b].dsum;
      }, out);
      return true;
    case Q8_0:
      sum_blocks<R>(k / 32, rows, [&](const uint8_t* row, int64_t b, __m256i& p, float& scale, float& term) {
        const uint8_t* blk = row + 34 * b;
        p = dotx_signed<kTwo>(load32(blk + 2), x[b]);
        scale = half_at(blk) * x[b].d;
        term = 0.0f;
      }, out);
      return true;
    default: return false;
  }
}

// For each of R rows of a K-quant (Q4_K, Q5_K, Q6_K): the sum over n super-blocks of 256 values, where
// super(row, b, acc, mins) adds super-block b's products to the row's float lanes `acc` and its min / offset terms to
// `mins`. Rows at once for the same reason as `sum_blocks`.
template <int R, typename Super>
inline void sum_superblocks(int64_t n, const uint8_t* const* rows, Super super, float* out) {
  __m256 acc[R];
  float mins[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    mins[r] = 0.0f;
  }
  for (int64_t b = 0; b < n; ++b) {
    for (int r = 0; r < R; ++r) super(rows[r], b, acc[r], mins[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + mins[r];
}

// w . x for R rows of a K-quant into out[0..R).
template <bool kTwo, int R>
void dot_rows_k(int64_t type, const uint8_t* const* rows, const XBlock* x, int64_t k, float* out) {
  switch (type) {
    case Q4_K: case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      const __m256i low4 = _mm256_set1_epi8(0x0F);
      sum_superblocks<R>(k / 256, rows, [&](const uint8_t* row, int64_t b, __m256& acc, float& mins) {
        const uint8_t* blk = row + bytes * b;
        const float d = half_at(blk), dmin = half_at(blk + 2);
        const __m256i qh = five ? load32(blk + 16) : _mm256_setzero_si256();
        const uint8_t* qs = blk + (five ? 48 : 16);
        const XBlock* xb = x + 8 * b;
        int sc[8], mn[8];
        for (int j = 0; j < 8; ++j) k_scale_min(blk + 4, j, &sc[j], &mn[j]);
        // x's scale is shared by the super-block: sum sc_j (q_j . x_j) in integers, one level each
        // (per lane <= 8 * 2 * 2 * 31 * 127 * 63: no overflow), then two float multiply-adds.
        __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
        float block_mins = 0.0f;
        for (int c = 0; c < 4; ++c) {
          const __m256i raw = load32(qs + 32 * c);
          for (int half = 0; half < 2; ++half) {
            const int j = 2 * c + half;
            __m256i q = _mm256_and_si256(half ? _mm256_srli_epi16(raw, 4) : raw, low4);
            if (five) {
              const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(1));
              q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
            }
            const __m256i scale = _mm256_set1_epi16(static_cast<int16_t>(sc[j]));
            acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, load32(xb[j].q)), scale));
            if constexpr (kTwo) {
              acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(_mm256_maddubs_epi16(q, load32(xb[j].r)), scale));
            }
            block_mins += static_cast<float>(mn[j]) * xb[j].dsum;
          }
        }
        mins -= dmin * block_mins;
        const float dx = d * xb[0].d;
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_hi), _mm256_set1_ps(kTwo ? 256.0f * dx : dx), acc);
        if constexpr (kTwo) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_lo), _mm256_set1_ps(dx), acc);
      }, out);
      return;
    }
    case Q6_K: {
      const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(3);
      sum_superblocks<R>(k / 256, rows, [&](const uint8_t* row, int64_t b, __m256& acc, float& mins) {
        const uint8_t* blk = row + 210 * b;
        const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
        const float d = half_at(blk + 208);
        const XBlock* xb = x + 8 * b;
        // as for Q4_K: integer sums over the super-block (per lane <= 8 * 2 * 2 * 63 * 127 * 128), one level each
        __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
        float block_offset = 0.0f;
        for (int h = 0; h < 2; ++h) {
          const __m256i hb = load32(blk + 128 + 32 * h);
          for (int t = 0; t < 4; ++t) {
            const __m256i l = load32(blk + 64 * h + 32 * (t & 1));
            const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(l, 4 * (t >> 1)), low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * t), low2);
            const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  // 0..63; the offset -32 goes to mins
            const XBlock& xj = xb[4 * h + t];
            const int s = 8 * h + 2 * t;  // the scales of values [0, 16) and [16, 32) of this chunk
            const __m256i sc = _mm256_set_m128i(_mm_set1_epi16(scales[s + 1]), _mm_set1_epi16(scales[s]));
            acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, load32(xj.q)), sc));
            if constexpr (kTwo) {
              acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(_mm256_maddubs_epi16(q, load32(xj.r)), sc));
            }
            block_offset += static_cast<float>(scales[s]) * xj.dsum16[0] +
                            static_cast<float>(scales[s + 1]) * xj.dsum16[1];
          }
        }
        mins -= 32.0f * d * block_offset;
        const float dx = d * xb[0].d;
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_hi), _mm256_set1_ps(kTwo ? 256.0f * dx : dx), acc);
        if constexpr (kTwo) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_lo), _mm256_set1_ps(dx), acc);
      }, out);
      return;
    }
    default: TORCH_CHECK(false, "tpa_gguf: no integer dot product for GGML type id ", type);
  }
}

// w . x for R rows of any block type into out[0..R).
template <bool kTwo, int R>
void dot_rows(int64_t type, const uint8_t* const* rows, const XBlock* x, int64_t k, float* out) {
  if (!dot_rows32<kTwo, R>(type, rows, x, k, out)) dot_rows_k<kTwo, R>(type, rows, x, k, out);
}

template <bool kTwo>
float dot_row(int64_t type, const uint8_t* row, const XBlock* x, int64_t k) {
  float out;
  dot_rows<kTwo, 1>(type, &row, x, k, &out);
  return out;
}

float dot_row_float(int64_t type, const uint8_t* row, const float* x, int64_t k) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
    const __m256 w = type == F16 ? _mm256_cvtph_ps(h)
                                 : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i), acc);
  }
  float sum = hsum(acc);
  for (; i < k; ++i) {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    sum += (type == F16 ? c10::detail::fp16_ieee_to_fp32_value(h) : bf16_bits_to_float(h)) * x[i];
  }
  return sum;
}
#else
// Portable fallback: the same integer arithmetic, one value at a time, on dequantized codes.
template <bool kTwo>
float dot_row(int64_t type, const uint8_t* row, const XBlock* x, int64_t k) {
  std::vector<float> w(k);
  dequantize_row(type, row, k, w.data());
  float sum = 0.0f;
  for (int64_t b = 0; b < k / 32; ++b) {
    float part = 0.0f;
    for (int i = 0; i < 32; ++i) {
      part += w[32 * b + i] * static_cast<float>(kTwo ? 256 * x[b].q[i] + x[b].r[i] : x[b].q[i]);
    }
    sum += part * x[b].d;
  }
  return sum;
}

float dot_row_float(int64_t type, const uint8_t* row, const float* x, int64_t k) {
  std::vector<float> w(k);
  dequantize_row(type, row, k, w.data());
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) sum += w[i] * x[i];
  return sum;
}
#endif

// ----- the row-interleaved ("packed") layout ---------------------------------------------------------------------
// A decode GEMV is bound by how fast one core streams the weight, and a file's layout (each row's blocks one after
// the other) costs a dozen instructions per 32-value block and row. `repack` rearranges a matrix once, at load, into
// groups of kGroup = 16 rows: per block column, the 16 rows' float16 scales side by side (one vcvtph2ps for all),
// then their codes interleaved so that one 64-byte load holds 4 consecutive codes of each row, one int32 lane per
// row; a single vpdpbusd against 4 activation bytes broadcast to every lane then advances all 16 rows. The
// rearrangement is lossless: `unpack` gives the file's blocks back byte for byte.
//
// A packed block (16 rows x one block of the file) holds, in order:
//   halves [h][16] float16    d; then m (Q4_1, Q5_1) or dmin (Q4_K, Q5_K)
//   scales [s][16] uint8      Q4_K, Q5_K: the 6-bit sc of sub-blocks 0..7, then mn 0..7; Q6_K: its 16 int8 scales
//   codes, per 32-value sub-block:
//     low 4 bits (every type but Q8_0): 4 chunks of 64 B, byte 4r + t of chunk i holding code (row r, value
//       8i + t) in its low nibble and (r, 8i + 4 + t) in its high one
//     Q5's fifth bit, after them: 1 chunk of 64 B, bit s of byte 4r + t = the fifth bit of code (r, 4s + t)
//     Q6_K's top 2 bits, after them: 2 chunks of 64 B, bits 2s, 2s + 1 of byte 4r + t of chunk h = the top bits of
//       code (r, 16h + 4s + t)
//     8-bit (Q8_0): 8 chunks of 64 B, byte 4r + t of chunk i = code (r, 4i + t) + 128 (unsigned for vpdpbusd)
struct PackedLayout {
  int halves;     // float16 fields per row
  int scales;     // scale bytes per row
  int code_bits;  // 4, 5, 6 or 8; 0: the type has no packed layout
  int64_t values; // per block

  constexpr int64_t block_bytes() const { return 32 * halves + 16 * scales + values / 32 * 64 * code_bits; }
  constexpr int64_t codes_at() const { return 32 * halves + 16 * scales; }
  constexpr int64_t sub_block_bytes() const { return 64 * code_bits; }
};

constexpr PackedLayout packed_layout(int64_t type) {
  switch (type) {
    case Q4_0: return {1, 0, 4, 32};
    case Q4_1: return {2, 0, 4, 32};
    case Q5_0: return {1, 0, 5, 32};
    case Q5_1: return {2, 0, 5, 32};
    case Q8_0: return {1, 0, 8, 32};
    case Q4_K: return {2, 16, 4, 256};
    case Q5_K: return {2, 16, 5, 256};
    case Q6_K: return {1, 16, 6, 256};
    default: return {0, 0, 0, 0};
  }
}

// One row's block of a packable type, field by field: float16 bits, scale bytes, one code per value (as stored:
// unsigned, Q8_0's int8 as its bits).
struct Parts {
  uint16_t half[2];
  uint8_t scale[16];
  uint8_t code[256];
};

inline void read_parts(int64_t type, const uint8_t* blk, Parts& p) {
  switch (type) {
    case Q4_0: case Q4_1: {
      const int halves = type == Q4_1 ? 2 : 1;
      std::memcpy(p.half, blk, 2 * halves);
      const uint8_t* qs = blk + 2 * halves;
      for (int j = 0; j < 16; ++j) {
        p.code[j] = qs[j] & 0x0F;
        p.code[j + 16] = qs[j] >> 4;
      }
      return;
    }
    case Q5_0: case Q5_1: {
      const int halves = type == Q5_1 ? 2 : 1;
      std::memcpy(p.half, blk, 2 * halves);
      uint32_t qh;
      std::memcpy(&qh, blk + 2 * halves, 4);
      const uint8_t* qs = blk + 2 * halves + 4;
      for (int j = 0; j < 16; ++j) {
        p.code[j] = static_cast<uint8_t>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4));
        p.code[j + 16] = static_cast<uint8_t>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
      }
      return;
    }
    case Q8_0:
      std::memcpy(p.half, blk, 2);
      std::memcpy(p.code, blk + 2, 32);
      return;
    case Q4_K: case Q5_K: {
      const bool five = type == Q5_K;
      std::memcpy(p.half, blk, 4);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        k_scale_min(blk + 4, j, &sc, &mn);
        p.scale[j] = static_cast<uint8_t>(sc);
        p.scale[8 + j] = static_cast<uint8_t>(mn);
      }
      const uint8_t* qh = blk + 16;
      const uint8_t* qs = blk + (five ? 48 : 16);
      for (int c = 0; c < 4; ++c) {
        for (int i = 0; i < 32; ++i) {
          p.code[64 * c + i] = qs[32 * c + i] & 0x0F;
          p.code[64 * c + 32 + i] = qs[32 * c + i] >> 4;
          if (five) {
            p.code[64 * c + i] |= ((qh[i] >> (2 * c)) & 1) << 4;
            p.code[64 * c + 32 + i] |= ((qh[i] >> (2 * c + 1)) & 1) << 4;
          }
        }
      }
      return;
    }
    case Q6_K: {
      std::memcpy(p.half, blk + 208, 2);
      std::memcpy(p.scale, blk + 192, 16);
      for (int h = 0; h < 2; ++h) {
        for (int t = 0; t < 4; ++t) {
          for (int i = 0; i < 32; ++i) {
            const int low = (blk[64 * h + 32 * (t & 1) + i] >> (4 * (t >> 1))) & 0x0F;
            const int top = (blk[128 + 32 * h + i] >> (2 * t)) & 3;
            p.code[128 * h + 32 * t + i] = static_cast<uint8_t>(low | (top << 4));
          }
        }
      }
      return;
    }
    default: TORCH_CHECK(false, "tpa_gguf: GGML type id ", type, " has no packed layout");
  }
}

// The inverse of read_parts: the block in the file's layout.
inline void write_parts(int64_t type, const Parts& p, uint8_t* blk) {
  switch (type) {
    case Q4_0: case Q4_1: {
      const int halves = type == Q4_1 ? 2 : 1;
      std::memcpy(blk, p.half, 2 * halves);
      for (int j = 0; j < 16; ++j) blk[2 * halves + j] = static_cast<uint8_t>(p.code[j] | (p.code[j + 16] << 4));
      return;
    }
    case Q5_0: case Q5_1: {
      const int halves = type == Q5_1 ? 2 : 1;
      std::memcpy(blk, p.half, 2 * halves);
      uint32_t qh = 0;
      for (int j = 0; j < 32; ++j) qh |= static_cast<uint32_t>(p.code[j] >> 4) << j;
      std::memcpy(blk + 2 * halves, &qh, 4);
      for (int j = 0; j < 16; ++j) {
        blk[2 * halves + 4 + j] = static_cast<uint8_t>((p.code[j] & 0x0F) | ((p.code[j + 16] & 0x0F) << 4));
      }
      return;
    }
    case Q8_0:
      std::memcpy(blk, p.half, 2);
      std::memcpy(blk + 2, p.code, 32);
      return;
    case Q4_K: case Q5_K: {
      const bool five = type == Q5_K;
      std::memcpy(blk, p.half, 4);
      const uint8_t* sc = p.scale;
      const uint8_t* mn = p.scale + 8;
      uint8_t* s = blk + 4;
      for (int j = 0; j < 4; ++j) {  // the inverse of k_scale_min
        s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
      }
      uint8_t* qh = blk + 16;
      uint8_t* qs = blk + (five ? 48 : 16);
      if (five) std::memset(qh, 0, 32);
      for (int c = 0; c < 4; ++c) {
        for (int i = 0; i < 32; ++i) {
          const int lo = p.code[64 * c + i], hi = p.code[64 * c + 32 + i];
          qs[32 * c + i] = static_cast<uint8_t>((lo & 0x0F) | ((hi & 0x0F) << 4));
          if (five) qh[i] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
        }
      }
      return;
    }
    case Q6_K: {
      std::memset(blk, 0, 192);
      for (int h = 0; h < 2; ++h) {
        for (int t = 0; t < 4; ++t) {
          for (int i = 0; i < 32; ++i) {
            const int v = p.code[128 * h + 32 * t + i];
            blk[64 * h + 32 * (t & 1) + i] |= static_cast<uint8_t>((v & 0x0F) << (4 * (t >> 1)));
            blk[128 + 32 * h + i] |= static_cast<uint8_t>((v >> 4) << (2 * t));
          }
        }
      }
      std::memcpy(blk + 192, p.scale, 16);
      std::memcpy(blk + 208, p.half, 2);
      return;
    }
    default: TORCH_CHECK(false, "tpa_gguf: GGML type id ", type, " has no packed layout");
  }
}

// Row r's block into / out of packed block `pb`, one 32-value sub-block at a time (the layout above).
inline void scatter_parts(const PackedLayout& lay, const Parts& p, int r, uint8_t* pb) {
  for (int h = 0; h < lay.halves; ++h) std::memcpy(pb + 32 * h + 2 * r, &p.half[h], 2);
  for (int s = 0; s < lay.scales; ++s) pb[32 * lay.halves + 16 * s + r] = p.scale[s];
  for (int64_t c = 0; c < lay.values / 32; ++c) {
    uint8_t* sub = pb + lay.codes_at() + c * lay.sub_block_bytes() + 4 * r;
    const uint8_t* code = p.code + 32 * c;
    if (lay.code_bits == 8) {
      for (int v = 0; v < 32; ++v) sub[64 * (v / 4) + v % 4] = static_cast<uint8_t>(code[v] ^ 0x80);
      continue;
    }
    for (int i = 0; i < 4; ++i) {
      for (int t = 0; t < 4; ++t) {
        sub[64 * i + t] = static_cast<uint8_t>((code[8 * i + t] & 0x0F) | ((code[8 * i + 4 + t] & 0x0F) << 4));
      }
    }
    if (lay.code_bits == 5) {
      for (int t = 0; t < 4; ++t) {
        int fifth = 0;
        for (int q = 0; q < 8; ++q) fifth |= (code[4 * q + t] >> 4) << q;
        sub[256 + t] = static_cast<uint8_t>(fifth);
      }
    }
    if (lay.code_bits == 6) {
      for (int h = 0; h < 2; ++h) {
        for (int t = 0; t < 4; ++t) {
          int top = 0;
          for (int q = 0; q < 4; ++q) top |= (code[16 * h + 4 * q + t] >> 4) << (2 * q);
          sub[256 + 64 * h + t] = static_cast<uint8_t>(top);
        }
      }
    }
  }
}

inline void gather_parts(const PackedLayout& lay, const uint8_t* pb, int r, Parts& p) {
  for (int h = 0; h < lay.halves; ++h) std::memcpy(&p.half[h], pb + 32 * h + 2 * r, 2);
  for (int s = 0; s < lay.scales; ++s) p.scale[s] = pb[32 * lay.halves + 16 * s + r];
  for (int64_t c = 0; c < lay.values / 32; ++c) {
    const uint8_t* sub = pb + lay.codes_at() + c * lay.sub_block_bytes() + 4 * r;
    uint8_t* code = p.code + 32 * c;
    if (lay.code_bits == 8) {
      for (int v = 0; v < 32; ++v) code[v] = static_cast<uint8_t>(sub[64 * (v / 4) + v % 4] ^ 0x80);
      continue;
    }
    for (int i = 0; i < 4; ++i) {
      for (int t = 0; t < 4; ++t) {
        code[8 * i + t] = sub[64 * i + t] & 0x0F;
        code[8 * i + 4 + t] = sub[64 * i + t] >> 4;
      }
    }
    if (lay.code_bits == 5) {
      for (int t = 0; t < 4; ++t) {
        for (int q = 0; q < 8; ++q) code[4 * q + t] |= ((sub[256 + t] >> q) & 1) << 4;
      }
    }
    if (lay.code_bits == 6) {
      for (int h = 0; h < 2; ++h) {
        for (int t = 0; t < 4; ++t) {
          for (int q = 0; q < 4; ++q) code[16 * h + 4 * q + t] |= ((sub[256 + 64 * h + t] >> (2 * q)) & 3) << 4;
        }
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TPA_GGUF_AVX512 1

// acc + (per int32 lane) the dot product of 4 unsigned bytes of u with the 4 signed bytes x4.
inline __m512i dpbusd16(__m512i acc, __m512i u, int32_t x4) {
  const __m512i x = _mm512_set1_epi32(x4);
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)));
#endif
}

inline int32_t four_at(const int8_t* a, int j) {
  int32_t v;
  std::memcpy(&v, a + 4 * j, 4);
  return v;
}

inline __m512i load64(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline __m512 halves16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i bytes16_u(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i bytes16_s(const uint8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Bit `from` of every byte of t moved to bit 4 (with the other bits of the byte and its neighbour: mask after).
inline __m512i to_bit4(__m512i t, int from) {
  return from <= 4 ? _mm512_slli_epi16(t, 4 - from) : _mm512_srli_epi16(t, from - 4);
}

// Chunk i of a sub-block of kBits-bit codes (4, 5 or 6: the low nibbles, then Q5's fifth bits or Q6_K's top
// bits) as whole codes: byte t of lane r of lo = code (r, 8i + t), of hi = code (r, 8i + 4 + t), t < 4.
template <int kBits>
inline void chunk_codes(const uint8_t* sub, int i, __m512i& lo, __m512i& hi) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30), bit4 = _mm512_set1_epi8(0x10);
  const __m512i v = load64(sub + 64 * i);
  lo = _mm512_and_si512(v, low4);
  hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  if constexpr (kBits == 5) {  // the fifth bits of values 8i + t and 8i + 4 + t: bits 2i and 2i + 1
    const __m512i fifth = load64(sub + 256);
    lo = _mm512_or_si512(lo, _mm512_and_si512(to_bit4(fifth, 2 * i), bit4));
    hi = _mm512_or_si512(hi, _mm512_and_si512(to_bit4(fifth, 2 * i + 1), bit4));
  }
  if constexpr (kBits == 6) {  // top bits of values 8i + t at bits 4(i % 2), of 8i + 4 + t at 4(i % 2) + 2: to bits 4, 5
    const __m512i t = load64(sub + 256 + 64 * (i / 2));
    lo = _mm512_or_si512(lo, _mm512_and_si512(i % 2 ? t : _mm512_slli_epi16(t, 4), top2));
    hi = _mm512_or_si512(hi, _mm512_and_si512(i % 2 ? _mm512_srli_epi16(t, 2) : _mm512_slli_epi16(t, 2), top2));
  }
}

// Lane r: the sum over the values of chunks [C0, C1) of a sub-block of kBits-bit codes of code (r, v) * a[v].
template <int kBits, int C0, int C1>
inline __m512i dot_sub(const uint8_t* sub, const int8_t* a) {
  __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
  for (int i = C0; i < C1; ++i) {
    __m512i lo, hi;
    chunk_codes<kBits>(sub, i, lo, hi);
    p0 = dpbusd16(p0, lo, four_at(a, 2 * i));
    p1 = dpbusd16(p1, hi, four_at(a, 2 * i + 1));
  }
  return _mm512_add_epi32(p0, p1);
}

inline __m512i dot_sub8(const uint8_t* sub, const int8_t* a) {
  __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
  for (int i = 0; i < 8; i += 2) {
    p0 = dpbusd16(p0, load64(sub + 64 * i), four_at(a, i));
    p1 = dpbusd16(p1, load64(sub + 64 * (i + 1)), four_at(a, i + 1));
  }
  return _mm512_add_epi32(p0, p1);
}

// The integer value v's dot product over a 32-value sub-block: w . q, or 256 (w . q) + (w . r) with two levels.
template <bool kTwo, typename Dot>
inline __m512i dot_levels(const XBlock& x, Dot dot) {
  const __m512i hi = dot(x.q);
  if constexpr (!kTwo) return hi;
  return _mm512_add_epi32(_mm512_slli_epi32(hi, 8), dot(x.r));
}

// The 32-value types' dot products of one block: the codes' with v, less the offset (8 for Q4_0, 16 for Q5_0, 128
// for Q8_0's unsigned codes) times sum(v).
template <bool kTwo, int64_t kType>
inline __m512i block32_dots(const uint8_t* sub, const XBlock& x) {
  constexpr int bits = packed_layout(kType).code_bits;
  const __m512i dots = dot_levels<kTwo>(x, [&](const int8_t* a) {
    if constexpr (bits == 8) return dot_sub8(sub, a);
    else return dot_sub<bits, 0, 4>(sub, a);
  });
  constexpr int32_t offset = kType == Q4_0 ? 8 : kType == Q5_0 ? 16 : kType == Q8_0 ? 128 : 0;
  return offset ? _mm512_sub_epi32(dots, _mm512_set1_epi32(offset * x.sum)) : dots;
}

// Software prefetch of the weight stream, `bytes` bytes kPrefetchAhead ahead of p. The best distance depends on the
// CPU's own prefetchers (benchmarks/NOTES.md, "Prefetch distance"): 1024 bytes on Intel, where the hardware
// prefetcher alone keeps too few lines in flight for one core; 256 on AMD, where far prefetches compete with the
// hardware's stream (1024 streams the weights 15-20% slower there).
const int64_t kPrefetchAhead = [] {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") ? 256 : 1024;
}();

inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead + off), _MM_HINT_T0);
  }
}

// acc + a super-block's integer sums in float: d hi with one activation level, d (256 hi + lo) with two.
template <bool kTwo>
inline __m512 add_levels(__m512 acc, __m512i hi, __m512i lo, __m512 d) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), kTwo ? _mm512_mul_ps(d, _mm512_set1_ps(256.0f)) : d, acc);
  if constexpr (kTwo) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, acc);
  return acc;
}

// y[0..16) = the 16 rows of packed group `g` (nb blocks) of kType times one activation row x.
template <bool kTwo, int64_t kType>
void packed_group(const uint8_t* g, int64_t nb, const XBlock* x, float* y) {
  constexpr PackedLayout lay = packed_layout(kType);
  constexpr int64_t bytes = lay.block_bytes();
  __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
  switch (kType) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: {
      constexpr bool has_min = kType == Q4_1 || kType == Q5_1;  // w = d q + m: + m d_x sum(v)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = g + b * bytes;
        prefetch_ahead(pb, bytes);
        const __m512i p = block32_dots<kTwo, kType>(pb + lay.codes_at(), x[b]);
        __m512& into = b % 2 ? acc2 : acc;  // two chains of float adds
        into = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(halves16(pb), _mm512_set1_ps(x[b].d)), into);
        if constexpr (has_min) into = _mm512_fmadd_ps(halves16(pb + 32), _mm512_set1_ps(x[b].dsum), into);
      }
      break;
    }
    case Q4_K: case Q5_K: {
      // per super-block: sum_j sc_j (q_j . v_j) and sum_j mn_j sum(v_j) in integers (as dot_rows_k), then floats
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = g + b * bytes;
        prefetch_ahead(pb, bytes);
        const XBlock* xb = x + 8 * b;
        __m512i dots_hi = _mm512_setzero_si512(), dots_lo = _mm512_setzero_si512(), mins = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j) {
          const uint8_t* sub = pb + lay.codes_at() + j * lay.sub_block_bytes();
          const __m512i sc = bytes16_u(pb + 64 + 16 * j), mn = bytes16_u(pb + 64 + 128 + 16 * j);
          dots_hi = _mm512_add_epi32(dots_hi, _mm512_mullo_epi32(dot_sub<lay.code_bits, 0, 4>(sub, xb[j].q), sc));
          if constexpr (kTwo) {
            dots_lo = _mm512_add_epi32(dots_lo, _mm512_mullo_epi32(dot_sub<lay.code_bits, 0, 4>(sub, xb[j].r), sc));
          }
          mins = _mm512_add_epi32(mins, _mm512_mullo_epi32(mn, _mm512_set1_epi32(xb[j].sum)));
        }
        const __m512 d = _mm512_mul_ps(halves16(pb), _mm512_set1_ps(xb[0].d));
        acc = add_levels<kTwo>(acc, dots_hi, dots_lo, d);
        acc2 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(halves16(pb + 32), _mm512_set1_ps(xb[0].d)),
                                acc2);
      }
      break;
    }
    case Q6_K: {
      // per 16 values one int8 scale: two dot products per sub-block; the offset -32 as -32 sum_s sc_s sum16(v)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = g + b * bytes;
        prefetch_ahead(pb, bytes);
        const XBlock* xb = x + 8 * b;
        __m512i dots_hi = _mm512_setzero_si512(), dots_lo = _mm512_setzero_si512(), offs = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j) {
          const uint8_t* sub = pb + lay.codes_at() + j * lay.sub_block_bytes();
          const __m512i s0 = bytes16_s(pb + 32 + 32 * j), s1 = bytes16_s(pb + 32 + 32 * j + 16);
          auto scaled = [&](const int8_t* a) {
            return _mm512_add_epi32(_mm512_mullo_epi32(dot_sub<6, 0, 2>(sub, a), s0),
                                    _mm512_mullo_epi32(dot_sub<6, 2, 4>(sub, a), s1));
          };
          dots_hi = _mm512_add_epi32(dots_hi, scaled(xb[j].q));
          if constexpr (kTwo) dots_lo = _mm512_add_epi32(dots_lo, scaled(xb[j].r));
          offs = _mm512_add_epi32(offs, _mm512_add_epi32(_mm512_mullo_epi32(s0, _mm512_set1_epi32(xb[j].sum16[0])),
                                                         _mm512_mullo_epi32(s1, _mm512_set1_epi32(xb[j].sum16[1]))));
        }
        const __m512 d = _mm512_mul_ps(halves16(pb), _mm512_set1_ps(xb[0].d));
        acc = add_levels<kTwo>(acc, dots_hi, dots_lo, d);
        acc2 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offs), _mm512_mul_ps(d, _mm512_set1_ps(32.0f)), acc2);
      }
      break;
    }
  }
  _mm512_storeu_ps(y, _mm512_add_ps(acc, acc2));
}

constexpr bool is_k_quant(int64_t type) { return type == Q4_K || type == Q5_K || type == Q6_K; }

// 16 floats rounded to bfloat16, to nearest even (c10::BFloat16's rounding, for finite values).
inline __m256i to_bf16(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd,
                                                                   _mm512_set1_epi32(0x7FFF))), 16));
}

// Lanes 4u..4u+3 of f (four values of one row) to dst, as float32 or bfloat16.
template <int u, typename Out>
inline void store_four(__m512 f, __m256i f16, Out* dst) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm_storeu_ps(dst, _mm512_extractf32x4_ps(f, u));
  } else {
    const int64_t four = _mm256_extract_epi64(f16, u);
    std::memcpy(dst, &four, sizeof(four));
  }
}

// The 16 rows of packed K-quant group g (nb blocks of 256 values) as float32 or bfloat16 rows k apart at out:
// dequantize_row's arithmetic (the same float32 products, so the same values) straight from the packed layout.
// A chunk's 64 bytes hold 4 codes of each row; 16 of them (4 rows) widen to one vector of floats, scaled by each
// row's sub-block scale and min, and go to a block's tile as 4 stores of 4 values per row. The tile's rows are
// padded (rows k apart would share one L1 set) and copied out whole.
template <int64_t kType, typename Out>
void dequantize_group(const uint8_t* g, int64_t nb, int64_t k, Out* out) {
  constexpr PackedLayout lay = packed_layout(kType);
  constexpr int64_t bytes = lay.block_bytes();
  constexpr bool six = kType == Q6_K;
  __m512i quarter[4];  // lane l of quarter a: row 4a + l / 4
  for (int a = 0; a < 4; ++a) {
    quarter[a] = _mm512_add_epi32(_mm512_set1_epi32(4 * a), _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2));
  }
  constexpr int64_t kTileStride = 256 + 16;
  alignas(64) Out tile[kGroup * kTileStride];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = g + b * bytes;
    const __m512 d = halves16(pb);
    for (int j = 0; j < 8; ++j) {
      // per row: values = scale * code - shift (Q4_K, Q5_K: d sc, dmin mn), or scale * (code - 32) (Q6_K: d sc per
      // 16 values, [0] for chunks 0-1 and [1] for chunks 2-3)
      __m512 scale[2], shift = _mm512_setzero_ps();
      if constexpr (six) {
        scale[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(bytes16_s(pb + 32 + 32 * j)));
        scale[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(bytes16_s(pb + 32 + 32 * j + 16)));
      } else {
        scale[0] = scale[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(bytes16_u(pb + 64 + 16 * j)));
        shift = _mm512_mul_ps(halves16(pb + 32), _mm512_cvtepi32_ps(bytes16_u(pb + 64 + 128 + 16 * j)));
      }
      const uint8_t* sub = pb + lay.codes_at() + j * lay.sub_block_bytes();
      Out* at = tile + j * 32;
      for (int i = 0; i < 4; ++i) {
        __m512i codes[2];
        chunk_codes<lay.code_bits>(sub, i, codes[0], codes[1]);
        for (int half = 0; half < 2; ++half) {  // values 8i + 4 half + (0..3)
          auto quarter_rows = [&](auto a) {
            __m512i c = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes[half], a.value));
            if constexpr (six) c = _mm512_sub_epi32(c, _mm512_set1_epi32(32));
            const __m512 rs = _mm512_permutexvar_ps(quarter[a.value], scale[six && i >= 2]);
            __m512 f = _mm512_mul_ps(rs, _mm512_cvtepi32_ps(c));
            if constexpr (!six) f = _mm512_sub_ps(f, _mm512_permutexvar_ps(quarter[a.value], shift));
            const __m256i f16 = std::is_same_v<Out, float> ? _mm256_setzero_si256() : to_bf16(f);
            Out* dst = at + (4 * a.value) * kTileStride + 8 * i + 4 * half;
            store_four<0>(f, f16, dst);
            store_four<1>(f, f16, dst + kTileStride);
            store_four<2>(f, f16, dst + 2 * kTileStride);
            store_four<3>(f, f16, dst + 3 * kTileStride);
          };
          quarter_rows(std::integral_constant<int, 0>{});
          quarter_rows(std::integral_constant<int, 1>{});
          quarter_rows(std::integral_constant<int, 2>{});
          quarter_rows(std::integral_constant<int, 3>{});
        }
      }
    }
    for (int64_t r = 0; r < kGroup; ++r) std::memcpy(out + r * k + b * 256, tile + r * kTileStride, 256 * sizeof(Out));
  }
}
#endif

constexpr int kRowsPerPass = 4;  // weight rows per pass of the decode product (one for Q6_K)

void check_weight(const at::Tensor& w, int64_t type, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(),
              "tpa_gguf: the weight must be a contiguous CPU uint8 tensor [N, row_bytes]");
  const Layout lay = layout_of(type);
  TORCH_CHECK(k > 0 && k % lay.values == 0 && w.size(1) == k / lay.values * lay.bytes,
              "tpa_gguf: a row of ", k, " values of type ", type, " is ", k / lay.values * lay.bytes,
              " bytes, the weight has ", w.size(1));
}

// The packed matrix's bytes per group of kGroup rows, after checking that `w` is one of `type` with rows of k values.
int64_t check_packed(const at::Tensor& w, int64_t type, int64_t k) {
  const PackedLayout lay = packed_layout(type);
  TORCH_CHECK(lay.code_bits != 0, "tpa_gguf: GGML type id ", type, " has no packed layout");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() &&
              w.size(0) % kGroup == 0, "tpa_gguf: a packed weight is a contiguous CPU uint8 tensor [N, bytes] with N "
              "a multiple of ", kGroup);
  TORCH_CHECK(k > 0 && k % lay.values == 0 && w.size(1) * kGroup == k / lay.values * lay.block_bytes(),
              "tpa_gguf: a packed row of ", k, " values of type ", type, " is ", k / lay.values * lay.block_bytes() /
              kGroup, " bytes, the weight has ", w.size(1));
  return k / lay.values * lay.block_bytes();
}

// check_packed for a packed weight; check_weight, and 0 bytes per group, for one in the file's layout.
int64_t check_layout(const at::Tensor& w, int64_t type, int64_t k, bool packed) {
  if (packed) return check_packed(w, type, k);
  check_weight(w, type, k);
  return 0;
}

// Calls f(std::integral_constant<int64_t, type>{}) for a packable type: the layout's loops then compile per type,
// with every size a constant (the byte-by-byte loops of repacking run 2-4x faster so).
template <typename F>
void with_packed_type(int64_t type, F f) {
  switch (type) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int64_t, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int64_t, Q5_0>{});
    case Q5_1: return f(std::integral_constant<int64_t, Q5_1>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
    default: TORCH_CHECK(false, "tpa_gguf: GGML type id ", type, " has no packed layout");
  }
}

// Rows [r0, r1) (given by `rows`) of the packed matrix at `wp` (groups of group_bytes) in the file's layout, into
// `out` (row_bytes apart).
void unpack_rows(int64_t type, const uint8_t* wp, int64_t group_bytes, const int64_t* rows, int64_t count, int64_t k,
                 uint8_t* out, int64_t row_bytes) {
  with_packed_type(type, [&](auto kind) {
    constexpr int64_t kType = decltype(kind)::value;
    constexpr PackedLayout lay = packed_layout(kType);
    const int64_t file_bytes = layout_of(kType).bytes;
    Parts parts;
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* group = wp + rows[i] / kGroup * group_bytes;
      for (int64_t b = 0; b < k / lay.values; ++b) {
        gather_parts(lay, group + b * lay.block_bytes(), static_cast<int>(rows[i] % kGroup), parts);
        write_parts(kType, parts, out + i * row_bytes + b * file_bytes);
      }
    }
  });
}

void packed_groups(const XBlock* xq, int64_t m_rows, const uint8_t* wp, int64_t type, int64_t k, int64_t n_rows,
                   int64_t group_bytes, bool two, int64_t g0, int64_t g1, float* yp) {
  const int64_t nb = k / packed_layout(type).values;
#ifndef TPA_GGUF_AVX512
  // without AVX-512: the group back in the file's layout, then the row-by-row product
  const int64_t row_bytes = k / layout_of(type).values * layout_of(type).bytes;
  std::vector<uint8_t> rows(kGroup * row_bytes);
#endif
  for (int64_t g = g0; g < g1; ++g) {
#ifndef TPA_GGUF_AVX512
    int64_t ids[kGroup];
    for (int64_t r = 0; r < kGroup; ++r) ids[r] = kGroup * g + r;
    unpack_rows(type, wp, group_bytes, ids, kGroup, k, rows.data(), row_bytes);
#endif
    for (int64_t m = 0; m < m_rows; ++m) {
      const XBlock* xm = xq + m * (k / 32);
      float* out = yp + m * n_rows + kGroup * g;
#ifdef TPA_GGUF_AVX512
      with_packed_type(type, [&](auto kind) {
        constexpr int64_t kType = decltype(kind)::value;
        if (two) {
          packed_group<true, kType>(wp + g * group_bytes, nb, xm, out);
        } else {
          packed_group<false, kType>(wp + g * group_bytes, nb, xm, out);
        }
      });
#else
      for (int64_t r = 0; r < kGroup; ++r) {
        const uint8_t* row = &rows[r * row_bytes];
        out[r] = two ? dot_row<true>(type, row, xm, k) : dot_row<false>(type, row, xm, k);
      }
#endif
    }
  }
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k, int64_t levels, bool packed) {
  const int64_t group_bytes = check_layout(w, type, k, packed);
  TORCH_CHECK(levels == 1 || levels == 2, "tpa_gguf: activations are rounded in 1 or 2 int8 levels, not ", levels);
  const bool two = levels == 2;
  TORCH_CHECK(type != F32, "tpa_gguf: float32 weights run through torch's own GEMM");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "tpa_gguf: x must be a float32 CPU tensor [M, ", k, "]");
  const bool is_float = type == F16 || type == BF16;
  TORCH_CHECK(is_float || k % 32 == 0, "tpa_gguf: K must be a multiple of 32");
  const at::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), n_rows = w.size(0), row_bytes = w.size(1);
  at::Tensor y = at::empty({m_rows, n_rows}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  std::vector<XBlock> xq(is_float ? 0 : m_rows * (k / 32));
  const int64_t group = layout_of(type).values / 32;  // K-quants: x shares a scale per 256-value super-block
  if (!is_float) {
    at::parallel_for(0, m_rows, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_activations(xp + m * k, k, group, two, xq.data() + m * (k / 32));
    });
  }
  if (packed) {
    at::parallel_for(0, n_rows / kGroup, 1, [&](int64_t g0, int64_t g1) {
      packed_groups(xq.data(), m_rows, wp, type, k, n_rows, group_bytes, two, g0, g1, yp);
    });
    return y;
  }
  at::parallel_for(0, n_rows, 16, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
#ifdef TPA_GGUF_AVX2
    // kRowsPerPass rows at a time; Q6_K's super-block needs more registers than four rows leave (1.4x slower)
    if (!is_float && type != Q6_K) {
      for (; n + kRowsPerPass <= n1; n += kRowsPerPass) {
        const uint8_t* rows[kRowsPerPass];
        for (int r = 0; r < kRowsPerPass; ++r) rows[r] = wp + (n + r) * row_bytes;
        for (int64_t m = 0; m < m_rows; ++m) {
          const XBlock* xm = xq.data() + m * (k / 32);
          float out[kRowsPerPass];
          if (two) {
            dot_rows<true, kRowsPerPass>(type, rows, xm, k, out);
          } else {
            dot_rows<false, kRowsPerPass>(type, rows, xm, k, out);
          }
          std::memcpy(yp + m * n_rows + n, out, sizeof(out));
        }
      }
    }
#endif
    for (; n < n1; ++n) {
      const uint8_t* row = wp + n * row_bytes;
      for (int64_t m = 0; m < m_rows; ++m) {
        const XBlock* xm = xq.data() + m * (k / 32);
        yp[m * n_rows + n] = is_float ? dot_row_float(type, row, xp + m * k, k)
                                      : two ? dot_row<true>(type, row, xm, k) : dot_row<false>(type, row, xm, k);
      }
    }
  });
  return y;
}

// out [N, K] float32, or bfloat16 (each value rounded to nearest even from the float32 one: a bf16 GEMM's input).
void dequantize(const at::Tensor& w, int64_t type, int64_t k, const at::Tensor& out, bool packed) {
  const int64_t group_bytes = check_layout(w, type, k, packed);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == w.size(0) && out.size(1) == k && out.is_contiguous() &&
              (bf16 || out.scalar_type() == at::kFloat),
              "tpa_gguf: out must be a contiguous float32 or bfloat16 tensor [N, ", k, "]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
#ifdef TPA_GGUF_AVX512
  if (packed && is_k_quant(type)) {  // straight from the layout, 16 rows at a time
    with_packed_type(type, [&](auto kind) {
      constexpr int64_t kType = decltype(kind)::value;
      if constexpr (is_k_quant(kType)) {
        at::parallel_for(0, w.size(0) / kGroup, 1, [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) {
            if (bf16) {
              dequantize_group<kType>(wp + g * group_bytes, k / 256, k,
                                      reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) + g * kGroup * k);
            } else {
              dequantize_group<kType>(wp + g * group_bytes, k / 256, k, out.data_ptr<float>() + g * kGroup * k);
            }
          }
        });
      }
    });
    return;
  }
#endif
  const int64_t row_bytes = k / layout_of(type).values * layout_of(type).bytes;
  at::parallel_for(0, w.size(0), kGroup, [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> row(packed ? row_bytes : 0);  // a packed row back in the file's layout
    std::vector<float> values(bf16 ? k : 0);           // a row in float32 before its rounding to bfloat16
    for (int64_t n = n0; n < n1; ++n) {
      if (packed) unpack_rows(type, wp, group_bytes, &n, 1, k, row.data(), row_bytes);
      float* dst = bf16 ? values.data() : out.data_ptr<float>() + n * k;
      dequantize_row(type, packed ? row.data() : wp + n * row_bytes, k, dst);
      if (bf16) {
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + n * k;
        for (int64_t i = 0; i < k; ++i) o[i] = c10::BFloat16(values[i]);
      }
    }
  });
}

at::Tensor repack(const at::Tensor& w, int64_t type, int64_t k, const std::optional<at::Tensor>& order) {
  check_weight(w, type, k);
  const PackedLayout lay = packed_layout(type);
  TORCH_CHECK(lay.code_bits != 0, "tpa_gguf: GGML type id ", type, " has no packed layout");
  const int64_t n_rows = w.size(0), row_bytes = w.size(1), nb = k / lay.values, file_bytes = layout_of(type).bytes;
  TORCH_CHECK(n_rows % kGroup == 0, "tpa_gguf: packing needs a multiple of ", kGroup, " rows, not ", n_rows);
  at::Tensor rows_of;
  if (order.has_value()) {
    rows_of = order->to(at::kLong).contiguous();
    TORCH_CHECK(rows_of.dim() == 1 && rows_of.size(0) == n_rows, "tpa_gguf: the row order needs ", n_rows, " rows");
    TORCH_CHECK(n_rows == 0 || (rows_of.min().item<int64_t>() >= 0 && rows_of.max().item<int64_t>() < n_rows),
                "tpa_gguf: the row order holds a row outside [0, ", n_rows, ")");
  }
  const int64_t* order_p = order.has_value() ? rows_of.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({n_rows, nb * lay.block_bytes() / kGroup}, w.options());  // every byte written
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  with_packed_type(type, [&](auto kind) {
    constexpr int64_t kType = decltype(kind)::value;
    constexpr PackedLayout lay = packed_layout(kType);
    at::parallel_for(0, n_rows / kGroup, 1, [&](int64_t g0, int64_t g1) {
      Parts parts;
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t b = 0; b < nb; ++b) {
          uint8_t* pb = op + (g * nb + b) * lay.block_bytes();
          for (int r = 0; r < kGroup; ++r) {
            const int64_t src = order_p ? order_p[kGroup * g + r] : kGroup * g + r;
            read_parts(kType, wp + src * row_bytes + b * file_bytes, parts);
            scatter_parts(lay, parts, r, pb);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor unpack(const at::Tensor& w, int64_t type, int64_t k, const at::Tensor& rows) {
  const int64_t group_bytes = check_packed(w, type, k);
  const at::Tensor idx = rows.to(at::kLong).contiguous();
  TORCH_CHECK(idx.dim() == 1, "tpa_gguf: rows must be a 1-d index tensor");
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < w.size(0)),
              "tpa_gguf: a row index is outside [0, ", w.size(0), ")");
  const Layout lay = layout_of(type);
  at::Tensor out = at::empty({idx.numel(), k / lay.values * lay.bytes}, w.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t row_bytes = out.size(1);
  at::parallel_for(0, idx.numel(), 16, [&](int64_t i0, int64_t i1) {
    unpack_rows(type, wp, group_bytes, ip + i0, i1 - i0, k, op + i0 * row_bytes, row_bytes);
  });
  return out;
}

bool has_avx2() {
#ifdef TPA_GGUF_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace tpa_gguf

TORCH_LIBRARY(tpa_gguf, m) {
  using namespace tpa_gguf;
  m.def("matmul(Tensor x, Tensor w, int type, int k, int levels=2, bool packed=False) -> Tensor", &matmul);
  m.def("repack(Tensor w, int type, int k, Tensor? order=None) -> Tensor", &repack);
  m.def("unpack(Tensor w, int type, int k, Tensor rows) -> Tensor", &unpack);
  m.def("packed_row_bytes(int type, int k) -> int", [](int64_t type, int64_t k) -> int64_t {
    const PackedLayout lay = packed_layout(type);
    return lay.code_bits == 0 || k % lay.values ? 0 : k / lay.values * lay.block_bytes() / kGroup;
  });
  m.def("packed_group() -> int", []() -> int64_t { return kGroup; });
  m.def("packed_simd() -> bool", [] {
#ifdef TPA_GGUF_AVX512
    return true;
#else
    return false;
#endif
  });
  m.def("dequantize(Tensor w, int type, int k, Tensor(a!) out, bool packed=False) -> ()", &dequantize);
  m.def("simd() -> bool", [] { return has_avx2(); });
  m.def("vnni() -> bool", [] {
#ifdef TPA_GGUF_VNNI
    return true;
#else
    return false;
#endif
  });
}
