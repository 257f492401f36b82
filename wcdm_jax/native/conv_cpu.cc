// Direct and Winograd 'same' convolutions for XLA:CPU, float32, NHWC x HWIO -> NHWC.
//
// Built by wcdm_jax/native_build.py once per instruction set, from this one source:
//   -DWCDM_ISA_AVX512 (with -mavx512f -mavx2 -mfma): 16-lane vectors, 32 registers;
//   -DWCDM_ISA_AVX2   (with -mavx2 -mfma):           8-lane vectors, 16 registers;
//   neither (generic): plain C++17, no intrinsics, written for the compiler to vectorise
//   (SSE2 on x86-64, NEON on aarch64, whatever the target has elsewhere).
// Only the few vector operations of namespace `simd` differ between the builds; every
// algorithm below is written once against them. Kernels (called through the XLA FFI):
//   WcdmConvFwd:      y[b,i,j,o]  = sum_{dy,dx,c} x[b,i+dy-p,j+dx-p,c] w[dy,dx,c,o]  (ReLU optional)
//   WcdmConvWinograd: the same for 3x3 kernels by Winograd F(2x2, 3x3)
//   WcdmConvWgrad:    dw[dy,dx,c,o] = sum_{b,i,j} x[b,i+dy-p,j+dx-p,c] g[b,i,j,o]
// (the input gradient is WcdmConvFwd with the flipped, transposed kernel). Out-of-image taps
// are skipped, so nothing is padded. Work is split over XLA's intra-op thread pool in a fixed
// partition, and every sum has a fixed order: results are bit-identical run to run and for any
// number of threads. Requirements checked by the Python side: odd k, Cout % 16 == 0 (and
// Cin % 16 == 0 for Winograd).
//
// Besides the kernels the library exports WcdmIsa() (the instruction set it was built for) and
// WcdmBuildTag() (the build's cache key), both checked after loading.
#if defined(WCDM_ISA_AVX512) || defined(WCDM_ISA_AVX2)
#include <immintrin.h>
#endif

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

#ifndef WCDM_BUILD_TAG
#define WCDM_BUILD_TAG "untagged"
#endif

namespace ffi = xla::ffi;

// Kernel-gradient partial sums: a fixed count, so the summation order never depends on the
// number of threads (results are bit-identical run to run and across thread counts).
constexpr int64_t kWgradChunks = 16;

#ifndef WCDM_WINO_TILES
#define WCDM_WINO_TILES 24  // Winograd tiles per work item (at least one row of tiles)
#endif

