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
// The arithmetic, not memory, bounded the first version (25 ns per slot on two cores for 72
// vector FMAs); this one keeps each loaded vector in a register for all the FMAs that use it,
// reads f32 rows where they lie, and scores four slots against four query rows per pass
// (bench/results/DECODE.md section 0).
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
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace dsj;

constexpr int64_t kSlotBlock = 32;   // slots scored, then accumulated, while they sit in L1
constexpr int64_t kMinItemSlots = 1024;

struct Shape {
  int64_t B, M, C, R, P, MB;   // rows, query rows, widths, slots per block, blocks per row
};

// Register blocking: with 32 vector registers (AVX-512) the score pass takes four slots and the
// value pass 32 accumulator lanes per query row at once; with 16, two and 16.
#if defined(__AVX512F__)
constexpr int kScoreSlots = 4, kValueChunks = 4;
#else
constexpr int kScoreSlots = 2, kValueChunks = 2;
#endif

// Scores of slots j0 .. j0 + kScoreSlots against four query rows q[i] ([latent | rope], padded):
// out[(j0 + s) * 4 + i] (slot-major, four rows per slot). Each slot's vector is loaded once
// (`keep`: folded into every FMA it would be loaded four times).
#define DSJ_FMA4(a, x) a##0 += x * w0, a##1 += x * w1, a##2 += x * w2, a##3 += x * w3
template <typename X>
inline void score_slots(const X* const* xl, const X* const* xr, int64_t j0, const float* q,
                        int64_t Cp, int64_t Rp, float* out) {
  const int64_t K = Cp + Rp;
  v8 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
#if defined(__AVX512F__)
  v8 c0{}, c1{}, c2{}, c3{}, d0{}, d1{}, d2{}, d3{};
#endif
  auto part = [&](const X* const* xs, const float* qs, int64_t width) {
    const X *pa = xs[j0], *pb = xs[j0 + 1];
#if defined(__AVX512F__)
    const X *pc = xs[j0 + 2], *pd = xs[j0 + 3];
#endif
    for (int64_t k = 0; k < width; k += kW) {
      v8 w0 = load8(qs + k), w1 = load8(qs + K + k), w2 = load8(qs + 2 * K + k),
               w3 = load8(qs + 3 * K + k);
      keep(w0), keep(w1), keep(w2), keep(w3);
      v8 x = load8(pa + k), y = load8(pb + k);
      keep(x), keep(y);
      DSJ_FMA4(a, x);
      DSJ_FMA4(b, y);
#if defined(__AVX512F__)
      v8 z = load8(pc + k), u = load8(pd + k);
      keep(z), keep(u);
      DSJ_FMA4(c, z);
      DSJ_FMA4(d, u);
#endif
    }
  };
  part(xl, q, Cp);
  part(xr, q + Cp, Rp);
  store8(out + j0 * 4, hsum8(a0, a1, a2, a3, b0, b1, b2, b3));
#if defined(__AVX512F__)
  store8(out + (j0 + 2) * 4, hsum8(c0, c1, c2, c3, d0, d1, d2, d3));
#endif
}
#undef DSJ_FMA4

// acc[i, c0 + 8 v] += sum_j p[j * 4 + i] x[j][c0 + 8 v] for four rows and NC 8-lane chunks.
template <typename X, int NC>
inline void accumulate(const X* const* xl, int64_t nb, const float* p, int64_t c0, int64_t Cp,
                       float* acc) {
  v8 t[4][NC];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NC; ++v) t[i][v] = load8(acc + i * Cp + c0 + v * kW);
  for (int64_t j = 0; j < nb; ++j) {
    v8 x[NC];
    for (int v = 0; v < NC; ++v) x[v] = load8(xl[j] + c0 + v * kW);
    for (int i = 0; i < 4; ++i) {
      const v8 pj = bcast(p + j * 4 + i);
      for (int v = 0; v < NC; ++v) t[i][v] += pj * x[v];
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NC; ++v) store8(acc + i * Cp + c0 + v * kW, t[i][v]);
}

