// nf4_cuda.cu — CUDA kernels for NF4 weights: dequantize, fused dequant-GEMV (1 <= M <= 8) and
// fused dequant-GEMM (tensor cores), written as a ladder of numbered versions (llm.c dev/cuda
// style: a reference first, then numbered faster versions): each version keeps the previous one's contract and changes ONE idea.
//
//   reference   minillm/quant.py dequantize_4bit, then x @ W.T (NumPy)        the validator's truth
//   C++ twin    csrc/nf4_cpu.cpp (the same fused algorithm on the CPU)
//   dequant v1  one thread per element, code table read from parameter space   any shape
//   dequant v2  one thread per 32 elements: one 128-bit load of 16 packed bytes, one absmax,
//               code table in shared memory, 128-bit stores                    blocksize % 32 == 0
//   gemv v1     one thread per output y[m, n], walks W's row alone             any shape (naive)
//   gemv v2     one 128-thread block per W row, code table in shared memory,
//               coalesced byte loads, shared-memory tree reduction            any shape
//   gemv v3     one WARP per W row, 128-bit loads of packed bytes and of x, one absmax per
//               32 values, warp-shuffle reduction (bitsandbytes kgemm_4bit_inference_naive)
//                                                                              K % 32 == 0, bs % 32 == 0
//   gemv v4     v3 templated on M and on plain/nested absmax, shifts instead of divisions,
//               the next step's loads issued before the current step's math          as v3, bs 2^k
//   decode_absmax  nested absmax -> float32 once per weight (bitsandbytes before gemv_4bit)
//   gemm v1     64 x 64 output tile per block, W tile dequantized into shared memory,
//               4 x 4 outputs per thread, fp32 FMAs (SIMT)                     any shape, any dtype
//   gemm v2     the same tiling on tensor cores: wmma 16x16x16, float16/bfloat16 inputs, fp32
//               accumulate (sm_80+)                                            any shape
//
// Data layout (docs/reference.md §2): W (N, K) row-major, flattened, blocks of `blocksize` elements
// that may span rows: the absmax of W[n, k] is absmax[(n*K + k) / blocksize]; byte e/2 holds
// element e, even e in the high nibble. x (M, K) and y (M, N) are row-major in the input dtype
// (float32, float16 or bfloat16); every kernel accumulates in float32.
//
// Exactness: dequant (both versions) computes code[q] * absmax as one float32 multiply (and the
// nested absmax with __fmul_rn/__fadd_rn, see nf4.h), so its float32 output equals the NumPy
// reference bit for bit. GEMV/GEMM sum in a different order (and, for 16-bit inputs, round x and
// the dequantized W to 16 bits), so they match the reference to a tolerance the tests state.
//
// Deliberately left out (each would be the next rung): cp.async double-buffering and ldmatrix/mma
// in the GEMM, split-K for tall-skinny shapes, a persistent GEMV that prefetches the next row, and
// the nested-absmax decode cached in shared memory. No pybind11 here: the host compiler builds the
// Python binding (cuda_bindings.cpp) against the extern "C" launchers at the end of this file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "nf4.h"

namespace {

using nf4::AbsmaxView;
using nf4::Code16;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

// float <-> storage type conversions (round-to-nearest-even).
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// 16 bytes moved by one 128-bit load/store, viewed as an array of T (llm.c's Packed128). memcpy
// between the int4 and the array compiles to register moves, not to local memory.
template <typename T>
struct alignas(16) Packed128 {
  static constexpr int size = 16 / sizeof(T);
  T payload[size];
  __device__ __forceinline__ T& operator[](int i) { return payload[i]; }
  __device__ __forceinline__ const T& operator[](int i) const { return payload[i]; }
};
template <typename T>
__device__ __forceinline__ Packed128<T> load128(const T* p) {  // p must be 16-byte aligned
  const int4 bits = *reinterpret_cast<const int4*>(p);
  Packed128<T> r;
  memcpy(&r.payload, &bits, 16);
  return r;
}
template <typename T>
__device__ __forceinline__ void store128(T* p, const Packed128<T>& v) {
  int4 bits;
  memcpy(&bits, &v.payload, 16);
  *reinterpret_cast<int4*>(p) = bits;
}

// Load 32 consecutive elements of x (16-byte aligned) as float: 8 float4 or 4 x (8 halves) loads.
template <typename T>
__device__ __forceinline__ void load32_as_float(const T* p, float (&out)[32]) {
  constexpr int per = Packed128<T>::size;
#pragma unroll
  for (int v = 0; v < 32 / per; ++v) {
    const Packed128<T> pk = load128(p + v * per);
#pragma unroll
    for (int i = 0; i < per; ++i) out[v * per + i] = Cvt<T>::to(pk[i]);
  }
}

// Decode 16 packed bytes (32 codes, high nibble first) with one absmax: w[i] = lut[q_i] * s.
__device__ __forceinline__ void decode32(const Packed128<uint8_t>& bytes, const float* lut,
                                         float s, float (&w)[32]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int byte = bytes[i];
    w[2 * i] = lut[byte >> 4] * s;
    w[2 * i + 1] = lut[byte & 0x0F] * s;
  }
}