namespace simd {
// kLanes floats a vector; kAcc accumulators fit in registers beside the loads of one
// micro-kernel step; kMaxNV vectors of output channels at most per tile.
#if defined(WCDM_ISA_AVX512)
constexpr const char* kIsa = "avx512";
constexpr int kLanes = 16, kAcc = 24, kMaxNV = 4;
using V = __m512;
inline V Zero() { return _mm512_setzero_ps(); }
inline V Set1(float a) { return _mm512_set1_ps(a); }
inline V Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V Max(V a, V b) { return _mm512_max_ps(a, b); }
#elif defined(WCDM_ISA_AVX2)
constexpr const char* kIsa = "avx2";
constexpr int kLanes = 8, kAcc = 12, kMaxNV = 2;  // the 6 x 16 tile: 12 + 2 + 1 of 16 registers
using V = __m256;
inline V Zero() { return _mm256_setzero_ps(); }
inline V Set1(float a) { return _mm256_set1_ps(a); }
inline V Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V Max(V a, V b) { return _mm256_max_ps(a, b); }
#else
constexpr const char* kIsa = "generic";
// Overridable geometry: the 'generic16' build has the AVX-512 one (16 lanes, 24 accumulators,
// 4 vectors) and plain arrays (WCDM_PLAIN_CXX), so the tests run that tiling, and the code any
// C++17 compiler gets, on every CPU.
#ifndef WCDM_LANES
#define WCDM_LANES 4
#endif
#ifndef WCDM_ACC
#if defined(__aarch64__)
#define WCDM_ACC 24  // 32 NEON registers
#else
#define WCDM_ACC 12  // 16 SSE registers
#endif
#endif
#ifndef WCDM_MAX_NV
#define WCDM_MAX_NV 4
#endif
constexpr int kLanes = WCDM_LANES, kAcc = WCDM_ACC, kMaxNV = WCDM_MAX_NV;
#if defined(__GNUC__) && !defined(WCDM_PLAIN_CXX)
// GCC's and Clang's generic vectors: plain arithmetic that the compiler maps onto the target's
// registers (SSE2, NEON, ...), kept in registers like any scalar.
typedef float V __attribute__((vector_size(kLanes * sizeof(float))));
inline V Set1(float a) { return V{} + a; }
inline V Zero() { return V{}; }
inline V Load(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void Store(float* p, V a) { std::memcpy(p, &a, sizeof(a)); }
inline V Fma(V a, V b, V c) { return a * b + c; }
inline V Add(V a, V b) { return a + b; }
inline V Sub(V a, V b) { return a - b; }
inline V Mul(V a, V b) { return a * b; }
inline V Max(V a, V b) { return a > b ? a : b; }
#else
// Any other C++17 compiler (and WCDM_PLAIN_CXX): arrays and loops.
struct V {
  float f[kLanes];
};
template <typename Op>
inline V Map(V a, V b, Op op) {
  V r;
  for (int l = 0; l < kLanes; ++l) r.f[l] = op(a.f[l], b.f[l]);
  return r;
}
inline V Set1(float a) {
  V r;
  for (int l = 0; l < kLanes; ++l) r.f[l] = a;
  return r;
}
inline V Zero() { return Set1(0.f); }
inline V Load(const float* p) {
  V r;
  std::memcpy(r.f, p, sizeof(r.f));
  return r;
}
inline void Store(float* p, V a) { std::memcpy(p, a.f, sizeof(a.f)); }
inline V Fma(V a, V b, V c) {
  V r;
  for (int l = 0; l < kLanes; ++l) r.f[l] = a.f[l] * b.f[l] + c.f[l];
  return r;
}
inline V Add(V a, V b) { return Map(a, b, [](float u, float v) { return u + v; }); }
inline V Sub(V a, V b) { return Map(a, b, [](float u, float v) { return u - v; }); }
inline V Mul(V a, V b) { return Map(a, b, [](float u, float v) { return u * v; }); }
inline V Max(V a, V b) { return Map(a, b, [](float u, float v) { return u > v ? u : v; }); }
#endif
#endif
static_assert(16 % kLanes == 0, "vectors must divide the 16-channel blocks");
}  // namespace simd

namespace {

using simd::kLanes;
using simd::V;

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

// The micro-kernel of every kernel here: y[i, L v : L v + L] (+)= sum_k a(i, k) b[k, L v : L v + L]
// for R rows i and NV vectors of L = kLanes columns, accumulated in R x NV registers.
// a(i, k) = a[i * lda + k] or, with kKMajor, a[k * lda + i]; b and y have row strides ldb, ldy.
// kInit: start from zero instead of y; kRelu: store max(0, result).
template <int R, int NV, bool kInit, bool kKMajor, bool kRelu = false>
inline void OuterTile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kn,
                      float* y, int64_t ldy) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = kInit ? simd::Zero() : simd::Load(y + i * ldy + kLanes * v);
  for (int64_t k = 0; k < kn; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = simd::Load(b + k * ldb + kLanes * v);
    for (int i = 0; i < R; ++i) {
      const V av = simd::Set1(kKMajor ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = simd::Fma(av, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v)
      simd::Store(y + i * ldy + kLanes * v, kRelu ? simd::Max(simd::Zero(), acc[i][v]) : acc[i][v]);
}

// OuterTile over rows [0, n) in blocks of R, the remainder in one narrower tile (its
// independent accumulators keep the FMA units busy).
template <int R, int NV, bool kInit, bool kKMajor, bool kRelu = false>
void OuterSpan(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kn, float* y,
               int64_t ldy, int64_t n) {
  const int64_t step = kKMajor ? 1 : lda;  // from one row i of a to the next
  int64_t i = 0;
  for (; i + R <= n; i += R)
    OuterTile<R, NV, kInit, kKMajor, kRelu>(a + i * step, lda, b, ldb, kn, y + i * ldy, ldy);
  a += i * step, y += i * ldy;
  switch (n - i) {
    case 0: break;
    case 1: OuterTile<1, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy); break;
    case 2: OuterTile<2, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy); break;
    case 3: OuterTile<3, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy); break;
    case 4: OuterTile<4, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy); break;
    case 5: OuterTile<5, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy); break;
    default:
      for (; i < n; ++i, a += step, y += ldy)
        OuterTile<1, NV, kInit, kKMajor, kRelu>(a, lda, b, ldb, kn, y, ldy);
  }
}

