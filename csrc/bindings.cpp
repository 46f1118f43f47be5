// bindings.cpp — pybind11 module minillm._C: the C++ CPU twin of the NF4 kernels (nf4_cpu.cpp)
// on NumPy arrays. Called from minillm/kernels.py, which builds the arguments from a QuantState;
// use that module, not this one, from user code.
//
// Every function checks shapes and dtypes and raises ValueError (naming the argument and the
// expected size) before touching memory; the compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "nf4.h"

namespace py = pybind11;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

[[noreturn]] void bad(const std::string& msg) { throw py::value_error(msg); }

nf4::Code16 to_code16(const carray<float>& code) {
  if (code.ndim() != 1 || code.size() != 16)
    bad("code must be a float32 array of 16 values, got " + std::to_string(code.size()));
  nf4::Code16 c;
  for (int i = 0; i < 16; ++i) c.v[i] = code.data()[i];
  return c;
}

// The absmax arguments, checked against n and blocksize. Holds the arrays so the pointers stay
// valid while the GIL is released.
struct Absmax {
  py::array absmax;
  carray<float> absmax2, code2;
  nf4::AbsmaxView view;
};

Absmax to_absmax(const py::array& absmax, int64_t n, int64_t blocksize, const py::object& absmax2,
                 const py::object& code2, float offset, int64_t blocksize2) {
  Absmax r;
  if (blocksize < 1) bad("blocksize must be >= 1, got " + std::to_string(blocksize));
  const int64_t nblocks = ceil_div(n, blocksize);
  if (absmax.ndim() != 1 || absmax.size() != nblocks)
    bad("absmax must be 1-D with ceil(n / blocksize) = " + std::to_string(nblocks) +
        " entries, got " + std::to_string(absmax.size()));
  if (!(absmax.flags() & py::array::c_style)) bad("absmax must be C-contiguous");
  r.absmax = absmax;
  if (absmax2.is_none()) {
    if (!py::isinstance<carray<float>>(absmax) || absmax.dtype().kind() != 'f' || absmax.itemsize() != 4)
      bad("absmax must be float32 (or uint8 with absmax2/code2 for double quantization)");
    r.view.absmax = static_cast<const float*>(absmax.data());
    return r;
  }
  if (absmax.dtype().kind() != 'u' || absmax.itemsize() != 1)
    bad("nested absmax (double quantization) must be uint8 codes");
  if (code2.is_none()) bad("double quantization needs code2 (the 256-entry dynamic map)");
  if (blocksize2 < 1) bad("blocksize2 must be >= 1");
  r.absmax2 = absmax2.cast<carray<float>>();
  r.code2 = code2.cast<carray<float>>();
  if (r.absmax2.ndim() != 1 || r.absmax2.size() != ceil_div(nblocks, blocksize2))
    bad("absmax2 must have ceil(nblocks / blocksize2) = " +
        std::to_string(ceil_div(nblocks, blocksize2)) + " entries, got " +
        std::to_string(r.absmax2.size()));
  if (r.code2.ndim() != 1 || r.code2.size() != 256)
    bad("code2 must have 256 entries, got " + std::to_string(r.code2.size()));
  r.view.qabsmax = static_cast<const uint8_t*>(absmax.data());
  r.view.absmax2 = r.absmax2.data();
  r.view.code2 = r.code2.data();
  r.view.offset = offset;
  r.view.blocksize2 = blocksize2;
  return r;
}

void check_packed(const carray<uint8_t>& packed, int64_t n) {
  if (packed.size() < ceil_div(n, 2))
    bad("packed holds " + std::to_string(packed.size()) + " bytes; n = " + std::to_string(n) +
        " codes need " + std::to_string(ceil_div(n, 2)));
}

py::array_t<float> nf4_code() {
  py::array_t<float> out(16);
  for (int i = 0; i < 16; ++i) out.mutable_data()[i] = nf4::NF4_CODE[i];
  return out;
}

py::array_t<float> dequantize(const carray<uint8_t>& packed, const carray<float>& code,
                              const py::array& absmax, int64_t n, int64_t blocksize,
                              const py::object& absmax2, const py::object& code2, float offset,
                              int64_t blocksize2) {
  if (n < 0) bad("n must be >= 0");
  check_packed(packed, n);
  const nf4::Code16 c = to_code16(code);
  Absmax am = to_absmax(absmax, n, blocksize, absmax2, code2, offset, blocksize2);
  py::array_t<float> out(n);
  float* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    nf4::dequantize_cpu(packed.data(), c, am.view, n, blocksize, o);
  }
  return out;
}

py::array_t<float> matmul(const carray<float>& x, const carray<uint8_t>& packed,
                          const carray<float>& code, const py::array& absmax, int64_t N,
                          int64_t blocksize, const py::object& absmax2, const py::object& code2,
                          float offset, int64_t blocksize2) {
  if (x.ndim() != 2) bad("x must be 2-D (M, K), got ndim " + std::to_string(x.ndim()));
  const int64_t M = x.shape(0), K = x.shape(1);
  if (N < 1 || K < 1) bad("N and K must be >= 1");
  const int64_t n = N * K;
  check_packed(packed, n);
  const nf4::Code16 c = to_code16(code);
  Absmax am = to_absmax(absmax, n, blocksize, absmax2, code2, offset, blocksize2);
  py::array_t<float> y({M, N});
  float* yp = y.mutable_data();
  if (M > 0) {
    py::gil_scoped_release nogil;
    nf4::matmul_cpu(x.data(), M, K, packed.data(), c, am.view, N, blocksize, yp);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "minillm._C: the C++ CPU twin of the NF4 dequantize / dequantize-matmul kernels "
      "(csrc/nf4_cpu.cpp). Use minillm.kernels, which wraps these with QuantState handling.";
  m.def("nf4_code", &nf4_code, "The NF4 code table compiled into the extension, float32 (16,).");
  m.def("num_threads", &nf4::num_threads, "OpenMP threads the kernels use (1 without OpenMP).");
  m.def("dequantize", &dequantize, py::arg("packed"), py::arg("code"), py::arg("absmax"),
        py::arg("n"), py::arg("blocksize"), py::arg("absmax2") = py::none(),
        py::arg("code2") = py::none(), py::arg("offset") = 0.0f, py::arg("blocksize2") = 256,
        "Dequantize n 4-bit codes -> float32 (n,): out[e] = code[q_e] * absmax[e // blocksize].\n"
        "packed: uint8, >= ceil(n/2) bytes, element 2j in the high nibble. code: float32 (16,).\n"
        "absmax: float32 (ceil(n/blocksize),), or uint8 codes with absmax2 float32\n"
        "(ceil(nblocks/blocksize2),), code2 float32 (256,) and offset (double quantization).\n"
        "Bit-identical to minillm.quant.dequantize_4bit. Raises ValueError on a size mismatch.");
  m.def("matmul", &matmul, py::arg("x"), py::arg("packed"), py::arg("code"), py::arg("absmax"),
        py::arg("N"), py::arg("blocksize"), py::arg("absmax2") = py::none(),
        py::arg("code2") = py::none(), py::arg("offset") = 0.0f, py::arg("blocksize2") = 256,
        "y (M, N) = x (M, K) @ W.T with W (N, K) the dequantized 4-bit weight; float32 in and out,\n"
        "float32 accumulation (equal to NumPy's dequantize-then-matmul to float32 rounding).\n"
        "Other arguments as dequantize. Raises ValueError on a size mismatch.");
}
