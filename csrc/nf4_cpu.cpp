// nf4_cpu.cpp — the C++ CPU twin of the NF4 kernels: dequantize, and the fused
// dequantize-matmul y = x @ dequant(W).T, with OpenMP threads and loops the compiler vectorises.
//
// Rung 2 of the ladder (as llm.c's dev/cuda: a reference first, then numbered faster versions, one validator): NumPy reference (minillm/quant.py) -> this C++ twin ->
// CUDA v1 naive -> v2 shared-memory code table -> v3 vectorised loads + warp reductions -> fused
// tensor-core GEMM (nf4_cuda.cu). It exists so the CPU path is fast enough to use and so the
// reader sees the fused algorithm in plain C++ before meeting it in CUDA.
//
// Contract
//   * dequantize(): bit-identical to the NumPy reference: out[e] = code[q_e] * absmax[e / bs],
//     one float32 multiply per element, nested absmax via AbsmaxView::at() (no FMA, see nf4.h).
//   * matmul(): y (M, N) = x (M, K) @ W.T with W (N, K) the dequantized weight, float32
//     accumulation. The summation order differs from BLAS, so the result equals NumPy's
//     dequantize-then-matmul only to float32 rounding (the tests use 1e-5 relative).
//   * any K, N, M >= 1 and any blocksize >= 1 (blocks may span rows and the last block may be
//     partial); the index arithmetic is the flat index e = row * K + k throughout.
//
// What it leaves out: hand-written intrinsics (the hot loops are plain C++ with constant trip
// counts that g++ -O3 turns into AVX2/FMA code in the "arch=x86-64-v3" clone), cache-size tuning
// beyond one tile size, and bfloat16/float16 inputs (CPU arrays in minillm are float32).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "nf4.h"

// Function multi-versioning: on x86-64 g++ (>= 11) compiles the hot functions twice, for baseline
// x86-64 (SSE2) and for x86-64-v3 (AVX2 + FMA), and picks one at load time from the CPU's feature
// bits (an ifunc). The module therefore runs on any x86-64 machine and still uses 8-wide FMAs where
// the CPU has them. (Not "arch=haswell": that clone is chosen by CPU *model*, so an AMD EPYC with
// AVX2 would get the SSE2 code — measured 30x slower here.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    __GNUC__ >= 11
#define NF4_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NF4_MULTIVERSION
#endif
// Helpers called from a multiversioned function must be inlined into it to get its instruction set.
#if defined(__GNUC__)
#define NF4_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NF4_ALWAYS_INLINE inline
#endif