// Rows of a tile: every accumulator register in use (the kernel gradient: at most 8 rows).
template <int NV>
constexpr int kFwdRows = simd::kAcc / NV;
template <int NV>
constexpr int kWgradRows = std::min(8, simd::kAcc / NV);

// y[j, :] (+)= x[j, :] @ w for n pixels j (x rows stride ci, y rows stride co).
template <int NV, bool kInit = false, bool kRelu = false>
void FwdRowSpan(const float* x, int64_t n, int64_t ci, const float* w, int64_t co, float* y) {
  OuterSpan<kFwdRows<NV>, NV, kInit, false, kRelu>(x, ci, w, co, ci, y, co, n);
}

// fn(std::integral_constant<int, NV>, o) over output-channel blocks [o, o + kLanes NV): the
// widest NV <= kMaxNV (4, 2 or 1) that divides what is left.
template <typename F>
void ForOutputBlocks(int64_t co, F&& fn) {
  for (int64_t o = 0; o < co;) {
    const int64_t left = co - o;
    if constexpr (simd::kMaxNV >= 4) {
      if (left % (4 * kLanes) == 0) {
        fn(std::integral_constant<int, 4>{}, o), o += 4 * kLanes;
        continue;
      }
    }
    if constexpr (simd::kMaxNV >= 2) {
      if (left % (2 * kLanes) == 0) {
        fn(std::integral_constant<int, 2>{}, o), o += 2 * kLanes;
        continue;
      }
    }
    fn(std::integral_constant<int, 1>{}, o), o += kLanes;
  }
}

struct Shape {
  int64_t b, h, w, ci, co, k;
};

// One output row y[b, i, :, :]. The centre tap, which covers every pixel, comes first and
// initialises the row (no zeroing pass); for 1x1 kernels it is the only one and the ReLU is
// applied as it is stored, otherwise in a last pass.
void FwdRow(const Shape& s, const float* x, const float* w, float* y, int64_t b, int64_t i,
            bool relu) {
  const int64_t p = s.k / 2;
  float* yr = y + ((b * s.h + i) * s.w) * s.co;
  const float* xc = x + ((b * s.h + i) * s.w) * s.ci;
  const float* wc = w + ((p * s.k + p) * s.ci) * s.co;
  const bool fused_relu = relu && s.k == 1;
  ForOutputBlocks(s.co, [&](auto nv, int64_t o) {
    constexpr int NV = decltype(nv)::value;
    if (fused_relu) {
      FwdRowSpan<NV, true, true>(xc, s.w, s.ci, wc + o, s.co, yr + o);
    } else {
      FwdRowSpan<NV, true>(xc, s.w, s.ci, wc + o, s.co, yr + o);
    }
  });
  for (int64_t dy = 0; dy < s.k; ++dy) {
    const int64_t ii = i + dy - p;
    if (ii < 0 || ii >= s.h) continue;
    const float* xr = x + ((b * s.h + ii) * s.w) * s.ci;
    for (int64_t dx = 0; dx < s.k; ++dx) {
      if (dy == p && dx == p) continue;  // done above
      const int64_t j0 = std::max<int64_t>(0, p - dx), j1 = std::min<int64_t>(s.w, s.w + p - dx);
      if (j1 <= j0) continue;
      const float* xs = xr + (j0 + dx - p) * s.ci;
      const float* wt = w + ((dy * s.k + dx) * s.ci) * s.co;
      ForOutputBlocks(s.co, [&](auto nv, int64_t o) {
        FwdRowSpan<decltype(nv)::value>(xs, j1 - j0, s.ci, wt + o, s.co, yr + j0 * s.co + o);
      });
    }
  }
  if (relu && !fused_relu) {
    const V zero = simd::Zero();
    for (int64_t q = 0; q < s.w * s.co; q += kLanes)
      simd::Store(yr + q, simd::Max(zero, simd::Load(yr + q)));
  }
}

