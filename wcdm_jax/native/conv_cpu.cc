// Direct 'same' convolutions for XLA:CPU, AVX-512, float32, NHWC x HWIO -> NHWC.
//
// Built on first use by wcdm_jax/native_conv.py and called through the XLA FFI. Kernels:
//   wcdm_conv_fwd:   y[b,i,j,o]  = sum_{dy,dx,c} x[b,i+dy-p,j+dx-p,c] w[dy,dx,c,o]  (optional ReLU)
//   wcdm_conv_winograd: the same for 3x3 kernels by Winograd F(2x2, 3x3)
//   wcdm_conv_wgrad: dw[dy,dx,c,o] = sum_{b,i,j} x[b,i+dy-p,j+dx-p,c] g[b,i,j,o]
// (the input gradient is wcdm_conv_fwd with the flipped, transposed kernel). Out-of-image
// taps are skipped, so nothing is padded. Work is split over XLA's intra-op thread pool.
// Requirements checked by the Python side: odd k, Cout % 16 == 0.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Kernel-gradient partial sums: a fixed count, so the summation order never depends on the
// number of threads (results are bit-identical run to run and across thread counts).
constexpr int64_t kWgradChunks = 16;

#ifndef WCDM_WINO_TILES
#define WCDM_WINO_TILES 24  // Winograd tiles per work item (at least one row of tiles)
#endif

namespace {

// Runs fn(item, worker) for item in [0, n) on the calling thread and the pool's threads;
// returns when every item is done. Workers that start late find no items left and return
// without touching the caller's buffers.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int max_workers,
                 std::function<void(int64_t, int)> fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> worker{0};
    int64_t n;
    std::function<void(int64_t, int)> fn;
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->fn = std::move(fn);
  auto work = [st] {
    int id = st->worker.fetch_add(1);
    for (int64_t i; (i = st->next.fetch_add(1)) < st->n;) {
      st->fn(i, id);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  int helpers = static_cast<int>(std::min<int64_t>(max_workers - 1, n - 1));
  for (int t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// The calling thread plus num_threads - 1 helpers: one worker per pool thread.
int NumWorkers(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
}

// The micro-kernel of every kernel here: y[i, 16v:16v+16] (+)= sum_k a(i, k) b[k, 16v:16v+16]
// for R rows i and 16 NV columns, accumulated in R x NV registers. a(i, k) = a[i * lda + k]
// or, with kKMajor, a[k * lda + i]; b and y have row strides ldb, ldy. kInit: start from zero
// instead of y.
template <int R, int NV, bool kInit, bool kKMajor>
inline void OuterTile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kn,
                      float* y, int64_t ldy) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = kInit ? _mm512_setzero_ps() : _mm512_loadu_ps(y + i * ldy + 16 * v);
  for (int64_t k = 0; k < kn; ++k) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    for (int i = 0; i < R; ++i) {
      __m512 av = _mm512_set1_ps(kKMajor ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + i * ldy + 16 * v, acc[i][v]);
}

// OuterTile over rows [0, n) in blocks of R, the remainder in one narrower tile (its
// independent accumulators keep the FMA units busy).
template <int R, int NV, bool kInit, bool kKMajor>
void OuterSpan(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kn, float* y,
               int64_t ldy, int64_t n) {
  const int64_t step = kKMajor ? 1 : lda;  // from one row i of a to the next
  int64_t i = 0;
  for (; i + R <= n; i += R)
    OuterTile<R, NV, kInit, kKMajor>(a + i * step, lda, b, ldb, kn, y + i * ldy, ldy);
  a += i * step, y += i * ldy;
  switch (n - i) {
    case 0: break;
    case 1: OuterTile<1, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy); break;
    case 2: OuterTile<2, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy); break;
    case 3: OuterTile<3, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy); break;
    case 4: OuterTile<4, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy); break;
    case 5: OuterTile<5, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy); break;
    default:
      for (; i < n; ++i, a += step, y += ldy)
        OuterTile<1, NV, kInit, kKMajor>(a, lda, b, ldb, kn, y, ldy);
  }
}

// y[j, :] (+)= x[j, :] @ w for n pixels j (x rows stride ci, y rows stride co): 24 / NV pixels
// x 16 NV outputs a tile.
template <int NV, bool kInit = false>
void FwdRowSpan(const float* x, int64_t n, int64_t ci, const float* w, int64_t co, float* y) {
  OuterSpan<24 / NV, NV, kInit, false>(x, ci, w, co, ci, y, co, n);
}

