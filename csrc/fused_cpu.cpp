// fused_cpu.cpp — C++ twins of the non-GEMM parts of a minillm training step: GELU, LayerNorm,
// softmax, the softmax-and-mask middle of attention, cross-entropy and the AdamW update, forward
// and backward. Each function fuses one NumPy function (named at each definition) into one pass
// over memory with no temporaries; the NumPy code stays the reference (minillm/functional.py,
// minillm/optim.py) and minillm/fused.py dispatches here only for C-contiguous float32 NumPy arrays.
//
// Why it pays: NumPy evaluates `0.5*x*(1+tanh(c*(x+k*x**3)))` as a sequence of whole-array passes,
// each reading and writing the (B, T, 4C) activation; here every element is loaded once, the
// arithmetic stays in registers, and rows are split across OpenMP threads when there are enough.
//
// Contract (tested against the NumPy reference in tests/test_01_fused.py)
//   * AdamW: bit-identical (same float32 operations in the same order; this file is compiled with
//     -ffp-contract=off so no multiply-add is fused behind our back).
//   * the others: equal to float32 rounding (rtol 1e-5): exp is Cephes' single-precision
//     polynomial (written out so the loops vectorise), tanh u = 1 − 2/(e^{2u} + 1), and row sums
//     are accumulated in a different order than NumPy's pairwise summation.
//
// Sources: Cephes expf (S. Moshier); llm.c layernorm_forward/backward and
// crossentropy_softmax_backward (A. Karpathy); torch.optim.AdamW (single-tensor path) for the
// order of operations; GPT-2's tanh GELU (Hendrycks & Gimpel 2016 §2).
#include "fused_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// As in nf4_cpu.cpp: compile the hot loops for baseline x86-64, x86-64-v3 (AVX2) and x86-64-v4
// (AVX-512) and let the loader pick by CPU feature bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    __GNUC__ >= 11
#define FUSED_MV __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_MV
#endif
#if defined(__GNUC__)
#define FUSED_INLINE inline __attribute__((always_inline))
#else
#define FUSED_INLINE inline
#endif

namespace fused {
namespace {

// Elementwise work below this many elements runs on one thread (an OpenMP fork costs a few µs).
constexpr int64_t PAR_MIN_ELEMS = 1 << 16;

// Threads the kernels may use: 1 until set_num_threads() says otherwise. Not OpenMP's default (one
// per core): these loops are memory-bound, and on a machine where another process holds a core a
// team of two waits at every barrier for the descheduled thread (measured: LayerNorm 10x slower).
int g_threads = 1;

// Cephes expf: e^x = 2^n · e^r, |r| ≤ ln2/2, e^r by a degree-5 polynomial (≈ 1 ulp). Inputs are
// clamped to [-88, 88]: e^-88 flushes to 0 (the masked entries of a softmax), e^88 stays finite.
FUSED_INLINE float exp_f(float x) {
  x = x < -88.0f ? -88.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float fx = x * 1.44269504088896341f + 0.5f;
  int n = static_cast<int>(fx);
  n -= static_cast<float>(n) > fx;  // floor
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int bits = (n + 127) << 23;  // 2^n; n = -127 gives +0 (flush)
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Row reductions with LANES independent partial sums, so the compiler can keep them in one vector
// register (a single running float sum cannot be reordered, so it would not vectorise).
constexpr int LANES = 8;

FUSED_INLINE float sum_f(const float* x, int64_t n) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += x[j + l];
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  for (; j < n; ++j) s += x[j];
  return s;
}

FUSED_INLINE float dot_f(const float* x, const float* y, int64_t n) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += x[j + l] * y[j + l];
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

FUSED_INLINE float max_f(const float* x, int64_t n) {
  float acc[LANES];
  for (int l = 0; l < LANES; ++l) acc[l] = x[0];
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  float m = acc[0];
  for (int l = 1; l < LANES; ++l) m = m > acc[l] ? m : acc[l];
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  return m;
}

FUSED_INLINE float tanh_f(float u) { return 1.0f - 2.0f / (exp_f(2.0f * u) + 1.0f); }

constexpr float GELU_C = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float GELU_K = 0.044715f;

FUSED_MV void gelu_forward_span(const float* x, float* y, float* tanh_out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float t = tanh_f(GELU_C * (xi + GELU_K * xi * xi * xi));
    tanh_out[i] = t;
    y[i] = 0.5f * xi * (1.0f + t);
  }
}

FUSED_MV void gelu_backward_span(const float* x, const float* tanh_in, const float* g, float* dx,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float t = tanh_in[i];
    const float du = GELU_C * (1.0f + 3.0f * GELU_K * xi * xi);
    dx[i] = g[i] * (0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * du);
  }
}