// decode32 for 16 packed bytes held as an int4 (little-endian: byte 4j + i of the 16 is byte i of
// word j), so the bytes never leave registers.
__device__ __forceinline__ void decode32_bits(const int4 bits, const float* lut, float s,
                                              float (&w)[32]) {
  const uint32_t words[4] = {(uint32_t)bits.x, (uint32_t)bits.y, (uint32_t)bits.z,
                             (uint32_t)bits.w};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (words[j] >> (8 * i)) & 0xFFu;
      w[8 * j + 2 * i] = lut[byte >> 4] * s;
      w[8 * j + 2 * i + 1] = lut[byte & 0x0Fu] * s;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Copy the 16-entry code table into shared memory. Thread 0 does it with constant indices: indexing
// the by-value Code16 with threadIdx.x would make the compiler spill the whole struct to local
// memory (a 64-byte stack frame per thread). Callers __syncthreads() afterwards.
__device__ __forceinline__ void load_lut(float* lut, const Code16& code) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) lut[i] = code.v[i];
  }
}

// One element of W, dequantized, from its flat index (the general, any-shape path).
__device__ __forceinline__ float dequant_one(const uint8_t* packed, const float* lut,
                                             const AbsmaxView& am, int64_t e, int64_t bs) {
  return lut[nf4::code_index(packed, e)] * am.at(e / bs);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// dequantize: packed (n codes) -> out (n,) in T
// ---------------------------------------------------------------------------------------------

// v1 — one thread per element. Access: thread e reads byte e/2 (two neighbouring threads share a
// byte, a warp reads 16 contiguous bytes: coalesced but only 16 B per 128 B transaction) and the
// block's absmax (a broadcast). The code table is the by-value Code16 argument; indexed with a
// per-thread q, the compiler copies it from parameter space into every thread's local memory
// (a 64-byte stack frame: 16 loads + 16 stores per thread before any work, then an L1-cached
// local load per element). v2 replaces that with one shared copy per block.
template <typename T>
__global__ void dequant_v1(const uint8_t* __restrict__ packed, Code16 code, AbsmaxView am,
                           int64_t n, int64_t bs, T* __restrict__ out) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= n) return;
  out[e] = Cvt<T>::from(code.v[nf4::code_index(packed, e)] * am.at(e / bs));
}

// v2 — one thread per 32 elements. The code table is copied to shared memory once per block
// (16 floats in 16 banks: lanes reading different entries hit different banks, lanes reading the
// same entry get a broadcast, so no conflicts). Each thread does ONE 128-bit load of 16 packed
// bytes, fetches ONE absmax (blocksize % 32 == 0 and the 32 elements start at a multiple of 32, so
// they share a block) and writes 32 outputs with 128-bit stores. A partial last chunk (n % 32)
// falls back to the per-element path.
template <typename T>
__global__ void dequant_v2(const uint8_t* __restrict__ packed, Code16 code, AbsmaxView am,
                           int64_t n, int64_t bs, T* __restrict__ out) {
  __shared__ float lut[16];
  load_lut(lut, code);
  __syncthreads();
  const int64_t chunk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t e0 = chunk * 32;
  if (e0 >= n) return;
  if (e0 + 32 <= n) {
    float w[32];
    decode32(load128(packed + chunk * 16), lut, am.at(e0 / bs), w);
    constexpr int per = Packed128<T>::size;
#pragma unroll
    for (int v = 0; v < 32 / per; ++v) {
      Packed128<T> pk;
#pragma unroll
      for (int i = 0; i < per; ++i) pk[i] = Cvt<T>::from(w[v * per + i]);
      store128(out + e0 + v * per, pk);
    }
  } else {
    for (int64_t e = e0; e < n; ++e) out[e] = Cvt<T>::from(dequant_one(packed, lut, am, e, bs));
  }
}

