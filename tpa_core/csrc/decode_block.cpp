// One decode step of a fixed-head-factor (Llama-family) block on the CPU, in one call.
//
// Registered as torch.ops.tpa_gguf.decode_block. The token's residual x [d] goes through what the engine's modules
// do for one new token (tpa_core/model.py Block, tpa_core/attention.py, kernels/flashtpa/reference.py's grouped
// path): RMSNorm, the fused q|k|v projection (+ bias), RoPE on q and k, k and v written at `pos` of the layer's
// cache, H query heads attending over G groups of cached keys and values [0, pos], the output projection, the
// residual add, RMSNorm, gate|up, SiLU(gate) * up, down, the residual add. For a small model the Python calls and
// torch dispatches of those steps, and SDPA's setup for one query, cost as much as the projections (SmolLM2-135M:
// 19.7 ms per token through the modules, 8.6 ms here; benchmarks/NOTES.md); here they are plain loops, and each
// projection is one parallel loop over all its parts.
//
// A projection is a stack of parts (rows), each float32 [rows, K] (type F32: torch's GEMV) or GGUF blocks in the
// packed layout (gguf_matmul.cpp: activations rounded to one or two int8 levels, integer products). The cache is
// float32 or float16 (written rounded to nearest even, as torch's conversion; read widened exactly). Everything
// else is float32: sums of 16 lanes for the dot products and norms, a polynomial exp for softmax
// (exp_nonpositive) and std::exp for SiLU, so results match the module path to float rounding, not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "gguf_matmul.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define TPA_DECODE_AVX512 1
#endif

namespace tpa_gguf {
namespace {

constexpr int kLanes = 16;  // independent partial sums: the compiler keeps them in one vector register

// b: float32, or the cache's float16 (widened exactly).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * static_cast<float>(b[i + j]);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {  // a tree: 4 dependent vector adds, not 16 scalar ones
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  float sum = lanes[0];
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

// e^x for x <= 0 (softmax scores less their maximum) to about 2 ulp, in operations the compiler vectorizes (a loop
// of std::exp stays scalar): e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its degree-7 Taylor
// polynomial; below -87 (e^x under float's smallest normal) the result is 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440054690583e-4f;  // ln 2 in two parts: r exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// out [d] = x / sqrt(mean(x^2) + eps) * weight (weight absent: 1), as F.rms_norm.
void rms_norm(const float* x, const std::optional<at::Tensor>& weight, float eps, int64_t d, float* out) {
  const float inv = 1.0f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < d; ++i) out[i] = w ? x[i] * inv * w[i] : x[i] * inv;
}

// x [n, D] rotated in place by cos / signed sin [D]: x cos + (x2, x1) sin, as tpa_core.rope.apply_rope.
void rope(float* x, int64_t n, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  std::vector<float> row(D);
  for (int64_t h = 0; h < n; ++h) {
    float* v = x + h * D;
    std::copy(v, v + D, row.begin());
    for (int64_t i = 0; i < D; ++i) v[i] = row[i] * cos[i] + row[i < half ? i + half : i - half] * sin[i];
  }
}

struct Part {
  const at::Tensor* weight;
  int64_t type, levels, rows, group_bytes;  // group_bytes: the packed layout's, 0 for float32
};

struct Projection {
  std::vector<Part> parts;
  int64_t rows = 0, cols = 0;
};

// The `count` parts from `first` of the call's weights, checked to have `cols` columns and `rows` rows in all.
Projection projection(at::TensorList weights, at::IntArrayRef types, at::IntArrayRef levels, int64_t first,
                      int64_t count, int64_t rows, int64_t cols, const char* name) {
  Projection p;
  p.cols = cols;
  for (int64_t i = first; i < first + count; ++i) {
    const at::Tensor& w = weights[i];
    Part part{&w, types[i], levels[i], w.size(0), 0};
    if (part.type == F32) {
      TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu() &&
                  w.size(1) == cols, "tpa_gguf.decode_block: a float32 part of ", name, " must be a contiguous CPU "
                  "[rows, ", cols, "] tensor, got ", w.sizes());
    } else {
      TORCH_CHECK(part.levels == 1 || part.levels == 2, "tpa_gguf.decode_block: activations are rounded in 1 or 2 "
                  "int8 levels, not ", part.levels);
      part.group_bytes = check_layout(w, part.type, cols, /*packed=*/true);
    }
    p.rows += part.rows;
    p.parts.push_back(part);
  }
  TORCH_CHECK(p.rows == rows, "tpa_gguf.decode_block: ", name, " has ", p.rows, " rows, the block needs ", rows);
  return p;
}

