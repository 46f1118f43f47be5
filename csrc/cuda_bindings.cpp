// cuda_bindings.cpp — pybind11 module minillm._cuda: the NF4 CUDA kernels (nf4_cuda.cu).
//
// Compiled by the HOST compiler (no pybind11 in nvcc) and linked with nf4_cuda.o and the static
// CUDA runtime, so the module imports on any machine, GPU or not. Arrays cross the boundary as raw
// device pointers (Python ints, e.g. cupy's `a.data.ptr`) plus sizes: minillm/kernels.py extracts
// them from cupy arrays and checks dtypes, shapes and contiguity; this file checks sizes and the
// device, then launches on the given stream (an int cudaStream_t, cupy's current stream).
//
// Errors: no usable CUDA device (no driver, no GPU, driver too old for the runtime) -> RuntimeError
// naming the cause, raised BEFORE any launch; an argument a kernel version cannot take ->
// ValueError; a launch failure -> RuntimeError with the CUDA error string.
//
// Device: every launcher takes `device` (CuPy's current device id; -1 = leave as is) and makes it
// this runtime's current device first. The module links the STATIC CUDA runtime, whose current
// device is its own, not CuPy's: without this, a launch on a CuPy device other than 0 would run
// in device 0's context with another device's pointers and stream.
//
// Debugging: with the environment variable MINILLM_CUDA_SYNC=1 (read at every call) each launch is
// followed by cudaStreamSynchronize + cudaGetLastError, so a kernel fault (an out-of-bounds access)
// is raised by the call that launched it, not later by an unrelated CuPy call with the context
// already dead. Off by default (a synchronize costs the overlap of host and device); on in
// .ci/gpu-check's test step.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "nf4.h"

namespace py = pybind11;

namespace {

void ensure_device() {
  static bool ok = false;  // success is cached; a failure is re-checked (and re-raised) every call
  if (ok) return;
  int count = 0;
  const int err = nf4_cuda_device_count(&count);
  if (err != 0)
    throw std::runtime_error(std::string("minillm._cuda: no usable CUDA device: cudaGetDeviceCount "
                                         "failed with '") +
                             nf4_cuda_strerror(err) +
                             "'. Use numpy arrays (the C++ CPU twin) or install an NVIDIA driver.");
  if (count < 1)
    throw std::runtime_error("minillm._cuda: no CUDA device found (cudaGetDeviceCount = 0).");
  ok = true;
}

void check(int ret, const char* what) {
  if (ret == 0) return;
  const std::string msg = std::string("minillm._cuda.") + what + ": " + nf4_cuda_strerror(ret);
  if (ret < 0) throw py::value_error(msg);
  throw std::runtime_error(msg);
}

nf4::Code16 to_code16(const py::array_t<float, py::array::c_style | py::array::forcecast>& code) {
  if (code.size() != 16)
    throw py::value_error("code must have 16 entries, got " + std::to_string(code.size()));
  nf4::Code16 c;
  for (int i = 0; i < 16; ++i) c.v[i] = code.data()[i];
  return c;
}

// absmax: plain -> absmax_ptr != 0 and qabsmax_ptr == 0; nested -> qabsmax_ptr, absmax2_ptr,
// code2_ptr (device pointers) with offset and blocksize2.
nf4::AbsmaxView to_view(uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2,
                        float offset, int64_t blocksize2) {
  nf4::AbsmaxView v;
  if (qabsmax) {
    if (!absmax2 || !code2) throw py::value_error("nested absmax needs absmax2 and code2 pointers");
    if (blocksize2 < 1) throw py::value_error("blocksize2 must be >= 1");
    v.qabsmax = reinterpret_cast<const uint8_t*>(qabsmax);
    v.absmax2 = reinterpret_cast<const float*>(absmax2);
    v.code2 = reinterpret_cast<const float*>(code2);
    v.offset = offset;
    v.blocksize2 = blocksize2;
  } else {
    if (!absmax) throw py::value_error("absmax pointer is null");
    v.absmax = reinterpret_cast<const float*>(absmax);
  }
  return v;
}

bool sync_after_launch() {
  const char* v = std::getenv("MINILLM_CUDA_SYNC");
  return v != nullptr && std::string(v) == "1";
}

void select_device(int device) {
  if (device >= 0) check(nf4_cuda_set_device(device), "set_device");
}

// After a launch: with MINILLM_CUDA_SYNC=1, wait for it and raise the kernel's own error.
void maybe_sync(uintptr_t stream, const char* what) {
  if (!sync_after_launch()) return;
  const int err = nf4_cuda_stream_synchronize(reinterpret_cast<void*>(stream));
  if (err != 0)
    throw std::runtime_error(std::string("minillm._cuda.") + what +
                             ": the kernel failed (found by MINILLM_CUDA_SYNC=1 right after the "
                             "launch): " + nf4_cuda_strerror(err));
}

template <typename T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "minillm._cuda: NF4 CUDA kernels (csrc/nf4_cuda.cu) on raw device pointers. Use "
      "minillm.kernels, which takes cupy arrays and a QuantState.";