// ---------------------------------------------------------------------------------------------
// GEMV: y (M, N) = x (M, K) @ W.T, 1 <= M <= 8 (decoding: one token, or a few)
// It is memory-bound: every packed byte is read once and used for M multiply-adds per element, so
// the target is the device's memory bandwidth on N*K/2 bytes.
// ---------------------------------------------------------------------------------------------

constexpr int GEMV_MAX_M = 8;

// v1 — one thread per output y[m, n], walking K alone. Access pattern is the lesson: neighbouring
// threads (neighbouring n) read bytes K/2 apart, so every load is its own memory transaction
// (uncoalesced); W is re-read M times; the code table sits in each thread's local memory (see
// dequant v1).
template <typename T>
__global__ void gemv_v1(const T* __restrict__ x, int M, int64_t K,
                        const uint8_t* __restrict__ packed, Code16 code, AbsmaxView am, int64_t N,
                        int64_t bs, T* __restrict__ y) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)M * N) return;
  const int64_t m = idx / N, n = idx % N;
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = n * K + k;
    acc += Cvt<T>::to(x[m * K + k]) * (code.v[nf4::code_index(packed, e)] * am.at(e / bs));
  }
  y[idx] = Cvt<T>::from(acc);
}

// v2 — one 128-thread block per W row n. Threads stride over k (thread t takes k = t, t + 128, ...)
// so a warp reads 16 contiguous packed bytes and 32 contiguous x values per step (coalesced); each
// element is decoded once and used for all M rows of x (acc[m] in registers: the m loop is fully
// unrolled to GEMV_MAX_M with a guard, so no local memory). Code table in shared memory. The 128
// partial sums per m are combined by a shared-memory tree (7 steps, a __syncthreads each).
constexpr int GEMV_V2_THREADS = 128;

template <typename T>
__global__ void __launch_bounds__(GEMV_V2_THREADS)
gemv_v2(const T* __restrict__ x, int M, int64_t K, const uint8_t* __restrict__ packed, Code16 code,
        AbsmaxView am, int64_t N, int64_t bs, T* __restrict__ y) {
  __shared__ float lut[16];
  __shared__ float partial[GEMV_MAX_M][GEMV_V2_THREADS];
  const int tid = threadIdx.x;
  load_lut(lut, code);
  __syncthreads();
  const int64_t n = blockIdx.x;
  float acc[GEMV_MAX_M] = {};
  for (int64_t k = tid; k < K; k += GEMV_V2_THREADS) {
    const float w = dequant_one(packed, lut, am, n * K + k, bs);
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m)
      if (m < M) acc[m] += Cvt<T>::to(x[m * K + k]) * w;
  }
#pragma unroll
  for (int m = 0; m < GEMV_MAX_M; ++m) partial[m][tid] = acc[m];
  __syncthreads();
  for (int stride = GEMV_V2_THREADS / 2; stride > 0; stride >>= 1) {
    if (tid < stride)
      for (int m = 0; m < M; ++m) partial[m][tid] += partial[m][tid + stride];
    __syncthreads();
  }
  if (tid < M) y[tid * N + n] = Cvt<T>::from(partial[tid][0]);
}

// v3 — one WARP per W row, GEMV_V3_WARPS rows per 128-thread block (grid = ceil(N / 4)), the
// layout of bitsandbytes' kgemm_4bit_inference_naive. Per step each lane does ONE 128-bit load of
// 16 packed bytes (32 elements), so a warp moves 512 contiguous bytes per instruction (four full
// 128-byte lines), and lanes stride 32 x 32 = 1024 elements. One absmax per 32 elements
// (K % 32 == 0 and bs % 32 == 0 keep a lane's 32 elements in one block and its 16 bytes 16-byte
// aligned). x is read with 128-bit loads too; it is small (M x K) and shared by all warps, so it is
// served from L1/L2. The 32 lane partials are summed with 5 butterfly shuffles (__shfl_xor_sync),
// no shared memory and no __syncthreads.
constexpr int GEMV_V3_WARPS = 4;