// y [rows] = the projection's rows times x [cols]: float32 parts through torch's GEMV, packed parts in one parallel
// loop over all their groups, each activation rounding (scale group, levels) made once.
void project(const Projection& p, const float* x, float* y) {
  std::vector<XBlock> rounded[2][2];  // [K-quant scale group][two levels]
  std::vector<int64_t> first_group{0};  // prefix sums of the packed parts' groups
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {p.cols}, at::kFloat);
  int64_t offset = 0;
  for (const Part& part : p.parts) {
    if (part.type == F32) {
      at::Tensor out = at::from_blob(y + offset, {part.rows}, at::kFloat);
      at::mv_out(out, *part.weight, xt);
    } else {
      const int64_t group = activation_group(part.type);
      std::vector<XBlock>& xq = rounded[group > 1][part.levels == 2];
      if (xq.empty()) {
        xq.resize(p.cols / 32);
        quantize_activations(x, p.cols, group, part.levels == 2, xq.data());
      }
    }
    first_group.push_back(first_group.back() + (part.type == F32 ? 0 : part.rows / kGroup));
    offset += part.rows;
  }
  at::parallel_for(0, first_group.back(), 1, [&](int64_t a, int64_t b) {
    int64_t row = 0;
    for (size_t i = 0; i < p.parts.size(); ++i) {
      const Part& part = p.parts[i];
      const int64_t g0 = std::max(a, first_group[i]) - first_group[i];
      const int64_t g1 = std::min(b, first_group[i + 1]) - first_group[i];
      if (g0 < g1) {
        const XBlock* xq = rounded[activation_group(part.type) > 1][part.levels == 2].data();
        packed_groups(xq, 1, part.weight->data_ptr<uint8_t>(), part.type, p.cols, part.rows, part.group_bytes,
                      part.levels == 2, g0, g1, y + row);
      }
      row += part.rows;
    }
  });
}

constexpr int64_t kChunk = 256;           // most cached positions per unit of work of the attention
constexpr int64_t kChunkBytes = 1 << 17;  // and at most this many bytes of keys (or values) per unit: L2-resident
constexpr int64_t kRowsAhead = 4;         // cache rows prefetched ahead by the group loops

// The n values at p into L1, one 64-byte line at a time.
template <typename T>
inline void prefetch_values(const T* p, int64_t n) {
#ifdef TPA_DECODE_AVX512
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64) _mm_prefetch(bytes + i, _MM_HINT_T0);
#endif
}

// The cache holds float32 or float16 (T); every product and sum below runs in float32.
// p[j * kChunk + t] = scale q_j . key_t for the n keys `keys` (rows `stride` values apart), heads j < Hg at qg.
template <typename T>
void scores(const float* qg, const T* keys, int64_t n, int64_t stride, int64_t Hg, int64_t D, float scale,
            float* p) {
  for (int64_t t = 0; t < n; ++t) {
    const T* key = keys + t * stride;
    for (int64_t j = 0; j < Hg; ++j) p[j * kChunk + t] = dot(qg + j * D, key, D) * scale;
  }
}

// o[j] = sum_t p[j * kChunk + t] value_t for the n values `values` (rows `stride` values apart), heads j < Hg.
template <typename T>
void weighted_values(const float* p, const T* values, int64_t n, int64_t stride, int64_t Hg, int64_t D,
                     float* o) {
  std::fill(o, o + Hg * D, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const T* v = values + t * stride;
    for (int64_t j = 0; j < Hg; ++j) {
      for (int64_t i = 0; i < D; ++i) o[j * D + i] += p[j * kChunk + t] * static_cast<float>(v[i]);
    }
  }
}