namespace nf4 {
namespace {

// pair.v[byte] = {code[byte >> 4], code[byte & 15]}: one 8-byte load decodes a whole byte (two
// elements, high nibble first). The same float values as the code, so results are unchanged.
struct PairTable {
  float v[256][2];
  float single[16];
  explicit PairTable(const Code16& code) {
    for (int b = 0; b < 256; ++b) {
      v[b][0] = code.v[b >> 4];
      v[b][1] = code.v[b & 15];
    }
    for (int i = 0; i < 16; ++i) single[i] = code.v[i];
  }
};

// Dequantize the `len` consecutive elements [e0, e0 + len) of the flat weight into dst[0, len).
// Walks block by block so each absmax is fetched once; inside a block it decodes whole bytes
// through the pair table, with a single-nibble step when the span starts or ends in the middle of a byte
// (odd e0 or odd end: happens when K is odd, because rows then start at odd flat indices).
NF4_MULTIVERSION
void dequant_span(const uint8_t* packed, const PairTable& pair, const AbsmaxView& am,
                  int64_t blocksize, int64_t e0, int64_t len, float* dst) {
  int64_t e = e0;
  const int64_t end = e0 + len;
  while (e < end) {
    const int64_t b = e / blocksize;
    const int64_t seg_end = std::min(end, (b + 1) * blocksize);
    const float s = am.at(b);
    float* d = dst + (e - e0);
    if (e & 1) {  // starts on a low nibble
      *d++ = pair.single[packed[e >> 1] & 0x0F] * s;
      ++e;
    }
    const uint8_t* p = packed + (e >> 1);
    const int64_t npairs = (seg_end - e) >> 1;
    for (int64_t i = 0; i < npairs; ++i) {
      const float* pr = pair.v[p[i]];
      d[2 * i] = pr[0] * s;
      d[2 * i + 1] = pr[1] * s;
    }
    e += 2 * npairs;
    if (e < seg_end) {  // ends on a high nibble
      dst[e - e0] = pair.single[packed[e >> 1] >> 4] * s;
      ++e;
    }
  }
}

// ---- small-M path: one row of W at a time, dot products -------------------------------------
// Memory access: each W row is decoded once into a K-float buffer (L1/L2 resident) and dotted with
// every x row; W is streamed exactly once, so for M = 1 the cost is the packed bytes (N*K/2) plus
// the decode. DOT_LANES independent partial sums let the compiler vectorise the reduction without
// -ffast-math (it may not reorder one scalar sum).
constexpr int DOT_LANES = 16;

NF4_MULTIVERSION
float dot(const float* a, const float* b, int64_t K) {
  float acc[DOT_LANES] = {0};
  int64_t k = 0;
  for (; k + DOT_LANES <= K; k += DOT_LANES)
    for (int l = 0; l < DOT_LANES; ++l) acc[l] += a[k + l] * b[k + l];
  float s = 0.0f;
  for (int l = 0; l < DOT_LANES; ++l) s += acc[l];
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

NF4_MULTIVERSION
void rows_kernel(const float* x, int64_t M, int64_t K, const uint8_t* packed, const PairTable& pair,
                 const AbsmaxView& am, int64_t blocksize, int64_t n0, int64_t n1, int64_t N, float* wrow, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_span(packed, pair, am, blocksize, n * K, K, wrow);  // W[n, :] -> wrow (K,)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(x + m * K, wrow, K);
  }
}

// ---- larger-M path: panels of NR rows of W, register-blocked outer products ----------------
// Tiling: W is cut into panels of NR = 16 rows; the panel's K is cut into chunks of KC columns.
// Each (panel, chunk) tile is dequantized once into Bt, stored TRANSPOSED (KC x NR, 16 floats per
// k = two AVX2 registers) so the micro-kernel reads it with unit stride. The micro-kernel keeps an
// MR x NR = 6 x 16 block of y in 12 vector registers and, for every k, broadcasts x[m, k] and does
// 12 FMAs against the two Bt registers: 12 FMAs per 2 loads, compute-bound rather than
// load-bound (the classic BLAS "axpy"/outer-product form). The tile is reused by all M rows of x,
// so each W byte is decoded once per call whatever M is.
constexpr int NR = 16;   // W rows per panel (= y columns per micro-tile)
constexpr int MR = 6;    // x rows per micro-tile
constexpr int KC = 256;  // K columns per dequantized tile: Bt = 256 * 16 * 4 B = 16 KiB (L1)

#if defined(__GNUC__)
// GCC/Clang vector extensions: v8f is 8 floats (one AVX2 register in the x86-64-v3 clone, two SSE
// registers in the baseline one). g++ does not reliably turn the scalar 6 x 16 loop nest below into
// register-resident vectors (it spills the accumulators), so the micro-kernel says it explicitly.
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // the same, unaligned access

template <int MROWS>
NF4_ALWAYS_INLINE void micro_kernel(const float* x, int64_t K, const float* Bt, int64_t kc,
                                    float* acc_out) {
  static_assert(NR == 16, "the micro-kernel holds a row of NR = 16 floats in two v8f");
  v8f acc[MROWS][2] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const v8f b0 = *reinterpret_cast<const v8f_u*>(Bt + k * NR);      // Bt[k, 0:8]
    const v8f b1 = *reinterpret_cast<const v8f_u*>(Bt + k * NR + 8);  // Bt[k, 8:16]
    for (int m = 0; m < MROWS; ++m) {
      const float a = x[m * K + k];  // broadcast x[m, k]
      acc[m][0] += a * b0;
      acc[m][1] += a * b1;
    }
  }
  for (int m = 0; m < MROWS; ++m) {
    *reinterpret_cast<v8f_u*>(acc_out + m * NR) = acc[m][0];
    *reinterpret_cast<v8f_u*>(acc_out + m * NR + 8) = acc[m][1];
  }
}
#else
template <int MROWS>
inline void micro_kernel(const float* x, int64_t K, const float* Bt, int64_t kc, float* acc_out) {
  float acc[MROWS][NR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int m = 0; m < MROWS; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] += x[m * K + k] * Bt[k * NR + j];
  for (int m = 0; m < MROWS; ++m)
    for (int j = 0; j < NR; ++j) acc_out[m * NR + j] = acc[m][j];
}
#endif

NF4_MULTIVERSION
void panel_kernel(const float* x, int64_t M, int64_t K, const uint8_t* packed, const PairTable& pair,
                  const AbsmaxView& am, int64_t blocksize, int64_t n0, int64_t N, float* Bt, float* rowbuf, float* acc,
                  float* y) {
  const int64_t nr = std::min<int64_t>(NR, N - n0);  // rows in this panel (last panel may be short)
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    // dequantize W[n0 : n0 + nr, k0 : k0 + kc] into Bt (kc, NR), transposed; missing rows = 0
    for (int64_t j = 0; j < NR; ++j) {
      if (j < nr) {
        dequant_span(packed, pair, am, blocksize, (n0 + j) * K + k0, kc, rowbuf);
        for (int64_t k = 0; k < kc; ++k) Bt[k * NR + j] = rowbuf[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) Bt[k * NR + j] = 0.0f;
      }
    }
    // y[m, n0 : n0 + nr] += x[m, k0 : k0 + kc] @ Bt, MR rows at a time
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - m0);
      const float* xs = x + m0 * K + k0;
      switch (mr) {
        case 6: micro_kernel<6>(xs, K, Bt, kc, acc); break;
        case 5: micro_kernel<5>(xs, K, Bt, kc, acc); break;
        case 4: micro_kernel<4>(xs, K, Bt, kc, acc); break;
        case 3: micro_kernel<3>(xs, K, Bt, kc, acc); break;
        case 2: micro_kernel<2>(xs, K, Bt, kc, acc); break;
        default: micro_kernel<1>(xs, K, Bt, kc, acc); break;
      }
      for (int64_t m = 0; m < mr; ++m) {
        float* yr = y + (m0 + m) * N + n0;
        for (int64_t j = 0; j < nr; ++j) yr[j] = (k0 == 0 ? 0.0f : yr[j]) + acc[m * NR + j];
      }
    }
  }
}

}  // namespace