template <typename T>
__global__ void __launch_bounds__(GEMV_V3_WARPS * 32)
gemv_v3(const T* __restrict__ x, int M, int64_t K, const uint8_t* __restrict__ packed, Code16 code,
        AbsmaxView am, int64_t N, int64_t bs, T* __restrict__ y) {
  __shared__ float lut[16];
  load_lut(lut, code);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.x * (int64_t)GEMV_V3_WARPS + warp;
  if (n >= N) return;  // whole warps leave together; no barrier follows
  const uint8_t* wrow = packed + n * (K / 2);
  float acc[GEMV_MAX_M] = {};
  // Unrolled so the 128-bit loads of several iterations are issued before the first one is used:
  // a memory-bound kernel needs many bytes in flight per SM (Little's law), not just one load per
  // warp. (K = 4096 is 4 iterations per lane.)
#pragma unroll 4
  for (int64_t k = lane * 32; k < K; k += 32 * 32) {
    float w[32];
    decode32(load128(wrow + k / 2), lut, am.at((n * K + k) / bs), w);
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; ++m) {
      if (m < M) {
        float xv[32];
        load32_as_float(x + m * K + k, xv);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 32; ++i) s += xv[i] * w[i];
        acc[m] += s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < GEMV_MAX_M; ++m) {
    if (m < M) {
      const float total = warp_sum(acc[m]);
      if (lane == 0) y[m * N + n] = Cvt<T>::from(total);
    }
  }
}

// v4 — v3's layout (one warp per row, one 128-bit load of 16 packed bytes per lane and step) with
// the per-step work made static, the next rung for the bandwidth target (issue 18 item 9):
//   * M is a template parameter (1..8): acc[M] only, no `m < M` branches in the loop body, so
//     nothing stops the compiler from hoisting loads;
//   * the absmax source is a template parameter: PLAIN reads a float32 absmax (a nested state can be
//     decoded once per weight by nf4_cuda_decode_absmax, as bitsandbytes dequantizes the absmax
//     before gemv_4bit), NESTED decodes code2[qabsmax[b]] * absmax2[b >> shift2] + offset in-kernel;
//   * block indices by shifts (blocksize and blocksize2 are powers of two; quantize_4bit allows
//     only those), no 64-bit divisions;
//   * explicit software pipelining: the NEXT step's 16 packed bytes and its absmax inputs are loaded
//     before the current step is decoded and multiplied, so a lane has two 128-bit loads in flight.
// Same contract as v3: K % 32 == 0, blocksize % 32 == 0, 16-byte aligned packed and x.
template <bool NESTED>
struct AbsmaxSource;
template <>
struct AbsmaxSource<false> {
  const float* absmax;
  __device__ __forceinline__ float raw(int64_t b) const { return __ldg(absmax + b); }
};
template <>
struct AbsmaxSource<true> {
  const uint8_t* qabsmax;
  const float* absmax2;
  const float* code2;
  float offset;
  int shift2;
  __device__ __forceinline__ float raw(int64_t b) const {
    return __fadd_rn(__fmul_rn(__ldg(code2 + __ldg(qabsmax + b)), __ldg(absmax2 + (b >> shift2))),
                     offset);
  }
};