// fn(std::integral_constant<int, NV>, o) over output-channel blocks [o, o + 16 NV), NV in 4, 2, 1.
template <typename F>
void ForOutputBlocks(int64_t co, F&& fn) {
  for (int64_t o = 0; o < co;) {
    const int64_t left = co - o;
    if (left % 64 == 0) {
      fn(std::integral_constant<int, 4>{}, o), o += 64;
    } else if (left % 32 == 0) {
      fn(std::integral_constant<int, 2>{}, o), o += 32;
    } else {
      fn(std::integral_constant<int, 1>{}, o), o += 16;
    }
  }
}

struct Shape {
  int64_t b, h, w, ci, co, k;
};

// One output row y[b, i, :, :].
void FwdRow(const Shape& s, const float* x, const float* w, float* y, int64_t b, int64_t i,
            bool relu) {
  const int64_t p = s.k / 2;
  float* yr = y + ((b * s.h + i) * s.w) * s.co;
  std::memset(yr, 0, sizeof(float) * s.w * s.co);
  for (int64_t dy = 0; dy < s.k; ++dy) {
    const int64_t ii = i + dy - p;
    if (ii < 0 || ii >= s.h) continue;
    const float* xr = x + ((b * s.h + ii) * s.w) * s.ci;
    for (int64_t dx = 0; dx < s.k; ++dx) {
      const int64_t j0 = std::max<int64_t>(0, p - dx), j1 = std::min<int64_t>(s.w, s.w + p - dx);
      if (j1 <= j0) continue;
      const float* xs = xr + (j0 + dx - p) * s.ci;
      const float* wt = w + ((dy * s.k + dx) * s.ci) * s.co;
      ForOutputBlocks(s.co, [&](auto nv, int64_t o) {
        FwdRowSpan<decltype(nv)::value>(xs, j1 - j0, s.ci, wt + o, s.co, yr + j0 * s.co + o);
      });
    }
  }
  if (relu) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t q = 0; q < s.w * s.co; q += 16)
      _mm512_storeu_ps(yr + q, _mm512_max_ps(zero, _mm512_loadu_ps(yr + q)));
  }
}

// dw[c, :] += sum_j x[j, c] g[j, :] over n pixels j, for every c < ci (x rows stride ci,
// g and dw rows stride co).
template <int NV>
void WgradSpan(const float* x, const float* g, int64_t n, int64_t ci, int64_t co, float* dw) {
  OuterSpan<(24 / NV > 8 ? 8 : 24 / NV), NV, false, true>(x, ci, g, co, n, dw, co, ci);
}

// Adds the contribution of rows [i0, i1) of image b to dw (one worker's partial sum).
void WgradRows(const Shape& s, const float* x, const float* g, float* dw, int64_t b, int64_t i0,
               int64_t i1) {
  const int64_t p = s.k / 2;
  for (int64_t dy = 0; dy < s.k; ++dy)
    for (int64_t dx = 0; dx < s.k; ++dx) {
      const int64_t j0 = std::max<int64_t>(0, p - dx), j1 = std::min<int64_t>(s.w, s.w + p - dx);
      if (j1 <= j0) continue;
      float* dwt = dw + ((dy * s.k + dx) * s.ci) * s.co;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t ii = i + dy - p;
        if (ii < 0 || ii >= s.h) continue;
        const float* xs = x + ((b * s.h + ii) * s.w + j0 + dx - p) * s.ci;
        const float* gs = g + ((b * s.h + i) * s.w + j0) * s.co;
        ForOutputBlocks(s.co, [&](auto nv, int64_t o) {
          WgradSpan<decltype(nv)::value>(xs, gs + o, j1 - j0, s.ci, s.co, dwt + o);
        });
      }
    }
}

// --- Winograd F(2x2, 3x3) ------------------------------------------------------------------
// y = A^T [ U (.) (B^T d B) ] A per 2x2 output tile, with U = G w G^T for each (ci, co):
// 16 matrix products (tiles x Ci) @ (Ci x Co) replace the 9 of the
// direct form on 2.25x fewer multiplies. Vectorised over 16 channels; Ci, Co % 16 == 0.