#ifdef TPA_DECODE_AVX512
// The same two loops for D = 16 kVecs, kHeads heads of a group at a time with their queries (scores) or outputs
// (weighted values) held in registers across the positions, each cached row loaded once per tile of heads.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int kVecs, int kHeads, typename T>
void scores_tile(const float* qg, const T* keys, int64_t n, int64_t stride, float scale, float* p) {
  __m512 q[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    for (int v = 0; v < kVecs; ++v) q[h][v] = _mm512_loadu_ps(qg + h * 16 * kVecs + 16 * v);
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* key = keys + t * stride;
    prefetch_values(key + kRowsAhead * stride, 16 * kVecs);
    __m512 k[kVecs];
    for (int v = 0; v < kVecs; ++v) k[v] = load16(key + 16 * v);
    for (int h = 0; h < kHeads; ++h) {
      __m512 acc = _mm512_mul_ps(q[h][0], k[0]);
      for (int v = 1; v < kVecs; ++v) acc = _mm512_fmadd_ps(q[h][v], k[v], acc);
      p[h * kChunk + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

template <int kVecs, int kHeads, typename T>
void values_tile(const float* p, const T* values, int64_t n, int64_t stride, float* o) {
  __m512 acc[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    for (int v = 0; v < kVecs; ++v) acc[h][v] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* row = values + t * stride;
    prefetch_values(row + kRowsAhead * stride, 16 * kVecs);
    __m512 x[kVecs];
    for (int v = 0; v < kVecs; ++v) x[v] = load16(row + 16 * v);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * kChunk + t]);
      for (int v = 0; v < kVecs; ++v) acc[h][v] = _mm512_fmadd_ps(w, x[v], acc[h][v]);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(o + h * 16 * kVecs + 16 * v, acc[h][v]);
  }
}

// f(kVecs, kHeads, first head) for each tile of the Hg heads of a group, as integral constants: 4 heads at a time
// for D = 64, 2 for D = 128 (their registers then fit); false for other head dims.
template <typename F>
bool for_each_tile(int64_t Hg, int64_t D, F f) {
  auto tiles = [&](auto vecs, auto most) {
    for (int64_t h0 = 0; h0 < Hg; h0 += most) {
      switch (std::min<int64_t>(most, Hg - h0)) {
        case 1: f(vecs, std::integral_constant<int, 1>{}, h0); break;
        case 2: f(vecs, std::integral_constant<int, 2>{}, h0); break;
        case 3: if constexpr (decltype(most)::value >= 3) f(vecs, std::integral_constant<int, 3>{}, h0); break;
        default: if constexpr (decltype(most)::value >= 4) f(vecs, std::integral_constant<int, 4>{}, h0); break;
      }
    }
  };
  switch (D) {
    case 64: tiles(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{}); return true;
    case 128: tiles(std::integral_constant<int, 8>{}, std::integral_constant<int, 2>{}); return true;
    default: return false;
  }
}
#endif

// Heads [g Hg, (g + 1) Hg) of q over the n cached rows at keys: scores into p (rows kChunk apart).
template <typename T>
void group_scores(const float* qg, const T* keys, int64_t n, int64_t stride, int64_t Hg, int64_t D, float scale,
                  float* p) {
#ifdef TPA_DECODE_AVX512
  if (for_each_tile(Hg, D, [&](auto vecs, auto heads, int64_t h0) {
        scores_tile<decltype(vecs)::value, decltype(heads)::value, T>(qg + h0 * D, keys, n, stride, scale,
                                                                  p + h0 * kChunk);
      })) {
    return;
  }
#endif
  scores(qg, keys, n, stride, Hg, D, scale, p);
}

template <typename T>
void group_values(const float* p, const T* values, int64_t n, int64_t stride, int64_t Hg, int64_t D, float* o) {
#ifdef TPA_DECODE_AVX512
  if (for_each_tile(Hg, D, [&](auto vecs, auto heads, int64_t h0) {
        values_tile<decltype(vecs)::value, decltype(heads)::value, T>(p + h0 * kChunk, values, n, stride, o + h0 * D);
      })) {
    return;
  }
#endif
  weighted_values(p, values, n, stride, Hg, D, o);
}

// out [H, D]: each head h of q [H, D] over the T cached keys and values [T_cap, G, D] of its group h / (H / G).
// Split-K, as flash decoding: a unit of work is a chunk of positions (at most kChunk, and kChunkBytes of keys);
// its key rows are prefetched whole, then each group's heads score them, a partial softmax (max m, sum l) per
// head, the value rows likewise; the units' partials are combined per head at the end. One pass over the cache
// (rows stay in L2 across the groups), the units spread over the threads.
template <typename C>
void attend(const float* q, const C* keys, const C* values, int64_t T, int64_t H, int64_t G, int64_t D,
            float scale, float* out) {
  const int64_t Hg = H / G, row = G * D;
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / static_cast<int64_t>(sizeof(C)) / row, 16, kChunk);
  const int64_t chunks = (T + chunk - 1) / chunk;
  std::vector<float> m(chunks * H), l(chunks * H), acc(chunks * H * D);  // [chunks, H(, D)]
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> p(H * kChunk);  // [H, kChunk] scores, then weights
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, n = std::min(T, t0 + chunk) - t0;
      prefetch_values(keys + t0 * row, n * row);
      for (int64_t g = 0; g < G; ++g) {
        group_scores(q + g * Hg * D, keys + t0 * row + g * D, n, row, Hg, D, scale, p.data() + g * Hg * kChunk);
      }
      for (int64_t h = 0; h < H; ++h) {
        float* ph = p.data() + h * kChunk;
        const float top = *std::max_element(ph, ph + n);
        float total = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          ph[t] = exp_nonpositive(ph[t] - top);
          total += ph[t];
        }
        m[c * H + h] = top;
        l[c * H + h] = total;
      }
      prefetch_values(values + t0 * row, n * row);
      for (int64_t g = 0; g < G; ++g) {
        group_values(p.data() + g * Hg * kChunk, values + t0 * row + g * D, n, row, Hg, D,
                     acc.data() + (c * H + g * Hg) * D);
      }
    }
  });
  for (int64_t h = 0; h < H; ++h) {  // combine the chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, m[c * H + h]);
    float total = 0.0f;
    float* o = out + h * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = std::exp(m[c * H + h] - top);
      total += w * l[c * H + h];
      for (int64_t i = 0; i < D; ++i) o[i] += w * acc[(c * H + h) * D + i];
    }
    for (int64_t i = 0; i < D; ++i) o[i] /= total;
  }
}