template <typename T, int M, bool NESTED>
__global__ void __launch_bounds__(GEMV_V3_WARPS * 32)
gemv_v4(const T* __restrict__ x, int64_t K, const uint8_t* __restrict__ packed, Code16 code,
        AbsmaxSource<NESTED> am, int64_t N, int bs_shift, T* __restrict__ y) {
  __shared__ float lut[16];
  load_lut(lut, code);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.x * (int64_t)GEMV_V3_WARPS + warp;
  if (n >= N) return;  // whole warps leave together; no barrier follows
  const uint8_t* wrow = packed + n * (K >> 1);
  const int64_t e_row = n * K;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  // the 16 packed bytes stay an int4 in registers (a byte array swapped between iterations would
  // be placed in local memory); decode32_bits takes the nibbles out with shifts
  int64_t k = lane * 32;
  int4 cur = make_int4(0, 0, 0, 0);
  float s_cur = 0.0f;
  if (k < K) {
    cur = __ldg(reinterpret_cast<const int4*>(wrow + (k >> 1)));
    s_cur = am.raw((e_row + k) >> bs_shift);
  }
  for (; k < K; k += 32 * 32) {
    const int64_t k_next = k + 32 * 32;
    int4 nxt = make_int4(0, 0, 0, 0);
    float s_nxt = 0.0f;
    if (k_next < K) {  // issue the next step's loads before using the current ones
      nxt = __ldg(reinterpret_cast<const int4*>(wrow + (k_next >> 1)));
      s_nxt = am.raw((e_row + k_next) >> bs_shift);
    }
    float w[32];
    decode32_bits(cur, lut, s_cur, w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv[32];
      load32_as_float(x + m * K + k, xv);
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < 32; ++i) s += xv[i] * w[i];
      acc[m] += s;
    }
    cur = nxt;
    s_cur = s_nxt;
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0) y[m * N + n] = Cvt<T>::from(total);
  }
}

// The float32 absmax of every block of a nested state: out[b] = code2[qabsmax[b]] * absmax2[b /
// blocksize2] + offset (bit-identical to the reference, AbsmaxView::at). Run once per weight, it
// turns a nested state into a plain one for the kernels (4 bytes per block instead of 1 to read,
// but no dependent code2/absmax2 loads in the GEMV's inner loop).
__global__ void decode_absmax(AbsmaxView am, int64_t nblocks, float* __restrict__ out) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b < nblocks) out[b] = am.at(b);
}

// ---------------------------------------------------------------------------------------------
// GEMM: y (M, N) = x (M, K) @ W.T for larger M (prefill, training). Compute-bound once M is large,
// so W is dequantized ONCE per output tile into shared memory and reused by BM rows of x.
// Tiling (both versions): a block computes a BM x BN = 64 x 64 tile of y; it walks K in steps of
// BK, each step loading x[m0:m0+64, k0:k0+BK] and dequantizing W[n0:n0+64, k0:k0+BK] into shared
// memory (zeros outside M, N, K, so any shape works), then multiplying the two tiles.
// ---------------------------------------------------------------------------------------------

constexpr int TILE_M = 64, TILE_N = 64;

// Fill sW[BN][BK + pad] (row = W row n0 + r, column = k0 + c) with dequantized W in T.
// Fast path (`vec`: K % 8 == 0, bs % 8 == 0, packed 4-byte aligned): a thread loads 4 bytes =
// 8 elements at once and decodes them with one absmax; otherwise one element at a time.
template <typename T, int BK, int LD>
__device__ __forceinline__ void load_w_tile(T (*sW)[LD], const uint8_t* __restrict__ packed,
                                            const float* lut, const AbsmaxView& am, int64_t N,
                                            int64_t K, int64_t bs, int64_t n0, int64_t k0,
                                            bool vec) {
  if (vec) {
    constexpr int CHUNKS = TILE_N * BK / 8;  // 8-element chunks in the tile
    for (int c = threadIdx.x; c < CHUNKS; c += blockDim.x) {
      const int r = c / (BK / 8), col = (c % (BK / 8)) * 8;
      const int64_t n = n0 + r, k = k0 + col;
      float w[8];
      if (n < N && k < K) {  // K % 8 == 0, so the chunk is all in or all out
        const int64_t e = n * K + k;
        const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + e / 2);
        const float s = am.at(e / bs);
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // little-endian: byte i of the word is byte e/2 + i
          const int byte = (word >> (8 * i)) & 0xFF;
          w[2 * i] = lut[byte >> 4] * s;
          w[2 * i + 1] = lut[byte & 0x0F] * s;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) sW[r][col + i] = Cvt<T>::from(w[i]);
    }
  } else {
    for (int idx = threadIdx.x; idx < TILE_N * BK; idx += blockDim.x) {
      const int r = idx / BK, col = idx % BK;  // consecutive threads: consecutive k (nibbles)
      const int64_t n = n0 + r, k = k0 + col;
      const float w = (n < N && k < K) ? dequant_one(packed, lut, am, n * K + k, bs) : 0.0f;
      sW[r][col] = Cvt<T>::from(w);
    }
  }
}

