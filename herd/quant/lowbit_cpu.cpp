// herd's low-bit CPU kernel: y[M, N] = x[M, K] @ W^T for int4 or int8 weights with scales and offsets
// per output column and group of inputs, W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k / group
// (q unsigned: 0..15 for int4, 0..255 for int8 stored with +128).
//
// Why hand-written: decoding reads every weight once per token, so at batch 1 it is bound by how
// fast the weights stream in. PyTorch's CPU int4 and int8 kernels spend their time widening the
// weights to floating point (whatever the format, about 16 G weights/s on one core of the AVX-512
// machine we measured, 4-6 on an AMD Zen 3). This kernel instead rounds the activations to int8
// (one scale per 32 inputs, the scheme of llama.cpp and torchao's da8w4) and multiplies them with
// the weights in integer dot products.
//
// One source, two builds (cpu_kernels.py compiles the one the CPU can run, with its -m flags):
// - AVX-512 VNNI (-mavx512f -mavx512bw -mavx512vnni): vpdpbusd, 64 multiply-adds per instruction;
// - AVX2 (-mavx2 -mfma): no byte dot product into int32, so vpmaddubsw multiplies 32 bytes and adds
//   pairs into int16, and vpmaddwd adds those pairs into int32.
// Both compute the same integers, then the same floating-point operations in the same order.
//
// Packed layout (made by herd/quant/cpu_kernels.py from the portable forms): the outputs are cut into
// blocks (32 columns for int4, 16 for int8) and the inputs into steps of 4; each (block, step) is 64
// bytes, byte 4 * j + t holding the weight of column j and input 4 * s + t. For int4, byte j holds
// columns j (low nibble) and 16 + j (high nibble), so one 64-byte load feeds two dot products
// (AVX2 reads it as two 32-byte halves, columns 0-7 and 8-15).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
  const float* scale;    // [K / 32]
  const int32_t* total;  // [K / 32] sums of q (the AVX2 int8 dot product needs them)
  const float* sum;      // [K / group] sums of scale * q
};

void quantize_row(const float* x, int64_t K, int64_t group, int8_t* q, float* scale, int32_t* total, float* sum) {
  std::fill(sum, sum + K / group, 0.f);
  for (int64_t b = 0; b < K / kXBlock; ++b) {
    const float* xb = x + b * kXBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kXBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.f;
    const float inv = s > 0.f ? 1.f / s : 0.f;
    total[b] = 0;
    for (int64_t i = 0; i < kXBlock; ++i) {
      q[b * kXBlock + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
      total[b] += q[b * kXBlock + i];
    }
    scale[b] = s;
    sum[b * kXBlock / group] += s * static_cast<float>(total[b]);
  }
}

// The four activations of step k, repeated in every 32-bit lane.
inline int32_t step_of(const QuantRow& x, int64_t k) {
  int32_t x4;
  std::memcpy(&x4, x.q + k, 4);
  return x4;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

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
        const __m512i xk = _mm512_set1_epi32(step_of(x, k));
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

#elif defined(__AVX2__) && defined(__FMA__)

// The integer dot products of one block of 32 inputs (b), 8 columns per vector: for int4 the low
// nibbles of the two 32-byte halves (columns 0-7, 8-15), then their high nibbles (16-23, 24-31).
template <int64_t Bits>
void block_integers(const QuantRow& x, const uint8_t* w, int64_t b, __m256i* dot) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits == 4) {
    // A pair of int4 x int8 products is at most 2 * 15 * 127 in size, so the int16 sums of a
    // block's 8 steps (at most 30480) cannot overflow: widen to int32 once per block.
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i pairs[4];
    for (auto& p : pairs) p = _mm256_setzero_si256();
    for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; k += kStep) {
      const __m256i xk = _mm256_set1_epi32(step_of(x, k));
      for (int64_t h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        pairs[h] = _mm256_add_epi16(pairs[h], _mm256_maddubs_epi16(lo, xk));
        pairs[2 + h] = _mm256_add_epi16(pairs[2 + h], _mm256_maddubs_epi16(hi, xk));
      }
    }
    for (int64_t i = 0; i < 4; ++i) dot[i] = _mm256_madd_epi16(pairs[i], ones);
  } else {
    // Stored u = s + 128 would saturate vpmaddubsw (2 * 255 * 127 > 32767), so multiply the signed
    // s = u ^ 0x80 instead, as |s| times x with s's sign (a pair is at most 2 * 128 * 127), and add
    // back 128 * (the block's sum of x) for the +128.
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    dot[0] = dot[1] = _mm256_set1_epi32(128 * x.total[b]);
    for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; k += kStep) {
      const __m256i xk = _mm256_set1_epi32(step_of(x, k));
      for (int64_t h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 32 * h));
        const __m256i s = _mm256_xor_si256(v, flip);
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(xk, s));
        dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
}

// One block's outputs (8 per vector) for one row, from its packed weights w [K / 4, 64] and its
// scales and offsets [K / group, block_cols]: the AVX-512 version's arithmetic, half as wide.
template <int64_t Bits>
void block_dot(const QuantRow& x, const uint8_t* w, const float* scale, const float* offset, int64_t K,
               int64_t group, float* y) {
  constexpr int64_t kVecs = block_cols(Bits) / 8;
  __m256 acc[kVecs];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m256 grp[kVecs];
    for (auto& a : grp) a = _mm256_setzero_ps();
    for (int64_t b = g * group / kXBlock; b < (g + 1) * group / kXBlock; ++b) {
      __m256i dot[kVecs];
      block_integers<Bits>(x, w, b, dot);
      const __m256 xs = _mm256_set1_ps(x.scale[b]);
      for (int64_t i = 0; i < kVecs; ++i) grp[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), xs, grp[i]);
    }
    const __m256 xsum = _mm256_set1_ps(x.sum[g]);
    for (int64_t i = 0; i < kVecs; ++i) {
      const __m256 s = _mm256_loadu_ps(scale + (g * kVecs + i) * 8), o = _mm256_loadu_ps(offset + (g * kVecs + i) * 8);
      acc[i] = _mm256_fmadd_ps(grp[i], s, _mm256_fmadd_ps(xsum, o, acc[i]));
    }
  }
  for (int64_t i = 0; i < kVecs; ++i) _mm256_storeu_ps(y + 8 * i, acc[i]);
}

#else
#error "herd's low-bit kernel needs AVX-512 F/BW/VNNI or AVX2 and FMA (build with their -m flags)"
#endif

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
  std::vector<int32_t> xtotal(M * (K / kXBlock));
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, group, xq.data() + m * K, xscale.data() + m * (K / kXBlock),
                 xtotal.data() + m * (K / kXBlock), xsum.data() + m * G);

  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float *sp = sc.data_ptr<float>(), *op = oc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto dot = bits == 4 ? block_dot<4> : block_dot<8>;
  // Each thread takes whole column blocks; a block's weights (K * 16 bytes) stay in cache across rows.
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t m = 0; m < M; ++m) {
        const QuantRow row{xq.data() + m * K, xscale.data() + m * (K / kXBlock), xtotal.data() + m * (K / kXBlock),
                           xsum.data() + m * G};
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
