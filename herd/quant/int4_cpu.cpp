// herd's int4 CPU kernel: y[M, N] = x[M, K] @ W^T for an int4 weight W with group-wise scales and
// offsets, W[n, k] = q[n, k] * scale[n, g] + offset[n, g] (g = k / group, q in 0..15).
//
// Why hand-written: decoding reads every weight once per token, so at batch 1 it is bound by how
// fast the weights stream in. PyTorch's CPU int4 kernel spends its time unpacking nibbles to bf16
// (about 16 G weights/s on one core here, half of what memory delivers for 4-bit weights). This
// kernel instead quantizes the activations to int8 (one scale per 32 inputs, the int8 x int4 scheme
// of llama.cpp and torchao's da8w4) and multiplies nibbles and int8 with AVX-512 VNNI dot products,
// 64 multiply-adds per instruction. It is built only for CPUs that have VNNI (cpu_kernels.py checks);
// elsewhere herd keeps PyTorch's kernel.
//
// Packed layout (made by herd/quant/int4_kernel.py from the portable nibble form), per block of 32
// output columns and step of 4 inputs, 64 bytes: byte 4 * j + t holds q[32 b + j, 4 s + t] in its
// low nibble and q[32 b + 16 + j, 4 s + t] in its high nibble (j < 16, t < 4). One 64-byte load
// then feeds two dot products, one per nibble, each giving 16 columns 4 inputs deep.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "herd's int4 kernel needs AVX-512 F, BW and VNNI (build with -mavx512f -mavx512bw -mavx512vnni)"
#endif

namespace {

constexpr int64_t kCols = 32;    // output columns per packed block
constexpr int64_t kStep = 4;     // inputs per 32-bit lane of a dot product
constexpr int64_t kXBlock = 32;  // inputs sharing one activation scale

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

// 32 outputs of one row from one packed block w [K / 4, 64] with scales and offsets [K / group, 32].
void block_dot(const QuantRow& x, const uint8_t* w, const float* scale, const float* offset, int64_t K,
               int64_t group, float* y) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc_lo = _mm512_setzero_ps(), acc_hi = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 grp_lo = _mm512_setzero_ps(), grp_hi = _mm512_setzero_ps();
    for (int64_t b = g * group / kXBlock; b < (g + 1) * group / kXBlock; ++b) {
      __m512i dot_lo = _mm512_setzero_si512(), dot_hi = _mm512_setzero_si512();
      for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; k += kStep) {
        const __m512i v = _mm512_loadu_si512(w + k * 16);
        int32_t x4;
        std::memcpy(&x4, x.q + k, 4);
        const __m512i xk = _mm512_set1_epi32(x4);
        dot_lo = _mm512_dpbusd_epi32(dot_lo, _mm512_and_si512(v, low4), xk);
        dot_hi = _mm512_dpbusd_epi32(dot_hi, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xk);
      }
      const __m512 xs = _mm512_set1_ps(x.scale[b]);
      grp_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_lo), xs, grp_lo);
      grp_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi), xs, grp_hi);
    }
    const __m512 xsum = _mm512_set1_ps(x.sum[g]);
    const float* s = scale + g * kCols;
    const float* o = offset + g * kCols;
    acc_lo = _mm512_fmadd_ps(grp_lo, _mm512_loadu_ps(s), _mm512_fmadd_ps(xsum, _mm512_loadu_ps(o), acc_lo));
    acc_hi = _mm512_fmadd_ps(grp_hi, _mm512_loadu_ps(s + 16), _mm512_fmadd_ps(xsum, _mm512_loadu_ps(o + 16), acc_hi));
  }
  _mm512_storeu_ps(y, acc_lo);
  _mm512_storeu_ps(y + 16, acc_hi);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                   int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "herd::int4_mm: x must be float32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == 16 * kStep,
              "herd::int4_mm: packed must be uint8 [N / 32, K / 4, 64]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), G = K / group;
  TORCH_CHECK(packed.size(1) * kStep == K, "herd::int4_mm: x has ", K, " inputs, the weight ", packed.size(1) * kStep);
  TORCH_CHECK(group % kXBlock == 0 && K % group == 0, "herd::int4_mm: the group must be a multiple of 32 dividing K");
  for (const at::Tensor* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == blocks && t->size(1) == G &&
                    t->size(2) == kCols,
                "herd::int4_mm: scales and offsets must be float32 [N / 32, K / group, 32]");
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous(), sc = scale.contiguous(), oc = offset.contiguous();
  at::Tensor y = at::empty({M, blocks * kCols}, x.options());

  std::vector<int8_t> xq(M * K);
  std::vector<float> xscale(M * (K / kXBlock)), xsum(M * G);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, group, xq.data() + m * K, xscale.data() + m * (K / kXBlock), xsum.data() + m * G);

  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float *sp = sc.data_ptr<float>(), *op = oc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread takes whole column blocks; a block's weights (K * 16 bytes) stay in cache across rows.
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m = 0; m < M; ++m) {
        const QuantRow row{xq.data() + m * K, xscale.data() + m * (K / kXBlock), xsum.data() + m * G};
        block_dot(row, wp + b * K * 16, sp + b * G * kCols, op + b * G * kCols, K, group,
                  yp + m * blocks * kCols + b * kCols);
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(herd, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd, CPU, m) { m.impl("int4_mm", &int4_mm); }
