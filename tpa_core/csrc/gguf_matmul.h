// What the GGUF matmul op (gguf_matmul.cpp) shares with the fused decode block (decode_block.cpp): the GGML type
// ids, the int8 activation blocks, and the packed layout's group product.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tpa_gguf {

enum : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
                 Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

constexpr int64_t kGroup = 16;  // rows per group of the packed layout

// ----- activations in one or two int8 levels per 32 values -------------------------------------------------------
// One level: x ~ d q, q = round(x / d) is llama.cpp's int8 activation. Two levels: x ~ d (256 q + r), r the int8
// rounding of what q missed, so one integer dot product per level gives w . x to about 2^-15 of the block's
// largest |x| instead of 2^-8.
struct XBlock {
  float d;         // the unit of the integer value v = q (one level) or 256 q + r (two): max |x| / 127 (/ 256)
  float dsum;      // d * sum(v): the min / offset term of every type but Q8_0 and Q6_K
  float dsum16[2]; // the same over values [0, 16) and [16, 32): Q6_K's offset term (one scale per 16)
  int32_t sum;     // sum(v), and over values [0, 16) and [16, 32): the packed kernels' offset terms in integers
  int32_t sum16[2];
  int8_t q[32];
  int8_t r[32];    // 0 with one level
};

// Blocks of 32 activations that share one scale for weights of `type`: 8 for the K-quants, 1 for the others.
int64_t activation_group(int64_t type);

// x [k] in blocks of 32, `group` blocks sharing one scale, one or (`two`) two levels -> out [k / 32].
void quantize_activations(const float* x, int64_t k, int64_t group, bool two, XBlock* out);

// Checks that `w` is a weight of `type` with rows of k values, packed or in the file's layout; returns the packed
// layout's bytes per group of kGroup rows (0 for the file's layout).
int64_t check_layout(const at::Tensor& w, int64_t type, int64_t k, bool packed);

// Groups [g0, g1) of a packed weight (wp, n_rows rows of k values, group_bytes per group) times the m_rows
// activation rows xq [m_rows, k / 32]: y [m_rows, n_rows], rows kGroup * [g0, g1) written. No threads of its own.
void packed_groups(const XBlock* xq, int64_t m_rows, const uint8_t* wp, int64_t type, int64_t k, int64_t n_rows,
                   int64_t group_bytes, bool two, int64_t g0, int64_t g1, float* yp);

}  // namespace tpa_gguf
