// herd's low-bit CPU kernel: y[M, N] = x[M, K] @ W^T for int4 or int8 weights with scales and offsets
// per output column and group of inputs, W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k / group
// (q unsigned: 0..15 for int4, 0..255 for int8 stored with +128).
//
// Why hand-written: decoding reads every weight once per token, so at batch 1 it is bound by how
// fast the weights stream in. PyTorch's CPU int4 and int8 kernels spend their time widening the
// weights to floating point (about 16 G weights/s on one core here, whatever the format). This kernel instead
// rounds the activations to int8 (one scale per 32 inputs, the scheme of llama.cpp and torchao's
// da8w4) and multiplies them with the weights in AVX-512 VNNI dot products, 64 multiply-adds per
// instruction. It is built only for CPUs that have VNNI (cpu_kernels.py checks); elsewhere herd keeps
// PyTorch's kernels.
//
// Packed layout (made by herd/quant/cpu_kernels.py from the portable forms): the outputs are cut into
// blocks (32 columns for int4, 16 for int8) and the inputs into steps of 4; each (block, step) is 64
// bytes, byte 4 * j + t holding the weight of column j and input 4 * s + t. For int4, byte j holds
// columns j (low nibble) and 16 + j (high nibble), so one 64-byte load feeds two dot products.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "herd's low-bit kernel needs AVX-512 F, BW and VNNI (build with -mavx512f -mavx512bw -mavx512vnni)"
#endif

namespace {

constexpr int64_t kStep = 4;     // inputs per 32-bit lane of a dot product
constexpr int64_t kXBlock = 32;  // inputs sharing one activation scale

constexpr int64_t block_cols(int64_t bits) { return bits == 4 ? 32 : 16; }

// Activations of one row as int8 with a scale per 32 inputs, and the per-group sums of those
// quantized activations for the offset term. (Summing the exact activations instead would let the
// offset term miss the rounding the weight term sees: with offsets near the group minimum, that
// doubles the error.)
struct QuantRow {
  const int8_t* q;
  const float* scale;  // [K / 32]
  const float* sum;    // [K / group]
};

void quantize_row(const float* x, int64_t K, int64_t group, int8_t* q, float* scale, float* sum) {
  std::fill(sum, sum + K / group, 0.f);
  for (int64_t b = 0; b < K / kXBlock; ++b) {
    const float* xb = x + b * kXBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kXBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.f;
    const float inv = s > 0.f ? 1.f / s : 0.f;
    int32_t total = 0;
    for (int64_t i = 0; i < kXBlock; ++i) {
      q[b * kXBlock + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
      total += q[b * kXBlock + i];
    }
    scale[b] = s;
    sum[b * kXBlock / group] += s * static_cast<float>(total);
  }
}

// One block's outputs (16 per vector) for one row, from its packed weights w [K / 4, 64] and its
// scales and offsets [K / group, block_cols].
template <int64_t Bits>
void block_dot(const QuantRow& x, const uint8_t* w, const float* scale, const float* offset, int64_t K,
               int64_t group, float* y) {
  constexpr int64_t kVecs = block_cols(Bits) / 16;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[kVecs];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 grp[kVecs];
    for (auto& a : grp) a = _mm512_setzero_ps();
    for (int64_t b = g * group / kXBlock; b < (g + 1) * group / kXBlock; ++b) {
      __m512i dot[kVecs];
      for (auto& d : dot) d = _mm512_setzero_si512();
      for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; k += kStep) {
        const __m512i v = _mm512_loadu_si512(w + k * 16);
        int32_t x4;
        std::memcpy(&x4, x.q + k, 4);
        const __m512i xk = _mm512_set1_epi32(x4);
        if constexpr (Bits == 4) {
          dot[0] = _mm512_dpbusd_epi32(dot[0], _mm512_and_si512(v, low4), xk);
          dot[1] = _mm512_dpbusd_epi32(dot[1], _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xk);
        } else {
          dot[0] = _mm512_dpbusd_epi32(dot[0], v, xk);
        }
      }
      const __m512 xs = _mm512_set1_ps(x.scale[b]);
      for (int64_t i = 0; i < kVecs; ++i) grp[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), xs, grp[i]);
    }
    const __m512 xsum = _mm512_set1_ps(x.sum[g]);
    for (int64_t i = 0; i < kVecs; ++i) {
      const __m512 s = _mm512_loadu_ps(scale + (g * kVecs + i) * 16), o = _mm512_loadu_ps(offset + (g * kVecs + i) * 16);
      acc[i] = _mm512_fmadd_ps(grp[i], s, _mm512_fmadd_ps(xsum, o, acc[i]));
    }
  }
  for (int64_t i = 0; i < kVecs; ++i) _mm512_storeu_ps(y + 16 * i, acc[i]);
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     const at::Tensor& offset, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "herd::lowbit_mm: bits must be 4 or 8, got ", bits);
  const int64_t cols = block_cols(bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "herd::lowbit_mm: x must be float32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == 16 * kStep,
              "herd::lowbit_mm: packed must be uint8 [blocks, K / 4, 64]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * kStep == K, "herd::lowbit_mm: x has ", K, " inputs, the weight ", packed.size(1) * kStep);
  TORCH_CHECK(group > 0 && group % kXBlock == 0 && K % group == 0,
              "herd::lowbit_mm: the group must be a multiple of 32 dividing K");
  const int64_t G = K / group;
  for (const at::Tensor* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == blocks && t->size(1) == G &&
                    t->size(2) == cols,
                "herd::lowbit_mm: scales and offsets must be float32 [blocks, K / group, ", cols, "]");
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous(), sc = scale.contiguous(), oc = offset.contiguous();
  at::Tensor y = at::empty({M, blocks * cols}, x.options());

  std::vector<int8_t> xq(M * K);
  std::vector<float> xscale(M * (K / kXBlock)), xsum(M * G);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, group, xq.data() + m * K, xscale.data() + m * (K / kXBlock), xsum.data() + m * G);

  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float *sp = sc.data_ptr<float>(), *op = oc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto dot = bits == 4 ? block_dot<4> : block_dot<8>;
  // Each thread takes whole column blocks; a block's weights (K * 16 bytes) stay in cache across rows.
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m = 0; m < M; ++m) {
        const QuantRow row{xq.data() + m * K, xscale.data() + m * (K / kXBlock), xsum.data() + m * G};
        dot(row, wp + b * K * 16, sp + b * G * cols, op + b * G * cols, K, group, yp + m * blocks * cols + b * cols);
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(herd, m) {
  m.def("lowbit_mm(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd, CPU, m) { m.impl("lowbit_mm", &lowbit_mm); }
