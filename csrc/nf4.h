// nf4.h — the NF4 code table and the helpers shared by the C++ CPU twin (nf4_cpu.cpp) and the
// CUDA kernels (nf4_cuda.cu). Header-only, plain C++17; compiled by g++ and by nvcc.
//
// Format (docs/reference.md §2, bitsandbytes `quantize_4bit` / `dequantize_4bit`):
//   * the weight W has logical shape (N = out_features, K = in_features), row-major; it is
//     flattened and cut into blocks of `blocksize` consecutive elements. Blocks may span rows, so
//     the absmax of element (row, k) is absmax[(row * K + k) / blocksize].
//   * two 4-bit codes per byte: element 2j in the HIGH nibble, element 2j+1 in the LOW nibble. An
//     odd element count is padded with code 7 (the exact 0.0).
//   * dequantized value: out[j] = NF4_CODE[q_j] * absmax[j / blocksize], one float32 multiply.
//   * double quantization (QLoRA §3 "Double Quantization", `compress_statistics=True`): the absmax
//     values are themselves stored as uint8 codes of a 256-entry "dynamic" map with one float32
//     absmax2 per 256 blocks and a float32 offset (the mean of the absmax values):
//       absmax[b] = code2[qabsmax[b]] * absmax2[b / 256] + offset      (float32, this op order)
//
// Bit-exactness: the NumPy reference computes code2*absmax2 (rounded to float32), then + offset
// (rounded again). A fused multiply-add rounds once and can differ in the last bit, so
// AbsmaxView::at() forbids contraction: __fmul_rn/__fadd_rn on the GPU, a volatile temporary on
// the CPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace nf4 {

// The 16 NF4 values, index -> value (bitsandbytes `get_4bit_type("nf4")`, identical to
// `nf4_dequantization_lut` in csrc/kernels.cu). Hexadecimal float literals so every value is the
// exact float32 bit pattern of docs/reference.md §2 (e.g. index 1 = 0xbf3239b1), never a re-rounding of
// a decimal. A macro, so the same list initialises a host array and a CUDA __constant__ array.
#define NF4_CODE_VALUES                                                                   \
  {                                                                                       \
    -0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f,                   \
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f,                         \
     0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,                   \
     0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f,  0x1.000000p+0f                    \
  }

static const float NF4_CODE[16] = NF4_CODE_VALUES;

// A 16-entry code table passed BY VALUE (64 bytes). The kernels take the table as an argument,
// so the same code serves NF4 and the other 4-bit tables of minillm/quant.py (FP4, INT4); on the
// GPU a by-value struct lives in the kernel's parameter (constant) space.
struct Code16 {
  float v[16];
};

NF4_HD Code16 nf4_code16() {
  Code16 c = {NF4_CODE_VALUES};
  return c;
}

// The code index of element e (a flat index into the row-major weight) in the packed bytes:
// high nibble for even e, low nibble for odd e.
NF4_HD int code_index(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (byte & 0x0F) : (byte >> 4);
}

// Where the per-block scales live. Exactly one of the two layouts is used:
//   plain : absmax  (float32, one per block)                      qabsmax == nullptr
//   nested: qabsmax (uint8, one per block), absmax2 (float32, one per `blocksize2` blocks),
//           code2 (float32, 256 entries), offset (float32 scalar)
struct AbsmaxView {
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.0f;
  int64_t blocksize2 = 256;

  // absmax of block b, float32, bit-identical to the NumPy reference.
  NF4_HD float at(int64_t b) const {
    if (qabsmax == nullptr) return absmax[b];
#if defined(__CUDA_ARCH__)
    return __fadd_rn(__fmul_rn(code2[qabsmax[b]], absmax2[b / blocksize2]), offset);
#else
    volatile float scaled = code2[qabsmax[b]] * absmax2[b / blocksize2];  // no FMA contraction
    return scaled + offset;
#endif
  }
};

// ---- the C++ CPU twin (nf4_cpu.cpp) --------------------------------------------------------
// All arrays are host pointers, C-contiguous; n = N * K elements; y is (M, N) row-major.
void dequantize_cpu(const uint8_t* packed, const Code16& code, const AbsmaxView& am, int64_t n,
                    int64_t blocksize, float* out);
void matmul_cpu(const float* x, int64_t M, int64_t K, const uint8_t* packed, const Code16& code,
                const AbsmaxView& am, int64_t N, int64_t blocksize, float* y);
int num_threads();

}  // namespace nf4

// ---- the CUDA launchers (nf4_cuda.cu) ---------------------------------------------------------
// Plain extern "C" functions so the pybind11 module (cuda_bindings.cpp) is compiled by the host
// compiler and nvcc never sees pybind11. All pointers are device pointers; `stream` is a
// cudaStream_t (0 = the legacy default stream). dtype: 0 float32, 1 float16, 2 bfloat16.
// version: 0 = the best kernel that supports the arguments, 1.. = that rung of the ladder.
// Return 0 on success, a cudaError_t (> 0) from the runtime, or one of the NF4_ERR_* codes below;
// nf4_cuda_strerror() turns any of them into a message.
enum {
  NF4_ERR_DTYPE = -1,      // dtype not 0/1/2, or not supported by the requested version
  NF4_ERR_VERSION = -2,    // unknown version number
  NF4_ERR_ALIGN = -3,      // requested version needs K % 32 == 0, blocksize % 32 == 0, 16-byte pointers
  NF4_ERR_SHAPE = -4,      // M out of range for the GEMV (1..8) or a negative size
  NF4_ERR_POW2 = -5,       // GEMV v4 needs power-of-two blocksize (and blocksize2 when nested)
};
extern "C" {
int nf4_cuda_device_count(int* count);
const char* nf4_cuda_strerror(int err);
int nf4_cuda_synchronize(void);
// cudaSetDevice(device): the caller's (CuPy's) current device, so launches go to the device that
// owns the pointers and the stream (this static runtime keeps its own current device).
int nf4_cuda_set_device(int device);
// out[b] (float32, nblocks) = the decoded absmax of block b of a NESTED view (am.qabsmax set).
int nf4_cuda_decode_absmax(nf4::AbsmaxView am, int64_t nblocks, float* out, void* stream);
// cudaStreamSynchronize(stream), then cudaGetLastError: reports an asynchronous kernel fault
// (out-of-bounds access, ...) at the launch that caused it (MINILLM_CUDA_SYNC=1).
int nf4_cuda_stream_synchronize(void* stream);
int nf4_cuda_dequantize(const uint8_t* packed, nf4::Code16 code, nf4::AbsmaxView am, int64_t n,
                        int64_t blocksize, void* out, int dtype, int version, void* stream);
int nf4_cuda_gemv(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* packed,
                  nf4::Code16 code, nf4::AbsmaxView am, int64_t N, int64_t blocksize, void* y,
                  int version, void* stream);
int nf4_cuda_gemm(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* packed,
                  nf4::Code16 code, nf4::AbsmaxView am, int64_t N, int64_t blocksize, void* y,
                  int version, void* stream);
}