// Fill sX[BM][BK + pad] with x[m0:m0+64, k0:k0+BK] (zeros outside). Consecutive threads read
// consecutive k of one row: coalesced.
template <typename T, int BK, int LD>
__device__ __forceinline__ void load_x_tile(T (*sX)[LD], const T* __restrict__ x, int64_t M,
                                            int64_t K, int64_t m0, int64_t k0) {
  for (int idx = threadIdx.x; idx < TILE_M * BK; idx += blockDim.x) {
    const int r = idx / BK, col = idx % BK;
    const int64_t m = m0 + r, k = k0 + col;
    sX[r][col] = (m < M && k < K) ? x[m * K + k] : Cvt<T>::from(0.0f);
  }
}

// v1 — SIMT: 256 threads as a 16 x 16 grid, each computing 4 x 4 outputs at rows ty + 16 i and
// columns tx + 16 j (strided, so a warp's shared-memory reads of one k hit 16 different rows of
// sW with the +1 padding: no bank conflicts). BK = 16. Per k step a thread does 16 FMAs for
// 8 shared loads. Works for every dtype (float32 inputs get an exact float32 GEMM).
constexpr int GEMM_V1_BK = 16;

template <typename T>
__global__ void __launch_bounds__(256)
gemm_v1(const T* __restrict__ x, int64_t M, int64_t K, const uint8_t* __restrict__ packed,
        Code16 code, AbsmaxView am, int64_t N, int64_t bs, T* __restrict__ y, bool vec) {
  constexpr int BK = GEMM_V1_BK, LD = BK + 1;
  __shared__ float lut[16];
  __shared__ T sX[TILE_M][LD];
  __shared__ T sW[TILE_N][LD];
  load_lut(lut, code);
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = blockIdx.y * (int64_t)TILE_M, n0 = blockIdx.x * (int64_t)TILE_N;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    load_x_tile<T, BK, LD>(sX, x, M, K, m0, k0);
    load_w_tile<T, BK, LD>(sW, packed, lut, am, N, K, bs, n0, k0, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Cvt<T>::to(sX[ty + 16 * i][kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Cvt<T>::to(sW[tx + 16 * j][kk]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) y[m * N + n] = Cvt<T>::from(acc[i][j]);
    }
}

// v2 — tensor cores (WMMA 16 x 16 x 16, float16/bfloat16 in, float32 accumulate; sm_80+ for
// bfloat16). 128 threads = 4 warps in a 2 x 2 grid, each warp owns a 32 x 32 sub-tile = 2 x 2
// accumulator fragments. BK = 32: per step each warp loads 2 A fragments (x rows, row-major) and
// 2 B fragments, and does 4 MMAs per 16-wide k slice. B = W.T (K x N) is read straight from the
// W tile sW[n][k]: W's row-major tile is B's column-major layout, so no transpose is needed. Rows
// are padded to LD = BK + 8 halves (80 bytes) so the 16 rows a fragment load touches spread over
// the banks (at most 2-way conflicts instead of 16-way with LD = 32); LD stays a multiple of
// 8 elements as wmma requires. The epilogue goes through
// shared memory (fragments have an opaque register layout) to apply the M/N bounds and the cast.
constexpr int GEMM_V2_BK = 32;

template <typename T>
__global__ void __launch_bounds__(128)
gemm_v2(const T* __restrict__ x, int64_t M, int64_t K, const uint8_t* __restrict__ packed,
        Code16 code, AbsmaxView am, int64_t N, int64_t bs, T* __restrict__ y, bool vec) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BK = GEMM_V2_BK, LD = BK + 8, LDC = TILE_N + 4;
  __shared__ float lut[16];
  __shared__ __align__(32) T sX[TILE_M][LD];
  __shared__ __align__(32) T sW[TILE_N][LD];
  __shared__ __align__(32) float sC[TILE_M][LDC];
  load_lut(lut, code);
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's sub-tile origin
  const int64_t m0 = blockIdx.y * (int64_t)TILE_M, n0 = blockIdx.x * (int64_t)TILE_N;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    load_x_tile<T, BK, LD>(sX, x, M, K, m0, k0);
    load_w_tile<T, BK, LD>(sW, packed, lut, am, N, K, bs, n0, k0, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &sX[wm + 16 * i][kk], LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &sW[wn + 16 * j][kk], LD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sC[wm + 16 * i][wn + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < TILE_M * TILE_N; idx += blockDim.x) {
    const int r = idx / TILE_N, c = idx % TILE_N;  // consecutive threads: consecutive n (coalesced)
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) y[m * N + n] = Cvt<T>::from(sC[r][c]);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// log2(v) for a power of two v >= 1, else -1.
int log2_exact(int64_t v) {
  if (v < 1 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// gemv_v4<T, M, NESTED> for a runtime M (1..8): one instantiation per M.
template <typename T, bool NESTED>
void launch_gemv_v4(int M, const T* x, int64_t K, const uint8_t* packed, Code16 code,
                    AbsmaxSource<NESTED> am, int64_t N, int bs_shift, T* y, cudaStream_t s) {
  const dim3 grid((unsigned)ceil_div(N, GEMV_V3_WARPS)), block(GEMV_V3_WARPS * 32);
  switch (M) {
#define NF4_V4_CASE(MM) \
  case MM: gemv_v4<T, MM, NESTED><<<grid, block, 0, s>>>(x, K, packed, code, am, N, bs_shift, y); break;
    NF4_V4_CASE(1) NF4_V4_CASE(2) NF4_V4_CASE(3) NF4_V4_CASE(4)
    NF4_V4_CASE(5) NF4_V4_CASE(6) NF4_V4_CASE(7) NF4_V4_CASE(8)
#undef NF4_V4_CASE
    default: break;
  }
}

int finish() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : static_cast<int>(err);
}

// Calls f.template operator()<T>() with T the element type of dtype code (0/1/2).
template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return NF4_ERR_DTYPE;
  }
}

}  // namespace

extern "C" {

int nf4_cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky error so later calls report their own
  }
  return static_cast<int>(err);
}