FUSED_MV void layer_norm_forward_row(const float* x, const float* w, const float* b, float* y,
                                     float* mean_out, float* rstd_out, int64_t C, float eps) {
  const float mu = sum_f(x, C) / static_cast<float>(C);
  float acc[LANES] = {};
  int64_t c0 = 0;
  for (; c0 + LANES <= C; c0 += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += (x[c0 + l] - mu) * (x[c0 + l] - mu);
  float ss = 0.0f;
  for (int l = 0; l < LANES; ++l) ss += acc[l];
  for (; c0 < C; ++c0) ss += (x[c0] - mu) * (x[c0] - mu);
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) y[c] = ((x[c] - mu) * rstd) * w[c] + b[c];
  *mean_out = mu;
  *rstd_out = rstd;
}

FUSED_MV void layer_norm_backward_rows(const float* g, const float* x, const float* w,
                                       const float* mean, const float* rstd, float* dx, float* dw,
                                       float* db, int64_t r0, int64_t r1, int64_t C) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * C;
    const float* xr = x + r * C;
    const float mu = mean[r], rs = rstd[r];
    if (dw != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        dw[c] += gr[c] * ((xr[c] - mu) * rs);
        db[c] += gr[c];
      }
    }
    if (dx != nullptr) {
      float* dr = dx + r * C;
      // dr holds g·w and then xhat·g·w while the two means are taken, then the result
      for (int64_t c = 0; c < C; ++c) dr[c] = gr[c] * w[c];
      const float m1 = sum_f(dr, C) / static_cast<float>(C);
      for (int64_t c = 0; c < C; ++c) dr[c] *= (xr[c] - mu) * rs;
      const float m2 = sum_f(dr, C) / static_cast<float>(C);
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (xr[c] - mu) * rs;
        dr[c] = rs * (gr[c] * w[c] - m1 - xhat * m2);
      }
    }
  }
}

FUSED_MV void softmax_row(const float* x, float* y, int64_t L) {
  const float mx = max_f(x, L);
  for (int64_t j = 0; j < L; ++j) y[j] = exp_f(x[j] - mx);
  const float s = sum_f(y, L);
  for (int64_t j = 0; j < L; ++j) y[j] /= s;
}

FUSED_MV void softmax_backward_row(const float* y, const float* g, float* dx, int64_t L) {
  const float dot = dot_f(g, y, L);
  for (int64_t j = 0; j < L; ++j) dx[j] = y[j] * (g[j] - dot);
}

// One attention row in place: a[j] = softmax over visible j of a[j]·scale. `limit` = number of
// leading keys the causal mask lets through (Tk without a causal mask); kpm = that batch row's
// key padding mask or null. Masked scores get the lowest float, whose exp is exactly 0.
FUSED_MV void attention_row_forward(float* a, int64_t Tk, int64_t limit, float scale,
                                    const uint8_t* kpm) {
  constexpr float LOWEST = -3.4028234663852886e38f;
  bool any = limit > 0;
  for (int64_t j = 0; j < limit; ++j) a[j] *= scale;
  if (kpm != nullptr) {
    int64_t nvis = 0;
    for (int64_t j = 0; j < limit; ++j) {
      nvis += kpm[j] != 0;
      a[j] = kpm[j] != 0 ? a[j] : LOWEST;
    }
    any = nvis > 0;
  }
  if (!any) {  // no visible key: the reference's finite fill makes the row uniform over all Tk
    const float u = 1.0f / static_cast<float>(Tk);
    for (int64_t j = 0; j < Tk; ++j) a[j] = u;
    return;
  }
  const float mx = max_f(a, limit);
  for (int64_t j = 0; j < limit; ++j) a[j] = exp_f(a[j] - mx);
  const float s = sum_f(a, limit);
  for (int64_t j = 0; j < limit; ++j) a[j] /= s;
  for (int64_t j = limit; j < Tk; ++j) a[j] = 0.0f;
}

