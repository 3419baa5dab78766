// The absorbed MLA decode attention on the CPU: one pass over the latent cache (V3 report §2.1.1;
// the structure of FlashMLA's decode kernel). XLA:CPU cannot fuse it: it copies every dynamic
// slice of the cache before a dot and runs the score and value dots as two passes
// (bench/results/DECODE.md), so this kernel reads each cached slot once, scores it against every
// query row, and folds it into an online softmax while the slot is still in L1.
//
// out[b, m, :] = softmax_s(q_lat[b, m] . c[b, s] + q_rope[b, m] . k[b, s]) . c[b, s]
//   over the slots s <= pos[b, m] (and s < MB P), where row b's slot s lives in the pools
//   lat [L, NB, P, C] and rope [L, NB, P, R] at layer `layer`, block table[b, s / P], offset
//   s % P (a paged cache; a contiguous [L, B, S, .] cache is NB = B blocks of P = S slots with
//   table[b] = [b]); a row that sees no slot gets zeros. Queries come scaled, in f32; the
//   cache is f32, bf16, or e4m3fn latent with a bf16 rope key; softmax and sums are f32.
// Work is split into (row, slot range) items across XLA's intra-op thread pool (split-K, as
// flash decoding does), each with its own running max, denominator and accumulator, combined.
//
// Built by deepseek_jax/kernels/cpu.py with the system C++ compiler against jaxlib's FFI headers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSlotBlock = 32;   // slots scored, then accumulated, while they sit in L1
constexpr int64_t kMinItemSlots = 1024;
constexpr int64_t kPrefetch = 16;   // slots ahead the stream is requested (one at a time)
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
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
inline float hsum(v8 x) { return (x[0] + x[1] + x[2] + x[3]) + (x[4] + x[5] + x[6] + x[7]); }
// out[i] = sum of a[i]'s lanes for eight vectors: three levels of pairwise shuffles and adds.
inline v8 hsum8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
  const vi8 e0 = {0, 8, 1, 9, 4, 12, 5, 13}, o0 = {2, 10, 3, 11, 6, 14, 7, 15};
  const vi8 e1 = {0, 1, 8, 9, 4, 5, 12, 13}, o1 = {2, 3, 10, 11, 6, 7, 14, 15};
  const vi8 e2 = {0, 1, 2, 3, 8, 9, 10, 11}, o2 = {4, 5, 6, 7, 12, 13, 14, 15};
  const v8 t0 = __builtin_shuffle(a0, a1, e0) + __builtin_shuffle(a0, a1, o0);
  const v8 t1 = __builtin_shuffle(a2, a3, e0) + __builtin_shuffle(a2, a3, o0);
  const v8 t2 = __builtin_shuffle(a4, a5, e0) + __builtin_shuffle(a4, a5, o0);
  const v8 t3 = __builtin_shuffle(a6, a7, e0) + __builtin_shuffle(a6, a7, o0);
  const v8 u0 = __builtin_shuffle(t0, t1, e1) + __builtin_shuffle(t0, t1, o1);
  const v8 u1 = __builtin_shuffle(t2, t3, e1) + __builtin_shuffle(t2, t3, o1);
  return __builtin_shuffle(u0, u1, e2) + __builtin_shuffle(u0, u1, o2);
}
inline int64_t pad8(int64_t n) { return (n + kW - 1) / kW * kW; }
inline int64_t pad2(int64_t n) { return (n + 1) / 2 * 2; }

// e^x for x <= 0 (a softmax's s - max), 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error < 3e-7), 2^n put into the exponent bits; x < -87
// (and -inf) -> 0.
inline v8 exp8(v8 x) {
  const vi8 under = x < splat(-87.0f);
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
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
  const vi8 bits = (n + 127) << 23;
  const v8 y = p * reinterpret_cast<const v8&>(bits);
  return under ? splat(0.0f) : y;
}

// One slot widened to an f32 row of `width` (a multiple of 8, zero-padded).
template <typename Fmt>
inline void widen(const typename Fmt::T* src, int64_t n, int64_t width, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Fmt::get(src, i);
  for (int64_t i = n; i < width; ++i) dst[i] = 0.0f;
}

struct Shape {
  int64_t B, M, C, R, P, MB;   // rows, query rows, widths, slots per block, blocks per row
};