void check_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu() && t->numel() == n,
              "tpa_gguf.decode_block: ", name, " must be a contiguous float32 CPU tensor of ", n, " values, got ",
              t->scalar_type(), " ", t->sizes());
}

void decode_block(const at::Tensor& x, const std::optional<at::Tensor>& attn_norm,
                  const std::optional<at::Tensor>& mlp_norm, double eps, at::TensorList weights,
                  at::IntArrayRef types, at::IntArrayRef levels, at::IntArrayRef parts,
                  const std::optional<at::Tensor>& bias, const at::Tensor& keys, const at::Tensor& values,
                  int64_t pos, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, double scale) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "tpa_gguf.decode_block: x must be a contiguous float32 CPU vector [d], got ", x.sizes());
  const bool half_cache = keys.scalar_type() == at::kHalf;
  TORCH_CHECK(keys.dim() == 3 && (half_cache || keys.scalar_type() == at::kFloat) && keys.is_contiguous()
              && keys.device().is_cpu() && values.sizes() == keys.sizes()
              && values.scalar_type() == keys.scalar_type() && values.is_contiguous(),
              "tpa_gguf.decode_block: keys and values must be contiguous float32 or float16 CPU tensors "
              "[T_cap, G, D] of one shape and dtype, got ", keys.scalar_type(), " ", keys.sizes(), " and ",
              values.scalar_type(), " ", values.sizes());
  const int64_t d = x.size(0), G = keys.size(1), D = keys.size(2), H = heads;
  TORCH_CHECK(G > 0 && H > 0 && H % G == 0 && D % 2 == 0, "tpa_gguf.decode_block: ", H, " heads over ", G,
              " groups of head dim ", D, " (heads must be a multiple of groups, D even)");
  TORCH_CHECK(0 <= pos && pos < keys.size(0), "tpa_gguf.decode_block: position ", pos, " outside the cache's ",
              keys.size(0), " tokens");
  TORCH_CHECK(parts.size() == 4 && weights.size() == types.size() && weights.size() == levels.size(),
              "tpa_gguf.decode_block: parts gives the part counts of 4 projections (q|k|v, o, gate|up, down); "
              "weights, types and levels one entry per part");
  int64_t total = 0;
  for (int64_t n : parts) {
    TORCH_CHECK(n > 0, "tpa_gguf.decode_block: every projection needs at least one part");
    total += n;
  }
  TORCH_CHECK(total == static_cast<int64_t>(weights.size()), "tpa_gguf.decode_block: the part counts add up to ",
              total, ", ", weights.size(), " weights were given");
  const int64_t qkv_rows = (H + 2 * G) * D;
  check_vector(attn_norm, d, "attn_norm");
  check_vector(mlp_norm, d, "mlp_norm");
  check_vector(bias, qkv_rows, "bias");
  check_vector(cos, D, "cos");
  check_vector(sin, D, "sin");
  const Projection qkv = projection(weights, types, levels, 0, parts[0], qkv_rows, d, "q|k|v");
  const Projection o = projection(weights, types, levels, parts[0], parts[1], d, H * D, "o");
  int64_t hidden2 = 0;  // gate|up's rows: 2 F
  for (int64_t i = parts[0] + parts[1]; i < parts[0] + parts[1] + parts[2]; ++i) hidden2 += weights[i].size(0);
  TORCH_CHECK(hidden2 % 2 == 0, "tpa_gguf.decode_block: gate|up has an odd number of rows, ", hidden2);
  const Projection gate_up = projection(weights, types, levels, parts[0] + parts[1], parts[2], hidden2, d, "gate|up");
  const Projection down = projection(weights, types, levels, parts[0] + parts[1] + parts[2], parts[3], d,
                                     hidden2 / 2, "down");

  float* xp = x.data_ptr<float>();
  std::vector<float> normed(d), update(d), q(qkv_rows), mixed(H * D), hidden(hidden2);
  // attention: x += o(attend(rope(q), cache + rope(k), v))
  rms_norm(xp, attn_norm, static_cast<float>(eps), d, normed.data());
  project(qkv, normed.data(), q.data());
  if (bias.has_value()) {
    const float* b = bias->data_ptr<float>();
    for (int64_t i = 0; i < qkv_rows; ++i) q[i] += b[i];
  }
  float* k = q.data() + H * D;
  float* v = k + G * D;
  rope(q.data(), H, D, cos.data_ptr<float>(), sin.data_ptr<float>());
  rope(k, G, D, cos.data_ptr<float>(), sin.data_ptr<float>());
  auto write_and_attend = [&](auto* cached_keys, auto* cached_values) {  // float32, or float16 rounded to nearest even
    std::copy(k, k + G * D, cached_keys + pos * G * D);
    std::copy(v, v + G * D, cached_values + pos * G * D);
    attend(q.data(), cached_keys, cached_values, pos + 1, H, G, D, static_cast<float>(scale), mixed.data());
  };
  if (half_cache) {
    write_and_attend(keys.data_ptr<c10::Half>(), values.data_ptr<c10::Half>());
  } else {
    write_and_attend(keys.data_ptr<float>(), values.data_ptr<float>());
  }
  project(o, mixed.data(), update.data());
  for (int64_t i = 0; i < d; ++i) xp[i] += update[i];
  // MLP: x += down(silu(gate) * up)
  rms_norm(xp, mlp_norm, static_cast<float>(eps), d, normed.data());
  project(gate_up, normed.data(), hidden.data());
  const int64_t F = hidden2 / 2;
  for (int64_t i = 0; i < F; ++i) hidden[i] = hidden[i] / (1.0f + std::exp(-hidden[i])) * hidden[F + i];
  project(down, hidden.data(), update.data());
  for (int64_t i = 0; i < d; ++i) xp[i] += update[i];
}

}  // namespace
}  // namespace tpa_gguf

TORCH_LIBRARY_FRAGMENT(tpa_gguf, m) {
  m.def("decode_block(Tensor(a!) x, Tensor? attn_norm, Tensor? mlp_norm, float eps, Tensor[] weights, int[] types, "
        "int[] levels, int[] parts, Tensor? bias, Tensor(b!) keys, Tensor(c!) values, int pos, Tensor cos, "
        "Tensor sin, int heads, float scale) -> ()", &tpa_gguf::decode_block);
}