const char* nf4_cuda_strerror(int err) {
  switch (err) {
    case 0: return "no error";
    case NF4_ERR_DTYPE: return "unsupported dtype for this kernel version (dtype 0=float32, 1=float16, 2=bfloat16; gemm v2 needs float16 or bfloat16)";
    case NF4_ERR_VERSION: return "unknown kernel version";
    case NF4_ERR_ALIGN: return "this kernel version needs K % 32 == 0, blocksize % 32 == 0 and 16-byte aligned packed/x/out pointers";
    case NF4_ERR_SHAPE: return "bad shape (GEMV needs 1 <= M <= 8; sizes must be >= 0)";
    case NF4_ERR_POW2: return "this kernel version (GEMV v4) needs a power-of-two blocksize and nested blocksize2, and K % 32 == 0";
    default: return cudaGetErrorString(static_cast<cudaError_t>(err));
  }
}

int nf4_cuda_synchronize(void) { return static_cast<int>(cudaDeviceSynchronize()); }

int nf4_cuda_decode_absmax(AbsmaxView am, int64_t nblocks, float* out, void* stream) {
  if (nblocks < 0 || am.qabsmax == nullptr || am.blocksize2 < 1) return NF4_ERR_SHAPE;
  if (nblocks == 0) return 0;
  decode_absmax<<<(unsigned)ceil_div(nblocks, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      am, nblocks, out);
  return finish();
}

int nf4_cuda_set_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return 0;
  return static_cast<int>(cudaSetDevice(device));
}

int nf4_cuda_stream_synchronize(void* stream) {
  const cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return static_cast<int>(err);
  return finish();
}

int nf4_cuda_dequantize(const uint8_t* packed, Code16 code, AbsmaxView am, int64_t n,
                        int64_t blocksize, void* out, int dtype, int version, void* stream) {
  if (n < 0 || blocksize < 1) return NF4_ERR_SHAPE;
  if (n == 0) return 0;
  const bool v2_ok = blocksize % 32 == 0 && aligned16(packed) && aligned16(out);
  if (version == 0) version = v2_ok ? 2 : 1;
  if (version == 2 && !v2_ok) return NF4_ERR_ALIGN;
  if (version != 1 && version != 2) return NF4_ERR_VERSION;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
    if (version == 1) {
      dequant_v1<T><<<(unsigned)ceil_div(n, 256), 256, 0, s>>>(packed, code, am, n, blocksize, o);
    } else {
      dequant_v2<T><<<(unsigned)ceil_div(ceil_div(n, 32), 256), 256, 0, s>>>(packed, code, am, n,
                                                                               blocksize, o);
    }
    return finish();
  });
}