FUSED_MV void attention_row_backward(const float* p, float* gp, int64_t Tk, int64_t limit,
                                     float scale, const uint8_t* kpm) {
  bool any = limit > 0;
  if (kpm != nullptr) {
    int64_t nvis = 0;
    for (int64_t j = 0; j < limit; ++j) nvis += kpm[j] != 0;
    any = nvis > 0;
  }
  if (!any) {  // every score of the row was a masked constant: no gradient
    for (int64_t j = 0; j < Tk; ++j) gp[j] = 0.0f;
    return;
  }
  const float dot = dot_f(gp, p, limit);  // p is 0 beyond limit and on padding
  for (int64_t j = 0; j < limit; ++j) gp[j] = (p[j] * (gp[j] - dot)) * scale;
  if (kpm != nullptr)
    for (int64_t j = 0; j < limit; ++j) gp[j] = kpm[j] != 0 ? gp[j] : 0.0f;
  for (int64_t j = limit; j < Tk; ++j) gp[j] = 0.0f;
}

FUSED_MV void cross_entropy_row(const float* l, int64_t t, int64_t ignore_index, float* nll,
                                float* lse, int64_t V) {
  const float mx = max_f(l, V);
  float buf[256];  // exp of one chunk of the row, summed with sum_f (the row is read-only)
  float s = 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += 256) {
    const int64_t n = std::min<int64_t>(256, V - j0);
    for (int64_t j = 0; j < n; ++j) buf[j] = exp_f(l[j0 + j] - mx);
    s += sum_f(buf, n);
  }
  const float z = mx + std::log(s);
  *lse = z;
  *nll = (t == ignore_index) ? 0.0f : z - l[t];
}

FUSED_MV void cross_entropy_backward_row(const float* l, float lse, int64_t t, float scale,
                                         float* d, int64_t V) {
  if (scale == 0.0f) {
    for (int64_t j = 0; j < V; ++j) d[j] = 0.0f;
    return;
  }
  for (int64_t j = 0; j < V; ++j) d[j] = exp_f(l[j] - lse) * scale;
  if (t >= 0 && t < V) d[t] -= scale;
}

FUSED_MV void adamw_span(float* p, const float* g, float* m, float* v, int64_t n, float decay,
                         bool has_decay, float b1, float omb1, float b2, float omb2, float bc2,
                         float eps, float step_size) {
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i];
    if (has_decay) pi *= decay;
    const float gi = g[i];
    const float mi = m[i] * b1 + omb1 * gi;
    const float vi = v[i] * b2 + omb2 * (gi * gi);
    const float denom = std::sqrt(vi) / bc2 + eps;
    p[i] = pi - step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

FUSED_MV void add_row(float* dst, const float* src, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
}

// Split [0, n) into chunks of at least PAR_MIN_ELEMS elements and run f(lo, hi) on each,
// in parallel when there is more than one.
template <typename F>
void parallel_spans(int64_t n, F f) {
  const int64_t nchunks = std::max<int64_t>(1, n / PAR_MIN_ELEMS);
#pragma omp parallel for schedule(static) num_threads(g_threads) if (g_threads > 1 && nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t lo = n * c / nchunks, hi = n * (c + 1) / nchunks;
    f(lo, hi);
  }
}

// Rows are independent: parallel over rows when rows × cols is large enough.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, F f) {
#pragma omp parallel for schedule(static) num_threads(g_threads) \
    if (g_threads > 1 && rows > 1 && rows * cols >= PAR_MIN_ELEMS)
  for (int64_t r = 0; r < rows; ++r) f(r);
}

}  // namespace

void gelu_forward(const float* x, float* y, float* t, int64_t n) {
  parallel_spans(n, [&](int64_t lo, int64_t hi) { gelu_forward_span(x + lo, y + lo, t + lo, hi - lo); });
}

void gelu_backward(const float* x, const float* t, const float* g, float* dx, int64_t n) {
  parallel_spans(n, [&](int64_t lo, int64_t hi) {
    gelu_backward_span(x + lo, t + lo, g + lo, dx + lo, hi - lo);
  });
}

void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean,
                        float* rstd, int64_t N, int64_t C, float eps) {
  parallel_rows(N, C, [&](int64_t r) {
    layer_norm_forward_row(x + r * C, w, b, y + r * C, mean + r, rstd + r, C, eps);
  });
}