// V[xi][t][c] for the tiles t of output tile-rows [r0, r1) of image b.
void WinoInput(const Shape& s, const float* x, int64_t b, int64_t r0, int64_t r1, int64_t tw,
               float* v, int64_t tiles) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t t = 0;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < tw; ++q, ++t)
      for (int64_t c = 0; c < s.ci; c += 16) {
        __m512 d[4][4];
        for (int i = 0; i < 4; ++i) {
          const int64_t ii = 2 * r - 1 + i;
          for (int j = 0; j < 4; ++j) {
            const int64_t jj = 2 * q - 1 + j;
            d[i][j] = (ii < 0 || ii >= s.h || jj < 0 || jj >= s.w)
                          ? zero
                          : _mm512_loadu_ps(x + ((b * s.h + ii) * s.w + jj) * s.ci + c);
          }
        }
        __m512 e[4][4];  // B^T d
        for (int j = 0; j < 4; ++j) {
          e[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
          e[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
          e[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
          e[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
        }
        for (int i = 0; i < 4; ++i) {  // (B^T d) B
          __m512 f[4] = {_mm512_sub_ps(e[i][0], e[i][2]), _mm512_add_ps(e[i][1], e[i][2]),
                         _mm512_sub_ps(e[i][2], e[i][1]), _mm512_sub_ps(e[i][1], e[i][3])};
          for (int j = 0; j < 4; ++j)
            _mm512_storeu_ps(v + ((4 * i + j) * tiles + t) * s.ci + c, f[j]);
        }
      }
}

// y tiles from M[xi][t][o]: A^T M A, clipped to the image, optional ReLU.
void WinoOutput(const Shape& s, const float* m, int64_t b, int64_t r0, int64_t r1, int64_t tw,
                int64_t tiles, float* y, bool relu) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t t = 0;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < tw; ++q, ++t)
      for (int64_t o = 0; o < s.co; o += 16) {
        __m512 a[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            a[i][j] = _mm512_loadu_ps(m + ((4 * i + j) * tiles + t) * s.co + o);
        __m512 e[2][4];  // A^T M
        for (int j = 0; j < 4; ++j) {
          e[0][j] = _mm512_add_ps(_mm512_add_ps(a[0][j], a[1][j]), a[2][j]);
          e[1][j] = _mm512_sub_ps(_mm512_sub_ps(a[1][j], a[2][j]), a[3][j]);
        }
        for (int i = 0; i < 2; ++i) {
          const int64_t ii = 2 * r + i;
          if (ii >= s.h) continue;
          __m512 out[2] = {_mm512_add_ps(_mm512_add_ps(e[i][0], e[i][1]), e[i][2]),
                           _mm512_sub_ps(_mm512_sub_ps(e[i][1], e[i][2]), e[i][3])};
          for (int j = 0; j < 2; ++j) {
            const int64_t jj = 2 * q + j;
            if (jj >= s.w) continue;
            _mm512_storeu_ps(y + ((b * s.h + ii) * s.w + jj) * s.co + o,
                             relu ? _mm512_max_ps(zero, out[j]) : out[j]);
          }
        }
      }
}

// U[4a+b][c][o] = sum_ij G[a][i] w[i][j][c][o] G[b][j] for G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
void WinoKernel(const float* w, int64_t ci, int64_t co, float* u) {
  const __m512 half = _mm512_set1_ps(0.5f);
  const int64_t plane = ci * co;
  for (int64_t q = 0; q < plane; q += 16) {
    __m512 g[3][3], t[4][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) g[i][j] = _mm512_loadu_ps(w + (3 * i + j) * plane + q);
    for (int j = 0; j < 3; ++j) {
      __m512 even = _mm512_mul_ps(half, _mm512_add_ps(g[0][j], g[2][j]));
      __m512 odd = _mm512_mul_ps(half, g[1][j]);
      t[0][j] = g[0][j], t[1][j] = _mm512_add_ps(even, odd), t[2][j] = _mm512_sub_ps(even, odd);
      t[3][j] = g[2][j];
    }
    for (int a = 0; a < 4; ++a) {
      __m512 even = _mm512_mul_ps(half, _mm512_add_ps(t[a][0], t[a][2]));
      __m512 odd = _mm512_mul_ps(half, t[a][1]);
      _mm512_storeu_ps(u + (4 * a + 0) * plane + q, t[a][0]);
      _mm512_storeu_ps(u + (4 * a + 1) * plane + q, _mm512_add_ps(even, odd));
      _mm512_storeu_ps(u + (4 * a + 2) * plane + q, _mm512_sub_ps(even, odd));
      _mm512_storeu_ps(u + (4 * a + 3) * plane + q, t[a][2]);
    }
  }
}

void WinoGemm(const float* v, const float* u, float* m, int64_t tiles, int64_t ci, int64_t co) {
  for (int xi = 0; xi < 16; ++xi) {
    const float* vx = v + xi * tiles * ci;
    const float* ux = u + xi * ci * co;
    float* mx = m + xi * tiles * co;
    ForOutputBlocks(co, [&](auto nv, int64_t o) {
      FwdRowSpan<decltype(nv)::value, true>(vx, tiles, ci, ux + o, co, mx + o);
    });
  }
}

ffi::Error CheckShapes(const Shape& s) {
  if (s.k % 2 == 0 || s.co % 16 != 0)
    return ffi::Error::InvalidArgument("wcdm conv: needs an odd kernel size and Cout % 16 == 0");
  return ffi::Error::Success();
}

ffi::Error ConvFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, bool relu) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("wcdm conv: expected x (B,H,W,Cin), w (k,k,Cin,Cout)");
  Shape s{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0]};
  if (auto e = CheckShapes(s); e.failure()) return e;
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, s.b * s.h, NumWorkers(pool), [&](int64_t item, int) {
    FwdRow(s, xp, wp, yp, item / s.h, item % s.h, relu);
  });
  return ffi::Error::Success();
}