void dequantize_cpu(const uint8_t* packed, const Code16& code, const AbsmaxView& am, int64_t n,
                    int64_t blocksize, float* out) {
  const PairTable pair(code);
  // Parallel over chunks of whole blocks (so no absmax is fetched by two threads) of >= 64 Ki
  // elements (enough work per thread to hide the OpenMP fork).
  const int64_t per_chunk = std::max<int64_t>(1, 65536 / blocksize) * blocksize;
  const int64_t nchunks = (n + per_chunk - 1) / per_chunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t e0 = c * per_chunk;
    dequant_span(packed, pair, am, blocksize, e0, std::min(per_chunk, n - e0), out + e0);
  }
}

// Below this many x rows the row/dot path wins: the panel path pays a transpose per tile that only
// pays off when the tile is reused by several x rows (measured on a 2-core AVX2 machine).
constexpr int64_t PANEL_MIN_M = 4;

void matmul_cpu(const float* x, int64_t M, int64_t K, const uint8_t* packed, const Code16& code,
                const AbsmaxView& am, int64_t N, int64_t blocksize, float* y) {
  const PairTable pair(code);
  if (M < PANEL_MIN_M) {
    const int64_t rows_per_task = 16;
    const int64_t ntasks = (N + rows_per_task - 1) / rows_per_task;
#pragma omp parallel
    {
      std::vector<float> wrow(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < ntasks; ++t) {
        const int64_t n0 = t * rows_per_task;
        rows_kernel(x, M, K, packed, pair, am, blocksize, n0, std::min(N, n0 + rows_per_task), N,
                    wrow.data(), y);
      }
    }
    return;
  }
  const int64_t npanels = (N + NR - 1) / NR;
#pragma omp parallel
  {
    std::vector<float> Bt(static_cast<size_t>(KC) * NR), rowbuf(KC), acc(MR * NR);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < npanels; ++p)
      panel_kernel(x, M, K, packed, pair, am, blocksize, p * NR, N, Bt.data(), rowbuf.data(),
                   acc.data(), y);
  }
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace nf4