// One item: row b, slots [s0, s1). q [M4, Cp + Rp] (padded, rows past M zero); pos [M]. Writes
// m_run[M], l[M], acc[M, C]. Each block of kSlotBlock slots is scored against four query rows
// at a time, folded into their online softmax (f32), and accumulated while it is still in L1.
// X: the element type the passes read: the cache's own when `in_place` (f32 or bf16 read where
// they lie: both parts in that format, widths of whole vectors), else f32 (rows widened into an
// L1 block first).
template <typename X, bool in_place, typename Lat, typename Rope>
void attend_impl(const Shape& d, const float* q, int64_t M4, const typename Lat::T* lat,
                 const typename Rope::T* rope, const int32_t* table, const int32_t* pos,
                 int64_t s0, int64_t s1,
                 float* m_run, float* l, float* acc) {
  const int64_t M = d.M, C = d.C, R = d.R, P = d.P, Cp = pad8(C), Rp = pad8(R), K = Cp + Rp;
  // Slot s is row table[s / P] P + s % P of the layer's pool (no division per slot).
  int64_t block = s0 / P, off = s0 % P;
  const typename Lat::T* lat_row;
  const typename Rope::T* rope_row;
  auto seek = [&]() {
    const int64_t row = static_cast<int64_t>(table[block]) * P + off;
    lat_row = lat + row * C, rope_row = rope + row * R;
  };
  seek();
  std::vector<float> blk(in_place ? 0 : kSlotBlock * K), p(M4 * kSlotBlock), accp(M4 * Cp, 0.0f),
      m_g(M4, kNegInf), l_g(M4, 0.0f);
  std::vector<X> zero(K, X{});   // the row of a padding slot (0 is 0 in f32 and bf16 bits)
  const X* xl[kSlotBlock];
  const X* xr[kSlotBlock];
  std::vector<int32_t> lim(M4, -1);   // the last slot each query row sees (-1: a padding row)
  for (int64_t m = 0; m < M; ++m) lim[m] = pos[m];
  const int32_t min_lim = *std::min_element(lim.begin(), lim.end());
  for (int64_t sb = s0; sb < s1; sb += kSlotBlock) {
    const int64_t nb = std::min<int64_t>(kSlotBlock, s1 - sb);
    const int64_t nbs = (nb + kScoreSlots - 1) / kScoreSlots * kScoreSlots;
    for (int64_t j = 0; j < nb; ++j) {
      if constexpr (in_place) {
        xl[j] = lat_row, xr[j] = rope_row;
      } else {
        widen<Lat>(lat_row, C, Cp, blk.data() + j * K);
        widen<Rope>(rope_row, R, Rp, blk.data() + j * K + Cp);
        xl[j] = blk.data() + j * K, xr[j] = xl[j] + Cp;
      }
      if (++off == P) {
        off = 0, ++block;
        if (block < d.MB) seek();
      } else {
        lat_row += C, rope_row += R;
      }
    }
    for (int64_t j = nb; j < nbs; ++j) xl[j] = zero.data(), xr[j] = zero.data() + Cp;
    const bool masked = nbs > nb || min_lim < sb + nb - 1;
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
      float* pg = p.data() + m0 * kSlotBlock;   // [slot][4 rows]
      const float* qg = q + m0 * K;
      for (int64_t j = 0; j < nbs; j += kScoreSlots) score_slots(xl, xr, j, qg, Cp, Rp, pg);
      // Online softmax of the four rows over the block: a v8 holds two slots x four rows.
      const vi8 lane_row = {0, 1, 2, 3, 0, 1, 2, 3}, lane_slot = {0, 0, 0, 0, 1, 1, 1, 1};
      vi8 limv;
      for (int i = 0; i < 8; ++i) limv[i] = lim[m0 + lane_row[i]] - static_cast<int32_t>(sb);
      const vi8 nbv = vi8{} + static_cast<int32_t>(nb);
      v8 mx = splat(kNegInf);
      for (int64_t j = 0; j < nbs; j += 2) {
        v8 x = load8(pg + j * 4);
        if (masked) {
          const vi8 slot = lane_slot + static_cast<int32_t>(j);
          x = (slot <= limv) & (slot < nbv) ? x : splat(kNegInf);
          store8(pg + j * 4, x);
        }
        mx = mx > x ? mx : x;
      }
      const v8 other = swap_halves(mx);
      mx = mx > other ? mx : other;   // lanes i and i + 4: row i's block maximum
      v8 mr;
      for (int i = 0; i < 8; ++i) mr[i] = m_g[m0 + lane_row[i]];
      const v8 mn = mr > mx ? mr : mx;
      const v8 base = mn == splat(kNegInf) ? splat(0.0f) : mn;   // no -inf - -inf
      v8 sum{};
      for (int64_t j = 0; j < nbs; j += 2) {
        const v8 e = exp8(load8(pg + j * 4) - base);
        store8(pg + j * 4, e);
        sum += e;
      }
      sum += swap_halves(sum);
      const v8 r = exp8(mr - base);   // the running state's rescale (0 while it is empty)
      for (int i = 0; i < 4; ++i) {
        l_g[m0 + i] = l_g[m0 + i] * r[i] + sum[i];
        m_g[m0 + i] = mn[i];
        if (r[i] != 1.0f) {
          float* am = accp.data() + (m0 + i) * Cp;
          for (int64_t c = 0; c < Cp; c += kW) store8(am + c, load8(am + c) * r[i]);
        }
      }
      float* am = accp.data() + m0 * Cp;
      int64_t c0 = 0;
      for (; c0 + kValueChunks * kW <= Cp; c0 += kValueChunks * kW)
        accumulate<X, kValueChunks>(xl, nb, pg, c0, Cp, am);
      for (; c0 < Cp; c0 += kW) accumulate<X, 1>(xl, nb, pg, c0, Cp, am);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    m_run[m] = m_g[m], l[m] = l_g[m];
    std::memcpy(acc + m * C, accp.data() + m * Cp, C * sizeof(float));
  }
}
template <typename Lat, typename Rope>
void attend_range(const Shape& d, const float* q, int64_t M4, const typename Lat::T* lat,
                  const typename Rope::T* rope, const int32_t* table, const int32_t* pos,
                  int64_t s0, int64_t s1, float* m_run, float* l, float* acc) {
  using T = typename Lat::T;
  constexpr bool same = std::is_same<T, typename Rope::T>::value && !std::is_same<Lat, E4M3>::value;
  if constexpr (same) {
    if (d.C % kW == 0 && d.R % kW == 0)
      return attend_impl<T, true, Lat, Rope>(d, q, M4, lat, rope, table, pos, s0, s1, m_run, l,
                                             acc);
  }
  attend_impl<float, false, Lat, Rope>(d, q, M4, lat, rope, table, pos, s0, s1, m_run, l, acc);
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
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());   // parallel_for's
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
  std::vector<float> qpad(static_cast<size_t>(B * M4 * K), 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(qpad.data() + (b * M4 + m) * K, q_lat + (b * M + m) * C, C * sizeof(float));
      std::memcpy(qpad.data() + (b * M4 + m) * K + Cp, q_rope + (b * M + m) * d.R,
                  d.R * sizeof(float));
    }
  const int64_t part = M * (C + 2);   // m_run, l, acc per item
  std::vector<float> state(static_cast<size_t>(n * part));
  const int64_t base = layer * NB * d.P;
  parallel_for(pool, n, [&](int64_t i) {
    const Item& it = items[i];
    float* st = state.data() + i * part;
    attend_range<Lat, Rope>(d, qpad.data() + it.b * M4 * K, M4, lat + base * C, rope + base * d.R,
                            table + it.b * d.MB, pos + it.b * M, it.s0, it.s1, st, st + M,
                            st + 2 * M);
  });
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
      for (int64_t m = 0; m < M; ++m) mx[m] = std::max(mx[m], state[k * part + m]);
    float* ob = out + b * M * C;
    for (int64_t k = first; k < i; ++k) {
      const float* st = state.data() + k * part;
      for (int64_t m = 0; m < M; ++m) {
        if (st[M + m] == 0.0f) continue;   // saw no slot (a NaN item is not skipped)
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