ffi::Error ConvWinograd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, bool relu) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("wcdm winograd: expected x (B,H,W,Cin), w (3,3,Cin,Cout)");
  Shape s{xd[0], xd[1], xd[2], xd[3], wd[3], 3};
  if (s.ci % 16 != 0 || s.co % 16 != 0)
    return ffi::Error::InvalidArgument("wcdm winograd: needs Cin % 16 == 0 and Cout % 16 == 0");
  const int64_t th = (s.h + 1) / 2, tw = (s.w + 1) / 2;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(th, WCDM_WINO_TILES / tw));
  const int64_t groups = (th + rows - 1) / rows;
  thread_local std::vector<float> ubuf;
  ubuf.resize(16 * s.ci * s.co);
  WinoKernel(w.typed_data(), s.ci, s.co, ubuf.data());
  const float *xp = x.typed_data(), *up = ubuf.data();
  float* yp = y->typed_data();
  ParallelFor(pool, s.b * groups, NumWorkers(pool), [&](int64_t item, int) {
    const int64_t b = item / groups, r0 = (item % groups) * rows, r1 = std::min(th, r0 + rows);
    const int64_t tiles = (r1 - r0) * tw;
    thread_local std::vector<float> buf;
    const size_t need = 16 * tiles * (s.ci + s.co);
    if (buf.size() < need) buf.resize(need);
    float *v = buf.data(), *m = v + 16 * tiles * s.ci;
    WinoInput(s, xp, b, r0, r1, tw, v, tiles);
    WinoGemm(v, up, m, tiles, s.ci, s.co);
    WinoOutput(s, m, b, r0, r1, tw, tiles, yp, relu);
  });
  return ffi::Error::Success();
}

ffi::Error ConvWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                     ffi::ResultBuffer<ffi::F32> dw, int64_t k) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2])
    return ffi::Error::InvalidArgument("wcdm conv wgrad: expected x, g of shape (B,H,W,C)");
  Shape s{xd[0], xd[1], xd[2], xd[3], gd[3], k};
  if (auto e = CheckShapes(s); e.failure()) return e;
  const int64_t size = k * k * s.ci * s.co;
  const int64_t band = std::max<int64_t>(1, std::min<int64_t>(s.h, 512 / s.w));  // ~512 pixels
  const int64_t bands = (s.h + band - 1) / band;
  // Deterministic: the items (image, row band) are cut into a fixed number of contiguous
  // chunks that depends on the shape alone; each chunk sums its items in order into its own
  // partial buffer, and the partials are added in chunk order. Which thread runs a chunk, and
  // how many threads there are, never changes the result.
  const int64_t items = s.b * bands;
  const int64_t chunks = std::min<int64_t>(items, kWgradChunks);
  std::vector<float> partial(static_cast<size_t>(chunks) * size, 0.f);
  const float *xp = x.typed_data(), *gp = g.typed_data();
  ParallelFor(pool, chunks, NumWorkers(pool), [&](int64_t chunk, int) {
    const int64_t first = chunk * items / chunks, last = (chunk + 1) * items / chunks;
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / bands, i0 = (item % bands) * band;
      WgradRows(s, xp, gp, partial.data() + chunk * size, b, i0, std::min(s.h, i0 + band));
    }
  });
  float* out = dw->typed_data();
  std::memcpy(out, partial.data(), sizeof(float) * size);
  for (int64_t t = 1; t < chunks; ++t)
    for (int64_t q = 0; q < size; ++q) out[q] += partial[t * size + q];
  return ffi::Error::Success();
}

// Every kernel: (thread pool; two f32 operands) -> one f32 result, plus one attribute.
auto TwoOperandBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WcdmConvFwd, ConvFwd, TwoOperandBinding().Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(WcdmConvWinograd, ConvWinograd,
                              TwoOperandBinding().Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(WcdmConvWgrad, ConvWgrad, TwoOperandBinding().Attr<int64_t>("k"));