int nf4_cuda_gemv(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* packed,
                  Code16 code, AbsmaxView am, int64_t N, int64_t blocksize, void* y, int version,
                  void* stream) {
  if (M < 1 || M > GEMV_MAX_M || K < 1 || N < 0 || blocksize < 1) return NF4_ERR_SHAPE;
  if (N == 0) return 0;
  const bool v3_ok = K % 32 == 0 && blocksize % 32 == 0 && aligned16(packed) && aligned16(x);
  const int bs_shift = log2_exact(blocksize);
  const int shift2 = am.qabsmax ? log2_exact(am.blocksize2) : 0;
  const bool v4_ok = v3_ok && bs_shift >= 0 && shift2 >= 0;
  if (version == 0) version = v4_ok ? 4 : (v3_ok ? 3 : 2);
  if (version == 3 && !v3_ok) return NF4_ERR_ALIGN;
  if (version == 4 && !v4_ok) return v3_ok ? NF4_ERR_POW2 : NF4_ERR_ALIGN;
  if (version < 1 || version > 4) return NF4_ERR_VERSION;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int m = static_cast<int>(M);
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    if (version == 1) {
      gemv_v1<T><<<(unsigned)ceil_div(M * N, 256), 256, 0, s>>>(xp, m, K, packed, code, am, N,
                                                                   blocksize, yp);
    } else if (version == 2) {
      gemv_v2<T><<<(unsigned)N, GEMV_V2_THREADS, 0, s>>>(xp, m, K, packed, code, am, N, blocksize,
                                                         yp);
    } else if (version == 3) {
      gemv_v3<T><<<(unsigned)ceil_div(N, GEMV_V3_WARPS), GEMV_V3_WARPS * 32, 0, s>>>(
          xp, m, K, packed, code, am, N, blocksize, yp);
    } else if (am.qabsmax) {
      const AbsmaxSource<true> src{am.qabsmax, am.absmax2, am.code2, am.offset, shift2};
      launch_gemv_v4<T, true>(m, xp, K, packed, code, src, N, bs_shift, yp, s);
    } else {
      const AbsmaxSource<false> src{am.absmax};
      launch_gemv_v4<T, false>(m, xp, K, packed, code, src, N, bs_shift, yp, s);
    }
    return finish();
  });
}

int nf4_cuda_gemm(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* packed,
                  Code16 code, AbsmaxView am, int64_t N, int64_t blocksize, void* y, int version,
                  void* stream) {
  if (M < 0 || K < 1 || N < 0 || blocksize < 1) return NF4_ERR_SHAPE;
  if (M == 0 || N == 0) return 0;
  if (version == 0) version = (dtype == 1 || dtype == 2) ? 2 : 1;
  if (version != 1 && version != 2) return NF4_ERR_VERSION;
  if (version == 2 && dtype != 1 && dtype != 2) return NF4_ERR_DTYPE;
  if (ceil_div(M, TILE_M) > 65535) return NF4_ERR_SHAPE;  // grid.y limit
  const bool vec = K % 8 == 0 && blocksize % 8 == 0 &&
                   (reinterpret_cast<uintptr_t>(packed) & 3) == 0;
  const dim3 grid((unsigned)ceil_div(N, TILE_N), (unsigned)ceil_div(M, TILE_M));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    if (version == 1) {
      gemm_v1<T><<<grid, 256, 0, s>>>(xp, M, K, packed, code, am, N, blocksize, yp, vec);
      return finish();
    }
    if constexpr (std::is_same<T, float>::value) {
      return NF4_ERR_DTYPE;
    } else {
      gemm_v2<T><<<grid, 128, 0, s>>>(xp, M, K, packed, code, am, N, blocksize, yp, vec);
      return finish();
    }
  });
}

}  // extern "C"