void layer_norm_backward(const float* g, const float* x, const float* w, const float* mean,
                         const float* rstd, float* dx, float* dw, float* db, int64_t N, int64_t C) {
  // dw and db are sums over rows: each thread accumulates its own rows, then the partial sums are
  // added in thread order (deterministic for a given thread count).
  int nt = 1;
#ifdef _OPENMP
  if (N * C >= PAR_MIN_ELEMS) nt = std::max(1, std::min<int>(g_threads, static_cast<int>(N)));
#endif
  std::vector<float> part(dw != nullptr ? static_cast<size_t>(nt) * 2 * C : 0, 0.0f);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    const int64_t r0 = N * tid / nt, r1 = N * (tid + 1) / nt;
    float* pw = dw != nullptr ? part.data() + static_cast<size_t>(tid) * 2 * C : nullptr;
    float* pb = dw != nullptr ? pw + C : nullptr;
    layer_norm_backward_rows(g, x, w, mean, rstd, dx, pw, pb, r0, r1, C);
  }
  if (dw != nullptr) {
    for (int64_t c = 0; c < C; ++c) dw[c] = db[c] = 0.0f;
    for (int t = 0; t < nt; ++t) {
      const float* pw = part.data() + static_cast<size_t>(t) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        dw[c] += pw[c];
        db[c] += pw[C + c];
      }
    }
  }
}

void softmax_forward(const float* x, float* y, int64_t R, int64_t L) {
  parallel_rows(R, L, [&](int64_t r) { softmax_row(x + r * L, y + r * L, L); });
}

void softmax_backward(const float* y, const float* g, float* dx, int64_t R, int64_t L) {
  parallel_rows(R, L, [&](int64_t r) { softmax_backward_row(y + r * L, g + r * L, dx + r * L, L); });
}

void attention_softmax_forward(float* att, int64_t B, int64_t H, int64_t Tq, int64_t Tk,
                               float scale, bool causal, const uint8_t* kpm) {
  parallel_rows(B * H * Tq, Tk, [&](int64_t r) {
    const int64_t i = r % Tq, b = r / (H * Tq);
    const int64_t limit = causal ? std::min(Tk, std::max<int64_t>(0, Tk - Tq + i + 1)) : Tk;
    attention_row_forward(att + r * Tk, Tk, limit, scale, kpm != nullptr ? kpm + b * Tk : nullptr);
  });
}

void attention_softmax_backward(const float* p, float* gp, int64_t B, int64_t H, int64_t Tq,
                                int64_t Tk, float scale, bool causal, const uint8_t* kpm) {
  parallel_rows(B * H * Tq, Tk, [&](int64_t r) {
    const int64_t i = r % Tq, b = r / (H * Tq);
    const int64_t limit = causal ? std::min(Tk, std::max<int64_t>(0, Tk - Tq + i + 1)) : Tk;
    attention_row_backward(p + r * Tk, gp + r * Tk, Tk, limit, scale,
                           kpm != nullptr ? kpm + b * Tk : nullptr);
  });
}

void cross_entropy_forward(const float* logits, const int64_t* targets, int64_t ignore_index,
                           float* nll, float* lse, int64_t N, int64_t V) {
  parallel_rows(N, V, [&](int64_t r) {
    cross_entropy_row(logits + r * V, targets[r], ignore_index, nll + r, lse + r, V);
  });
}

void cross_entropy_backward(const float* logits, const float* lse, const int64_t* targets,
                            const float* scale, float* dlogits, int64_t N, int64_t V) {
  parallel_rows(N, V, [&](int64_t r) {
    cross_entropy_backward_row(logits + r * V, lse[r], targets[r], scale[r], dlogits + r * V, V);
  });
}

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float decay,
                  bool has_decay, float beta1, float one_minus_beta1, float beta2,
                  float one_minus_beta2, float bias_correction2_sqrt, float eps, float step_size) {
  parallel_spans(n, [&](int64_t lo, int64_t hi) {
    adamw_span(p + lo, g + lo, m + lo, v + lo, hi - lo, decay, has_decay, beta1, one_minus_beta1,
               beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size);
  });
}

void scatter_add_rows(float* target, int64_t V, const int64_t* index, const float* values,
                      int64_t N, int64_t C) {
  // One thread: two rows with the same index would race.
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = index[i] < 0 ? index[i] + V : index[i];
    add_row(target + r * C, values + i * C, C);
  }
}

int num_threads() {
#ifdef _OPENMP
  return g_threads;
#else
  return 1;
#endif
}

void set_num_threads(int n) { g_threads = std::max(1, n); }

}  // namespace fused
