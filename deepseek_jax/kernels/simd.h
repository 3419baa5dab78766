// Vector and number-format helpers of the CPU kernels (latent_decode.cc, moe_decode.cc): 8-lane
// f32 vectors in GCC's vector extension, which clang shares (AVX2 registers on x86; split where
// the target is narrower), a horizontal sum of eight vectors, e^x for a softmax, and the cache
// formats widened to f32 eight lanes at a time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace dsj {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float from_bf16(uint16_t x) {   // a bf16 is an f32's top half
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  return std::memcpy(&f, &bits, 4), f;
}

struct E4M3Table {   // e4m3fn byte -> f32 (NaN for the two NaN patterns)
  float v[256];
  E4M3Table() {
    for (int i = 0; i < 256; ++i) {
      int sign = i >> 7, exp = (i >> 3) & 15, man = i & 7;
      float mag = exp == 0 ? std::ldexp(static_cast<float>(man), -9)
                           : std::ldexp(1.0f + man / 8.0f, exp - 7);
      if (exp == 15 && man == 7) mag = std::numeric_limits<float>::quiet_NaN();
      v[i] = sign ? -mag : mag;
    }
  }
};
const E4M3Table kE4M3;

struct F32 { using T = float; static float get(const float* p, int64_t i) { return p[i]; } };
struct BF16 {
  using T = uint16_t;
  static float get(const T* p, int64_t i) { return from_bf16(p[i]); }
};
struct E4M3 { using T = uint8_t; static float get(const T* p, int64_t k) { return kE4M3.v[p[k]]; }};

typedef float v8 __attribute__((vector_size(32)));     // 8 lanes (AVX2 on x86; GCC splits
typedef int32_t vi8 __attribute__((vector_size(32)));   // them where the target is narrower)
constexpr int kW = 8;

inline v8 splat(float f) { return v8{} + f; }
inline v8 load8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline v8 load8(const uint16_t* p) {   // eight bf16 -> f32 (a bf16 is an f32's top half)
#if defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<v8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  v8 x;
  for (int i = 0; i < kW; ++i) x[i] = from_bf16(p[i]);
  return x;
#endif
}
// Eight e4m3fn -> f32 without a table: the low seven bits placed at an f32's exponent and
// mantissa and the exponent rebased (+120: bias 127 vs 7) for normals; m 2^-9 through an integer
// conversion for subnormals (no f32 denormal: XLA's threads flush them); NaN for |byte| 0x7F.
typedef uint32_t vu8 __attribute__((vector_size(32)));
inline v8 load8(const uint8_t* p) {
#if defined(__AVX2__)   // (GCC's __builtin_convertvector from eight bytes goes through scalars)
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const vu8 b = reinterpret_cast<vu8>(_mm256_cvtepu8_epi32(raw));
#else
  vu8 b;
  for (int i = 0; i < kW; ++i) b[i] = p[i];
#endif
  const vu8 em = b & 0x7Fu, sign = (b & 0x80u) << 24;
  const vu8 normal = (em << 20) + (120u << 23);
  const v8 sub = __builtin_convertvector(reinterpret_cast<vi8>(em), v8) * (1.0f / 512.0f);
  const v8 nan = splat(std::numeric_limits<float>::quiet_NaN());
  const vu8 mag = em == 0x7Fu ? reinterpret_cast<vu8>(nan)
                  : em < 8u ? reinterpret_cast<vu8>(sub) : normal;
  return reinterpret_cast<v8>(mag | sign);
}
inline v8 bcast(const float* p) {
#if defined(__AVX__)
  return reinterpret_cast<v8>(_mm256_broadcast_ss(p));
#else
  return splat(*p);
#endif
}
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
// Keeps a vector in a register from here on (GCC would otherwise fold its load into every FMA
// that uses it, loading it again for each); a no-op where a vector is not one register.
#if defined(__AVX__)
inline void keep(v8& x) { asm("" : "+v"(x)); }
#else
inline void keep(v8&) {}
#endif
// Lane shuffles of two 8-lane vectors by constant indices (0-7: a's lanes, 8-15: b's), in the
// builtin each compiler has: clang's and GCC >= 12's __builtin_shufflevector, older GCC's
// __builtin_shuffle with a mask vector.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define DSJ_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DSJ_SHUF(a, b, ...) __builtin_shuffle(a, b, vi8{__VA_ARGS__})
#endif
// out[i] = sum of a[i]'s lanes for eight vectors: three levels of pairwise shuffles and adds.
inline v8 hsum8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
#define DSJ_PAIR(a, b, e, o) (DSJ_SHUF(a, b, e) + DSJ_SHUF(a, b, o))
#define DSJ_E0 0, 8, 1, 9, 4, 12, 5, 13
#define DSJ_O0 2, 10, 3, 11, 6, 14, 7, 15
#define DSJ_E1 0, 1, 8, 9, 4, 5, 12, 13
#define DSJ_O1 2, 3, 10, 11, 6, 7, 14, 15
#define DSJ_E2 0, 1, 2, 3, 8, 9, 10, 11
#define DSJ_O2 4, 5, 6, 7, 12, 13, 14, 15
  const v8 t0 = DSJ_PAIR(a0, a1, DSJ_E0, DSJ_O0), t1 = DSJ_PAIR(a2, a3, DSJ_E0, DSJ_O0);
  const v8 t2 = DSJ_PAIR(a4, a5, DSJ_E0, DSJ_O0), t3 = DSJ_PAIR(a6, a7, DSJ_E0, DSJ_O0);
  const v8 u0 = DSJ_PAIR(t0, t1, DSJ_E1, DSJ_O1), u1 = DSJ_PAIR(t2, t3, DSJ_E1, DSJ_O1);
  return DSJ_PAIR(u0, u1, DSJ_E2, DSJ_O2);
#undef DSJ_PAIR
#undef DSJ_E0
#undef DSJ_O0
#undef DSJ_E1
#undef DSJ_O1
#undef DSJ_E2
#undef DSJ_O2
}
// The upper and lower four lanes exchanged.
inline v8 swap_halves(v8 x) { return DSJ_SHUF(x, x, 4, 5, 6, 7, 0, 1, 2, 3); }
inline int64_t pad8(int64_t n) { return (n + kW - 1) / kW * kW; }

// e^x for x <= 0 (a softmax's s - max), 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error < 3e-7), 2^n put into the exponent bits; x < -87
// (and -inf) -> 0; NaN stays NaN (the arithmetic runs on 0 in its lanes: no NaN -> int).
inline v8 exp8(v8 in) {
  const vi8 nan = in != in, under = in < splat(-87.0f);
  v8 x = under | nan ? splat(0.0f) : in;
  x = x > splat(0.0f) ? splat(0.0f) : x;
  const vi8 n = __builtin_convertvector(x * 1.44269504f - 0.5f, vi8);   // round: x <= 0
  const v8 nf = __builtin_convertvector(n, v8);
  const v8 r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  v8 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi8 bits = (n + 127) * (1 << 23);   // n >= -126: no signed shift of a negative
  const v8 y = p * reinterpret_cast<v8>(bits);
  return nan ? in : under ? splat(0.0f) : y;
}

// One slot widened to an f32 row of `width` (a multiple of 8, zero-padded).
template <typename Fmt>
inline void widen(const typename Fmt::T* src, int64_t n, int64_t width, float* dst) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store8(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = Fmt::get(src, i);
  for (int64_t i = n; i < width; ++i) dst[i] = 0.0f;
}

}  // namespace dsj