// One item: row b, slots [s0, s1). q [M4, Cp + Rp] (padded, rows past M zero). Writes
// m_run[M], l[M], acc[M, C].
template <typename Lat, typename Rope>
void attend_range(const Shape& d, const float* q, int64_t M4, const typename Lat::T* lat,
                  const typename Rope::T* rope, const int32_t* table, const int32_t* pos,
                  int64_t s0, int64_t s1,
                  float* m_run, float* l, float* acc) {
  const int64_t M = d.M, C = d.C, R = d.R, P = d.P, Cp = pad8(C), Rp = pad8(R), K = Cp + Rp;
  // Slot s is row table[s / P] P + s % P of the layer's pool; `now` walks the slots read, `later`
  // the slots kPrefetch ahead (no division per slot).
  struct Walk {
    const int32_t* table;
    int64_t P, block, off;
    int64_t row() const { return static_cast<int64_t>(table[block]) * P + off; }
    void next() { if (++off == P) off = 0, ++block; }
  };
  Walk now{table, P, s0 / P, s0 % P}, later{table, P, (s0 + kPrefetch) / P, (s0 + kPrefetch) % P};
  std::vector<float> blk(kSlotBlock * K), p(M4 * kSlotBlock, 0.0f), accp(M4 * Cp, 0.0f);
  std::fill(m_run, m_run + M, kNegInf);
  std::fill(l, l + M, 0.0f);
  for (int64_t sb = s0; sb < s1; sb += kSlotBlock) {
    const int64_t nb = std::min<int64_t>(kSlotBlock, s1 - sb);
    for (int64_t j = 0; j < nb; ++j) {   // the slot's latent then rope key, one f32 row of K
      if (sb + j + kPrefetch < s1) {   // asked for now, used kPrefetch slots later
        const char* lp = reinterpret_cast<const char*>(lat + later.row() * C);
        for (int64_t o = 0; o < C * int64_t(sizeof(typename Lat::T)); o += 64)
          __builtin_prefetch(lp + o);
        __builtin_prefetch(rope + later.row() * R);
        later.next();
      }
      widen<Lat>(lat + now.row() * C, C, Cp, blk.data() + j * K);
      widen<Rope>(rope + now.row() * R, R, Rp, blk.data() + j * K + Cp);
      now.next();
    }
    // Scores, two slots against four query rows per pass (eight running sums, one tree reduce).
    for (int64_t j = nb; j < pad2(nb); ++j) std::fill(&blk[j * K], &blk[j * K] + K, 0.0f);
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
      const float *q0 = q + m0 * K, *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
      for (int64_t j = 0; j < nb; j += 2) {
        const float *x = blk.data() + j * K, *y = x + K;
        v8 a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
        for (int64_t k = 0; k < K; k += kW) {
          const v8 xv = load8(x + k), yv = load8(y + k);
          const v8 w0 = load8(q0 + k), w1 = load8(q1 + k), w2 = load8(q2 + k), w3 = load8(q3 + k);
          a0 += xv * w0, a1 += xv * w1, a2 += xv * w2, a3 += xv * w3;
          a4 += yv * w0, a5 += yv * w1, a6 += yv * w2, a7 += yv * w3;
        }
        const v8 sums = hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
        for (int i = 0; i < 4; ++i) {
          p[(m0 + i) * kSlotBlock + j] = sums[i];
          p[(m0 + i) * kSlotBlock + j + 1] = sums[4 + i];
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {   // online softmax over the block
      float* pm = p.data() + m * kSlotBlock;
      const int64_t vis = std::min<int64_t>(nb, static_cast<int64_t>(pos[m]) - sb + 1);
      if (vis <= 0) {
        std::fill(pm, pm + kSlotBlock, 0.0f);
        continue;
      }
      float bmax = kNegInf;
      for (int64_t j = 0; j < vis; ++j) bmax = std::max(bmax, pm[j]);
      const float mn = std::max(m_run[m], bmax);
      for (int64_t j = vis; j < kSlotBlock; ++j) pm[j] = kNegInf;
      float sum = 0.0f;
      for (int64_t j = 0; j < kSlotBlock; j += kW) {
        const v8 e = exp8(load8(pm + j) - mn);
        store8(pm + j, e);
        sum += hsum(e);
      }
      const float r = m_run[m] == kNegInf ? 0.0f : exp8(splat(m_run[m] - mn))[0];
      if (r != 1.0f)
        for (int64_t c = 0; c < Cp; c += kW) store8(&accp[m * Cp + c],
                                                      load8(&accp[m * Cp + c]) * r);
      l[m] = l[m] * r + sum;
      m_run[m] = mn;
    }
    // Values, acc[m] += p[m, j] lat[j]: four rows x 16 lanes of the accumulator in registers.
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
      const float* pm = p.data() + m0 * kSlotBlock;
      float* am = accp.data() + m0 * Cp;
      for (int64_t c = 0; c < Cp; c += 2 * kW) {
        const bool two = c + kW < Cp;
        v8 t[8];
        for (int i = 0; i < 4; ++i) {
          t[2 * i] = load8(am + i * Cp + c);
          t[2 * i + 1] = two ? load8(am + i * Cp + c + kW) : v8{};
        }
        for (int64_t j = 0; j < nb; ++j) {
          const float* x = blk.data() + j * K + c;
          const v8 x0 = load8(x), x1 = two ? load8(x + kW) : v8{};
          for (int i = 0; i < 4; ++i) {
            const float pj = pm[i * kSlotBlock + j];
            t[2 * i] += pj * x0;
            t[2 * i + 1] += pj * x1;
          }
        }
        for (int i = 0; i < 4; ++i) {
          store8(am + i * Cp + c, t[2 * i]);
          if (two) store8(am + i * Cp + c + kW, t[2 * i + 1]);
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) std::memcpy(acc + m * C, accp.data() + m * Cp, C * sizeof(float));
}

struct Item { int64_t b, s0, s1; };

template <typename Lat, typename Rope>
ffi::Error run(ffi::ThreadPool pool, const Shape& d, int64_t NB, int64_t layer,
               const float* q_lat, const float* q_rope, const void* lat_v, const void* rope_v,
               const int32_t* table, const int32_t* pos, float* out) {
  const auto* lat = static_cast<const typename Lat::T*>(lat_v);
  const auto* rope = static_cast<const typename Rope::T*>(rope_v);
  const int64_t B = d.B, M = d.M, C = d.C, S = d.P * d.MB;
  for (int64_t i = 0; i < B * d.MB; ++i)
    if (table[i] < 0 || table[i] >= NB)
      return ffi::Error::InvalidArgument("latent_decode: a block table entry is outside the pool");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  // Each row's slots up to its furthest query, cut so that there are a few items per thread.
  std::vector<Item> items;
  int64_t total = 0;
  std::vector<int64_t> used(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = -1;
    for (int64_t m = 0; m < M; ++m) last = std::max<int64_t>(last, pos[b * M + m]);
    used[b] = std::min<int64_t>(S, last + 1);
    total += used[b];
  }
  const int64_t chunk = std::max<int64_t>(kMinItemSlots, total / (4 * threads) + 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s0 = 0; s0 < used[b]; s0 += chunk)
      items.push_back({b, s0, std::min(used[b], s0 + chunk)});
  const int64_t n = static_cast<int64_t>(items.size());
  // Queries padded: rows to a multiple of 4, [latent | rope] each to multiples of 8 lanes.
  const int64_t M4 = (M + 3) / 4 * 4, Cp = pad8(C), K = Cp + pad8(d.R);
  auto qpad = std::make_shared<std::vector<float>>(static_cast<size_t>(B * M4 * K), 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(qpad->data() + (b * M4 + m) * K, q_lat + (b * M + m) * C, C * sizeof(float));
      std::memcpy(qpad->data() + (b * M4 + m) * K + Cp, q_rope + (b * M + m) * d.R,
                  d.R * sizeof(float));
    }
  const int64_t part = M * (C + 2);   // m_run, l, acc per item
  auto state = std::make_shared<std::vector<float>>(static_cast<size_t>(n * part));
  auto next = std::make_shared<std::atomic<int64_t>>(0);
  auto done = std::make_shared<std::atomic<int64_t>>(0);
  auto work = [=, &items]() {
    for (int64_t i; (i = next->fetch_add(1)) < n;) {
      const Item& it = items[i];
      float* st = state->data() + i * part;
      const int64_t base = layer * NB * d.P;
      attend_range<Lat, Rope>(d, qpad->data() + it.b * M4 * K, M4, lat + base * C,
                              rope + base * d.R, table + it.b * d.MB, pos + it.b * M, it.s0,
                              it.s1, st, st + M, st + 2 * M);
      done->fetch_add(1);
    }
  };
  // Helpers that start after the work ran out find `next` past the end and touch nothing else;
  // the caller waits only for items some thread took (each finishes), then reads the parts.
  for (int64_t t = 1; t < std::min(threads, n); ++t) {
    pool.Schedule([next, n, work]() { if (next->load() < n) work(); });
  }
  work();
  while (done->load() < n) std::this_thread::yield();
  // Combine the items of each row.
  std::fill(out, out + B * M * C, 0.0f);
  std::vector<float> mx(M), den(M);
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = i;
    while (i < n && items[i].b == b) ++i;
    std::fill(mx.begin(), mx.end(), kNegInf);
    std::fill(den.begin(), den.end(), 0.0f);
    for (int64_t k = first; k < i; ++k)
      for (int64_t m = 0; m < M; ++m) mx[m] = std::max(mx[m], (*state)[k * part + m]);
    float* ob = out + b * M * C;
    for (int64_t k = first; k < i; ++k) {
      const float* st = state->data() + k * part;
      for (int64_t m = 0; m < M; ++m) {
        if (st[m] == kNegInf) continue;
        const float w = std::exp(st[m] - mx[m]);
        den[m] += w * st[M + m];
        for (int64_t c = 0; c < C; ++c) ob[m * C + c] += w * st[2 * M + m * C + c];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      if (den[m] > 0.0f)
        for (int64_t c = 0; c < C; ++c) ob[m * C + c] /= den[m];
  }
  return ffi::Error::Success();
}

ffi::Error LatentDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_lat,
                            ffi::Buffer<ffi::F32> q_rope, ffi::AnyBuffer lat, ffi::AnyBuffer rope,
                            ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> pos,
                            ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q_lat.dimensions(), rd = q_rope.dimensions(), ld = lat.dimensions(),
       kd = rope.dimensions(), td = table.dimensions(), pd = pos.dimensions();
  if (qd.size() != 3 || rd.size() != 3 || ld.size() != 4 || kd.size() != 4 || td.size() != 2 ||
      pd.size() != 2)
    return ffi::Error::InvalidArgument("latent_decode: ranks must be 3, 3, 4, 4, 2, 2");
  const Shape d{qd[0], qd[1], qd[2], rd[2], ld[2], td[1]};
  if (ld[3] != d.C || kd[0] != ld[0] || kd[1] != ld[1] || kd[2] != d.P || kd[3] != d.R ||
      rd[0] != d.B || rd[1] != d.M || td[0] != d.B || pd[0] != d.B || pd[1] != d.M)
    return ffi::Error::InvalidArgument("latent_decode: shapes do not match");
  const int64_t L = ld[0], NB = ld[1];
  const int64_t li = static_cast<int64_t>(layer.typed_data()[0]);
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("latent_decode: layer out of range");
  auto lt = lat.element_type(), rt = rope.element_type();
  const float *ql = q_lat.typed_data(), *qr = q_rope.typed_data();
  const int32_t *t = table.typed_data(), *p = pos.typed_data();
  const void *lv = lat.untyped_data(), *rv = rope.untyped_data();
  float* o = out->typed_data();
  if (lt == ffi::DataType::F32 && rt == ffi::DataType::F32)
    return run<F32, F32>(pool, d, NB, li, ql, qr, lv, rv, t, p, o);
  if (lt == ffi::DataType::BF16 && rt == ffi::DataType::BF16)
    return run<BF16, BF16>(pool, d, NB, li, ql, qr, lv, rv, t, p, o);
  if (lt == ffi::DataType::F8E4M3FN && rt == ffi::DataType::BF16)
    return run<E4M3, BF16>(pool, d, NB, li, ql, qr, lv, rv, t, p, o);
  return ffi::Error::InvalidArgument("latent_decode: cache dtypes must be f32/f32, bf16/bf16 or "
                                     "f8e4m3fn/bf16");
}

// The cache write of a decode step, in place: rows[b, t] >= 0 is the row (block * P + offset) of
// layer `layer` that new[b, t] goes to. XLA:CPU widens a bf16 / f8 dynamic-update-slice to f32
// over the whole cache (a convert of every slot, each step); this copies the new rows only.
ffi::Error LatentWriteImpl(ffi::AnyBuffer cache, ffi::AnyBuffer fresh, ffi::Buffer<ffi::S32> rows,
                           ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out) {
  auto cd = cache.dimensions(), fd = fresh.dimensions(), rd = rows.dimensions();
  if (cd.size() != 4 || fd.size() != 3 || rd.size() != 2 || fd[2] != cd[3] || rd[0] != fd[0] ||
      rd[1] != fd[1] || cache.element_type() != fresh.element_type())
    return ffi::Error::InvalidArgument("latent_write: shapes or dtypes do not match");
  const int64_t L = cd[0], n_rows = cd[1] * cd[2], W = cd[3];
  const int64_t li = static_cast<int64_t>(layer.typed_data()[0]);
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("latent_write: layer out of range");
  const size_t row_bytes = static_cast<size_t>(W) * ffi::ByteWidth(cache.element_type());
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data())   // XLA did not alias the buffers: start from the input
    std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const char* src = static_cast<const char*>(fresh.untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t i = 0; i < rd[0] * rd[1]; ++i) {
    if (r[i] < 0) continue;
    if (r[i] >= n_rows) return ffi::Error::InvalidArgument("latent_write: a row outside the cache");
    std::memcpy(dst + (li * n_rows + r[i]) * row_bytes, src + i * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LatentDecode, LatentDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_lat [B, M, C], scaled
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_rope [B, M, R], scaled
                                  .Arg<ffi::AnyBuffer>()          // lat [L, NB, P, C]
                                  .Arg<ffi::AnyBuffer>()          // rope [L, NB, P, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // table [B, MB]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos [B, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [B, M, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LatentWrite, LatentWriteImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // cache [L, NB, P, W]
                                  .Arg<ffi::AnyBuffer>()          // new [B, T, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows [B, T] (-1: skip)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Ret<ffi::AnyBuffer>());        // the cache, aliased