  m.def(
      "device_count",
      []() {
        int count = 0;
        return nf4_cuda_device_count(&count) == 0 ? count : 0;
      },
      "Number of CUDA devices the static runtime sees (0 without a driver or GPU; never raises).");
  m.def(
      "device_error",
      []() -> std::string {
        int count = 0;
        const int err = nf4_cuda_device_count(&count);
        return err == 0 ? std::string() : std::string(nf4_cuda_strerror(err));
      },
      "Why no device is usable ('' when cudaGetDeviceCount succeeds).");
  m.def("sync_after_launch", &sync_after_launch,
        "True when MINILLM_CUDA_SYNC=1: every launch is followed by a stream synchronize and an "
        "error check (read at each call).");
  m.def("synchronize", []() {
    ensure_device();
    check(nf4_cuda_synchronize(), "synchronize");
  });

  m.def(
      "dequantize",
      [](uintptr_t packed, const py::array_t<float, py::array::c_style | py::array::forcecast>& code,
         uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset,
         int64_t blocksize2, int64_t n, int64_t blocksize, uintptr_t out, int dtype, int version,
         uintptr_t stream, int device) {
        ensure_device();
        select_device(device);
        check(nf4_cuda_dequantize(ptr<uint8_t>(packed), to_code16(code),
                                  to_view(absmax, qabsmax, absmax2, code2, offset, blocksize2), n,
                                  blocksize, reinterpret_cast<void*>(out), dtype, version,
                                  reinterpret_cast<void*>(stream)),
              "dequantize");
        maybe_sync(stream, "dequantize");
      },
      py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code2"), py::arg("offset"), py::arg("blocksize2"), py::arg("n"),
      py::arg("blocksize"), py::arg("out"), py::arg("dtype"), py::arg("version") = 0,
      py::arg("stream") = 0, py::arg("device") = -1,
      "Dequantize n codes into out (dtype 0 float32, 1 float16, 2 bfloat16). version 0 = best, "
      "1 = one thread per element, 2 = 128-bit loads (blocksize % 32 == 0).");

  m.def(
      "decode_absmax",
      [](uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset, int64_t blocksize2,
         int64_t nblocks, uintptr_t out, uintptr_t stream, int device) {
        ensure_device();
        select_device(device);
        if (!qabsmax) throw py::value_error("decode_absmax needs the nested (uint8) absmax pointer");
        if (!out) throw py::value_error("decode_absmax: out pointer is null");
        check(nf4_cuda_decode_absmax(to_view(0, qabsmax, absmax2, code2, offset, blocksize2), nblocks,
                                     reinterpret_cast<float*>(out), reinterpret_cast<void*>(stream)),
              "decode_absmax");
        maybe_sync(stream, "decode_absmax");
      },
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"),
      py::arg("blocksize2"), py::arg("nblocks"), py::arg("out"), py::arg("stream") = 0,
      py::arg("device") = -1,
      "out (float32, nblocks) = code2[qabsmax[b]] * absmax2[b // blocksize2] + offset: a nested "
      "absmax decoded once (bit-identical to the NumPy reference).");

  auto matmul = [](const char* name, auto launcher) {
    return [name, launcher](uintptr_t x, int dtype, int64_t M, int64_t K, uintptr_t packed,
                            const py::array_t<float, py::array::c_style | py::array::forcecast>& code,
                            uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2,
                            float offset, int64_t blocksize2, int64_t N, int64_t blocksize,
                            uintptr_t y, int version, uintptr_t stream, int device) {
      ensure_device();
      select_device(device);
      check(launcher(reinterpret_cast<const void*>(x), dtype, M, K, ptr<uint8_t>(packed),
                     to_code16(code), to_view(absmax, qabsmax, absmax2, code2, offset, blocksize2),
                     N, blocksize, reinterpret_cast<void*>(y), version,
                     reinterpret_cast<void*>(stream)),
            name);
      maybe_sync(stream, name);
    };
  };
  const char* mm_doc =
      "y (M, N) = x (M, K) @ W.T, W (N, K) the dequantized 4-bit weight; x and y device pointers "
      "in dtype (0 float32, 1 float16, 2 bfloat16), float32 accumulation.";
  m.def("gemv", matmul("gemv", &nf4_cuda_gemv), py::arg("x"), py::arg("dtype"), py::arg("M"),
        py::arg("K"), py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("qabsmax"),
        py::arg("absmax2"), py::arg("code2"), py::arg("offset"), py::arg("blocksize2"),
        py::arg("N"), py::arg("blocksize"), py::arg("y"), py::arg("version") = 0,
        py::arg("stream") = 0, py::arg("device") = -1, mm_doc);
  m.def("gemm", matmul("gemm", &nf4_cuda_gemm), py::arg("x"), py::arg("dtype"), py::arg("M"),
        py::arg("K"), py::arg("packed"), py::arg("code"), py::arg("absmax"), py::arg("qabsmax"),
        py::arg("absmax2"), py::arg("code2"), py::arg("offset"), py::arg("blocksize2"),
        py::arg("N"), py::arg("blocksize"), py::arg("y"), py::arg("version") = 0,
        py::arg("stream") = 0, py::arg("device") = -1, mm_doc);
  m.attr("GEMV_MAX_M") = 8;
}