// dw[c, :] += sum_j x[j, c] g[j, :] over n pixels j, for every c < ci (x rows stride ci,
// g and dw rows stride co).
template <int NV>
void WgradSpan(const float* x, const float* g, int64_t n, int64_t ci, int64_t co, float* dw) {
  OuterSpan<kWgradRows<NV>, NV, false, true>(x, ci, g, co, n, dw, co, ci);
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
// 16 matrix products (tiles x Ci) @ (Ci x Co) replace the 9 of the direct form on 2.25x
// fewer multiplies. Vectorised over kLanes channels; Ci, Co % 16 == 0.

// V[xi][t][c] for the tiles t of output tile-rows [r0, r1) of image b.
void WinoInput(const Shape& s, const float* x, int64_t b, int64_t r0, int64_t r1, int64_t tw,
               float* v, int64_t tiles) {
  using simd::Add, simd::Sub;
  const V zero = simd::Zero();
  int64_t t = 0;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < tw; ++q, ++t)
      for (int64_t c = 0; c < s.ci; c += kLanes) {
        V d[4][4];
        for (int i = 0; i < 4; ++i) {
          const int64_t ii = 2 * r - 1 + i;
          for (int j = 0; j < 4; ++j) {
            const int64_t jj = 2 * q - 1 + j;
            d[i][j] = (ii < 0 || ii >= s.h || jj < 0 || jj >= s.w)
                          ? zero
                          : simd::Load(x + ((b * s.h + ii) * s.w + jj) * s.ci + c);
          }
        }
        V e[4][4];  // B^T d
        for (int j = 0; j < 4; ++j) {
          e[0][j] = Sub(d[0][j], d[2][j]);
          e[1][j] = Add(d[1][j], d[2][j]);
          e[2][j] = Sub(d[2][j], d[1][j]);
          e[3][j] = Sub(d[1][j], d[3][j]);
        }
        for (int i = 0; i < 4; ++i) {  // (B^T d) B
          const V f[4] = {Sub(e[i][0], e[i][2]), Add(e[i][1], e[i][2]), Sub(e[i][2], e[i][1]),
                          Sub(e[i][1], e[i][3])};
          for (int j = 0; j < 4; ++j) simd::Store(v + ((4 * i + j) * tiles + t) * s.ci + c, f[j]);
        }
      }
}

// y tiles from M[xi][t][o]: A^T M A, clipped to the image, optional ReLU.
void WinoOutput(const Shape& s, const float* m, int64_t b, int64_t r0, int64_t r1, int64_t tw,
                int64_t tiles, float* y, bool relu) {
  using simd::Add, simd::Sub;
  const V zero = simd::Zero();
  int64_t t = 0;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < tw; ++q, ++t)
      for (int64_t o = 0; o < s.co; o += kLanes) {
        V a[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = simd::Load(m + ((4 * i + j) * tiles + t) * s.co + o);
        V e[2][4];  // A^T M
        for (int j = 0; j < 4; ++j) {
          e[0][j] = Add(Add(a[0][j], a[1][j]), a[2][j]);
          e[1][j] = Sub(Sub(a[1][j], a[2][j]), a[3][j]);
        }
        for (int i = 0; i < 2; ++i) {
          const int64_t ii = 2 * r + i;
          if (ii >= s.h) continue;
          const V out[2] = {Add(Add(e[i][0], e[i][1]), e[i][2]),
                            Sub(Sub(e[i][1], e[i][2]), e[i][3])};
          for (int j = 0; j < 2; ++j) {
            const int64_t jj = 2 * q + j;
            if (jj >= s.w) continue;
            simd::Store(y + ((b * s.h + ii) * s.w + jj) * s.co + o,
                        relu ? simd::Max(zero, out[j]) : out[j]);
          }
        }
      }
}

// U[4a+b][c][o] = sum_ij G[a][i] w[i][j][c][o] G[b][j] for G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
void WinoKernel(const float* w, int64_t ci, int64_t co, float* u) {
  using simd::Add, simd::Mul, simd::Sub;
  const V half = simd::Set1(0.5f);
  const int64_t plane = ci * co;
  for (int64_t q = 0; q < plane; q += kLanes) {
    V g[3][3], t[4][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) g[i][j] = simd::Load(w + (3 * i + j) * plane + q);
    for (int j = 0; j < 3; ++j) {
      const V even = Mul(half, Add(g[0][j], g[2][j])), odd = Mul(half, g[1][j]);
      t[0][j] = g[0][j], t[1][j] = Add(even, odd), t[2][j] = Sub(even, odd), t[3][j] = g[2][j];
    }
    for (int a = 0; a < 4; ++a) {
      const V even = Mul(half, Add(t[a][0], t[a][2])), odd = Mul(half, t[a][1]);
      simd::Store(u + (4 * a + 0) * plane + q, t[a][0]);
      simd::Store(u + (4 * a + 1) * plane + q, Add(even, odd));
      simd::Store(u + (4 * a + 2) * plane + q, Sub(even, odd));
      simd::Store(u + (4 * a + 3) * plane + q, t[a][2]);
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

extern "C" {

const char* WcdmIsa() { return simd::kIsa; }

const char* WcdmBuildTag() { return WCDM_BUILD_TAG; }

}  // extern "C"
