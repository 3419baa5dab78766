// The routed experts of a decode step on the CPU (DeepSeekMoE, V3 report §2.1.2): each hit
// expert's SwiGLU FFN on the few tokens routed to it, its weights read once where they lie.
//
// out[x, k, :] = (silu(x_in[x] W_gate[e]) * (x_in[x] W_up[e])) W_down[e] for e = experts[x, k]
//   (zeros where e lies outside [0, E): a slot with no expert); f32 in and out, the weights
//   f32, sums in f32. The caller (dispatch.dropless_ffn) combines the K outputs with the gates.
// XLA:CPU runs this as a loop over padded blocks of tokens (~24 per layer at 8 tokens, top-4 of
// 16), copying each block's expert weights out of the layer's stack before three small dots:
// ~10 ops and a weight copy per block. Here each (expert, four tokens) item reads the expert's
// three matrices once, with the four tokens' products in registers, over XLA's threads.
//
// Built by deepseek_jax/kernels/cpu.py with latent_decode.cc into one library.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace dsj;

constexpr int kTok = 4;   // tokens whose products share one read of a weight row

struct Work { int64_t e, first, n; };   // expert, its first (token, k) slot in `slots`, count

// acc[i, :W] = sum_r in[i, r] w[r, :W] for n <= kTok rows of `in` (stride `ld`), `w` [rows, W]
// row-major with stride `ldw`; W a multiple of 8, sixteen lanes at a time.
inline void rows_times(const float* const* in, int n, const float* w, int64_t rows, int64_t ldw,
                       int64_t W, float* const* acc) {
  for (int64_t c = 0; c < W; c += 2 * kW) {
    const bool two = c + kW < W;
    v8 t[kTok][2] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = w + r * ldw + c;
      v8 w0 = load8(wr), w1 = two ? load8(wr + kW) : v8{};
      keep(w0), keep(w1);
      for (int i = 0; i < kTok; ++i) {
        if (i >= n) break;
        const v8 xi = bcast(in[i] + r);
        t[i][0] += xi * w0, t[i][1] += xi * w1;
      }
    }
    for (int i = 0; i < n; ++i) {
      store8(acc[i] + c, t[i][0]);
      if (two) store8(acc[i] + c + kW, t[i][1]);
    }
  }
}

// silu(g) * u in place in g: g sigmoid(g) with sigmoid from e^-|g| (exp8 takes x <= 0).
inline void swiglu(float* g, const float* u, int64_t W) {
  for (int64_t c = 0; c < W; c += kW) {
    const v8 x = load8(g + c), ax = x < splat(0.0f) ? -x : x;
    const v8 e = exp8(-ax), s = x < splat(0.0f) ? e / (1.0f + e) : 1.0f / (1.0f + e);
    store8(g + c, x * s * load8(u + c));
  }
}

ffi::Error MoeDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                         ffi::Buffer<ffi::F32> w_down, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), ed = experts.dimensions(), gd = w_gate.dimensions(),
       ud = w_up.dimensions(), dd = w_down.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || gd.size() != 3 || ud.size() != 3 || dd.size() != 3)
    return ffi::Error::InvalidArgument("moe_decode: ranks must be 2, 2, 3, 3, 3");
  const int64_t X = xd[0], D = xd[1], K = ed[1], E = gd[0], M = gd[2];
  if (ed[0] != X || gd[1] != D || ud[0] != E || ud[1] != D || ud[2] != M || dd[0] != E ||
      dd[1] != M || dd[2] != D)
    return ffi::Error::InvalidArgument("moe_decode: shapes do not match");
  const int64_t Dp = pad8(D), Mp = pad8(M);
  const float *xs = x.typed_data(), *wg = w_gate.typed_data(), *wu = w_up.typed_data(),
              *wd = w_down.typed_data();
  const int32_t* ex = experts.typed_data();
  float* o = out->typed_data();
  std::fill(o, o + X * K * D, 0.0f);
  // The (token, k) slots of each expert, in token order; items of up to kTok slots.
  std::vector<int64_t> slots, start(E + 1, 0);
  for (int64_t a = 0; a < X * K; ++a)
    if (ex[a] >= 0 && ex[a] < E) ++start[ex[a] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  slots.resize(start[E]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < X * K; ++a)
    if (ex[a] >= 0 && ex[a] < E) slots[fill[ex[a]]++] = a;
  std::vector<Work> items;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t f = start[e]; f < start[e + 1]; f += kTok)
      items.push_back({e, f, std::min<int64_t>(kTok, start[e + 1] - f)});
  // Widths padded to whole vectors (zeros), so a weight matrix is read in place only when its
  // rows are: M and D multiples of 8 (else copied, padded, per item).
  const bool in_place = M == Mp && D == Dp;
  parallel_for(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Work& it = items[i];
    const int n = static_cast<int>(it.n);
    std::vector<float> buf(kTok * (Dp + 2 * Mp + Dp), 0.0f), pad;
    const float *in[kTok], *h[kTok];
    float *g[kTok], *u[kTok], *y[kTok];
    for (int t = 0; t < kTok; ++t) {
      float* row = buf.data() + t * (2 * Dp + 2 * Mp);
      in[t] = row, g[t] = row + Dp, u[t] = row + Dp + Mp, y[t] = row + Dp + 2 * Mp, h[t] = g[t];
      if (t < n) std::memcpy(row, xs + slots[it.first + t] / K * D, D * sizeof(float));
    }
    const float *gate = wg + it.e * D * M, *up = wu + it.e * D * M, *down = wd + it.e * M * D;
    if (!in_place) {   // rows padded to whole vectors
      pad.assign(2 * D * Mp + M * Dp, 0.0f);
      for (int64_t r = 0; r < D; ++r) {
        std::memcpy(&pad[r * Mp], gate + r * M, M * sizeof(float));
        std::memcpy(&pad[D * Mp + r * Mp], up + r * M, M * sizeof(float));
      }
      for (int64_t r = 0; r < M; ++r) std::memcpy(&pad[2 * D * Mp + r * Dp], down + r * D, D * 4);
      gate = pad.data(), up = pad.data() + D * Mp, down = pad.data() + 2 * D * Mp;
    }
    rows_times(in, n, gate, D, Mp, Mp, g);
    rows_times(in, n, up, D, Mp, Mp, u);
    for (int t = 0; t < n; ++t) swiglu(g[t], u[t], Mp);
    rows_times(h, n, down, M, Dp, Dp, y);
    for (int t = 0; t < n; ++t) std::memcpy(o + slots[it.first + t] * D, y[t], D * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeDecode, MoeDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [X, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // experts [X, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate [E, D, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up [E, D, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down [E, M, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out [X, K, D]
