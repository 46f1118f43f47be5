// fused_bindings.cpp — pybind11 module minillm._fused: the C++ twins of minillm's non-GEMM ops
// (fused_cpu.cpp) on NumPy arrays. Called from minillm/fused.py, which reshapes the arguments and
// decides when to use it; use that module (or minillm.functional), not this one, from user code.
//
// Every function checks dtypes, contiguity and sizes and raises ValueError naming the argument
// before touching memory (nothing is converted or copied silently: an in-place kernel must write
// into the caller's array); the compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fused_cpu.h"

namespace py = pybind11;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A float32 (or int64 / uint8) C-contiguous array, optionally writeable, of `numel` elements
// (or any size when numel < 0).
template <typename T>
T* check(const py::array& a, const char* name, int64_t numel, bool writeable = false) {
  const char kind = a.dtype().kind();
  bool ok = false;
  if constexpr (std::is_same_v<T, float>) ok = kind == 'f' && a.itemsize() == 4;
  if constexpr (std::is_same_v<T, int64_t>) ok = kind == 'i' && a.itemsize() == 8;
  if constexpr (std::is_same_v<T, uint8_t>) ok = (kind == 'u' || kind == 'b') && a.itemsize() == 1;
  if (!ok) bad(std::string(name) + ": wrong dtype " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) bad(std::string(name) + " must be C-contiguous");
  if (numel >= 0 && a.size() != numel)
    bad(std::string(name) + " has shape " + shape_str(a) + ", expected " + std::to_string(numel) +
        " elements");
  if (writeable) {
    if (!a.writeable()) bad(std::string(name) + " must be writeable");
    return static_cast<T*>(const_cast<void*>(a.data()));
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

py::array_t<float> like(const py::array& a) {
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  return py::array_t<float>(shape);
}

std::pair<int64_t, int64_t> rows_cols(const py::array& a, const char* name) {
  if (a.ndim() < 1) bad(std::string(name) + " must have at least one axis");
  const int64_t cols = a.shape(a.ndim() - 1);
  if (cols < 1) bad(std::string(name) + ": the last axis is empty");
  return {a.size() / cols, cols};
}

py::tuple gelu_forward(const py::array& x) {
  const float* xp = check<float>(x, "x", -1);
  auto y = like(x);
  auto t = like(x);
  float *yp = y.mutable_data(), *tp = t.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::gelu_forward(xp, yp, tp, x.size());
  }
  return py::make_tuple(y, t);
}

py::array_t<float> gelu_backward(const py::array& x, const py::array& t, const py::array& g) {
  const float* xp = check<float>(x, "x", -1);
  const float* tp = check<float>(t, "tanh", x.size());
  const float* gp = check<float>(g, "grad", x.size());
  auto dx = like(x);
  float* dp = dx.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::gelu_backward(xp, tp, gp, dp, x.size());
  }
  return dx;
}

py::tuple layer_norm_forward(const py::array& x, const py::array& w, const py::array& b, float eps) {
  auto [N, C] = rows_cols(x, "x");
  const float* xp = check<float>(x, "x", -1);
  const float* wp = check<float>(w, "weight", C);
  const float* bp = check<float>(b, "bias", C);
  auto y = like(x);
  py::array_t<float> mean(N), rstd(N);
  float *yp = y.mutable_data(), *mp = mean.mutable_data(), *rp = rstd.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::layer_norm_forward(xp, wp, bp, yp, mp, rp, N, C, eps);
  }
  return py::make_tuple(y, mean, rstd);
}

py::tuple layer_norm_backward(const py::array& g, const py::array& x, const py::array& w,
                              const py::array& mean, const py::array& rstd, bool need_dx,
                              bool need_dw) {
  auto [N, C] = rows_cols(x, "x");
  const float* gp = check<float>(g, "grad", x.size());
  const float* xp = check<float>(x, "x", -1);
  const float* wp = check<float>(w, "weight", C);
  const float* mp = check<float>(mean, "mean", N);
  const float* rp = check<float>(rstd, "rstd", N);
  py::object dx = py::none(), dw = py::none(), db = py::none();
  float *dxp = nullptr, *dwp = nullptr, *dbp = nullptr;
  if (need_dx) {
    auto a = like(x);
    dxp = a.mutable_data();
    dx = a;
  }
  if (need_dw) {
    py::array_t<float> a(C), c(C);
    dwp = a.mutable_data();
    dbp = c.mutable_data();
    dw = a;
    db = c;
  }
  {
    py::gil_scoped_release nogil;
    fused::layer_norm_backward(gp, xp, wp, mp, rp, dxp, dwp, dbp, N, C);
  }
  return py::make_tuple(dx, dw, db);
}

py::array_t<float> softmax_forward(const py::array& x) {
  auto [R, L] = rows_cols(x, "x");
  const float* xp = check<float>(x, "x", -1);
  auto y = like(x);
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::softmax_forward(xp, yp, R, L);
  }
  return y;
}

py::array_t<float> softmax_backward(const py::array& y, const py::array& g) {
  auto [R, L] = rows_cols(y, "y");
  const float* yp = check<float>(y, "y", -1);
  const float* gp = check<float>(g, "grad", y.size());
  auto dx = like(y);
  float* dp = dx.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::softmax_backward(yp, gp, dp, R, L);
  }
  return dx;
}

struct AttnDims {
  int64_t B, H, Tq, Tk;
};

AttnDims attn_dims(const py::array& a, const char* name) {
  if (a.ndim() != 4) bad(std::string(name) + " must be 4-D (B, H, Tq, Tk), got " + shape_str(a));
  return {a.shape(0), a.shape(1), a.shape(2), a.shape(3)};
}

const uint8_t* kpm_ptr(const py::object& kpm, const AttnDims& d) {
  if (kpm.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(kpm);
  if (a.ndim() != 2 || a.shape(0) != d.B || a.shape(1) != d.Tk)
    bad("key_padding_mask must be (B, Tk) = (" + std::to_string(d.B) + ", " + std::to_string(d.Tk) +
        "), got " + shape_str(a));
  return check<uint8_t>(a, "key_padding_mask", -1);
}

void attention_softmax_forward(const py::array& att, float scale, bool causal, const py::object& kpm) {
  const AttnDims d = attn_dims(att, "att");
  float* ap = check<float>(att, "att", -1, true);
  const uint8_t* kp = kpm_ptr(kpm, d);
  py::gil_scoped_release nogil;
  fused::attention_softmax_forward(ap, d.B, d.H, d.Tq, d.Tk, scale, causal, kp);
}

void attention_softmax_backward(const py::array& p, const py::array& gp, float scale, bool causal,
                                const py::object& kpm) {
  const AttnDims d = attn_dims(p, "p");
  const float* pp = check<float>(p, "p", -1);
  float* gpp = check<float>(gp, "grad_p", p.size(), true);
  const uint8_t* kp = kpm_ptr(kpm, d);
  py::gil_scoped_release nogil;
  fused::attention_softmax_backward(pp, gpp, d.B, d.H, d.Tq, d.Tk, scale, causal, kp);
}

py::tuple cross_entropy_forward(const py::array& logits, const py::array& targets, int64_t ignore_index) {
  if (logits.ndim() != 2) bad("logits must be 2-D (N, V), got " + shape_str(logits));
  const int64_t N = logits.shape(0), V = logits.shape(1);
  if (V < 1) bad("logits: V must be >= 1");
  const float* lp = check<float>(logits, "logits", -1);
  const int64_t* tp = check<int64_t>(targets, "targets", N);
  for (int64_t r = 0; r < N; ++r)
    if (tp[r] != ignore_index && (tp[r] < 0 || tp[r] >= V))
      throw py::index_error("cross_entropy: target " + std::to_string(tp[r]) + " out of range for " +
                            std::to_string(V) + " classes");
  py::array_t<float> nll(N), lse(N);
  float *np_ = nll.mutable_data(), *sp = lse.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::cross_entropy_forward(lp, tp, ignore_index, np_, sp, N, V);
  }
  return py::make_tuple(nll, lse);
}

py::array_t<float> cross_entropy_backward(const py::array& logits, const py::array& lse,
                                          const py::array& targets, const py::array& scale) {
  if (logits.ndim() != 2) bad("logits must be 2-D (N, V), got " + shape_str(logits));
  const int64_t N = logits.shape(0), V = logits.shape(1);
  const float* lp = check<float>(logits, "logits", -1);
  const float* sp = check<float>(lse, "lse", N);
  const int64_t* tp = check<int64_t>(targets, "targets", N);
  const float* cp = check<float>(scale, "scale", N);
  auto d = like(logits);
  float* dp = d.mutable_data();
  {
    py::gil_scoped_release nogil;
    fused::cross_entropy_backward(lp, sp, tp, cp, dp, N, V);
  }
  return d;
}

void scatter_add_rows(const py::array& target, const py::array& index, const py::array& values) {
  if (target.ndim() != 2) bad("target must be 2-D (V, C), got " + shape_str(target));
  const int64_t V = target.shape(0), C = target.shape(1);
  if (index.ndim() != 1) bad("index must be 1-D, got " + shape_str(index));
  const int64_t N = index.shape(0);
  float* tp = check<float>(target, "target", -1, true);
  const int64_t* ip = check<int64_t>(index, "index", N);
  const float* vp = check<float>(values, "values", N * C);
  if (values.ndim() != 2 || values.shape(0) != N)
    bad("values must be (N, C) = (" + std::to_string(N) + ", " + std::to_string(C) + "), got " + shape_str(values));
  for (int64_t i = 0; i < N; ++i)
    if (ip[i] < -V || ip[i] >= V)
      throw py::index_error("scatter_add: index " + std::to_string(ip[i]) + " out of range for " +
                            std::to_string(V) + " rows");
  py::gil_scoped_release nogil;
  fused::scatter_add_rows(tp, V, ip, vp, N, C);
}

void adamw_update(const py::array& p, const py::array& g, const py::array& m, const py::array& v,
                  float decay, bool has_decay, float beta1, float one_minus_beta1, float beta2,
                  float one_minus_beta2, float bias_correction2_sqrt, float eps, float step_size) {
  const int64_t n = p.size();
  float* pp = check<float>(p, "param", -1, true);
  const float* gp = check<float>(g, "grad", n);
  float* mp = check<float>(m, "exp_avg", n, true);
  float* vp = check<float>(v, "exp_avg_sq", n, true);
  py::gil_scoped_release nogil;
  fused::adamw_update(pp, gp, mp, vp, n, decay, has_decay, beta1, one_minus_beta1, beta2,
                      one_minus_beta2, bias_correction2_sqrt, eps, step_size);
}

}  // namespace

PYBIND11_MODULE(_fused, m) {
  m.doc() =
      "minillm._fused: C++ twins of minillm's non-GEMM ops (csrc/fused_cpu.cpp) on float32 "
      "C-contiguous NumPy arrays. Use minillm.fused / minillm.functional, not this module.";
  m.def("num_threads", &fused::num_threads, "OpenMP threads the kernels use (1 without OpenMP).");
  m.def("set_num_threads", &fused::set_num_threads, py::arg("n"),
        "Set the OpenMP threads of the kernels (default 1; values < 1 mean 1).");
  m.def("gelu_forward", &gelu_forward, py::arg("x"),
        "tanh GELU of x (any shape) -> (y, t), t = the tanh the backward needs.");
  m.def("gelu_backward", &gelu_backward, py::arg("x"), py::arg("tanh"), py::arg("grad"),
        "grad * GELU'(x) from x and the saved tanh.");
  m.def("layer_norm_forward", &layer_norm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), "LayerNorm over the last axis -> (y, mean (N,), rstd (N,)).");
  m.def("layer_norm_backward", &layer_norm_backward, py::arg("grad"), py::arg("x"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("need_dx"), py::arg("need_dw"),
        "-> (dx or None, dweight or None, dbias or None).");
  m.def("softmax_forward", &softmax_forward, py::arg("x"), "softmax over the last axis.");
  m.def("softmax_backward", &softmax_backward, py::arg("y"), py::arg("grad"), "y * (g - sum(g * y)).");
  m.def("attention_softmax_forward", &attention_softmax_forward, py::arg("att"), py::arg("scale"),
        py::arg("causal"), py::arg("key_padding_mask") = py::none(),
        "In place: scores (B, H, Tq, Tk) -> masked, scaled softmax probabilities.");
  m.def("attention_softmax_backward", &attention_softmax_backward, py::arg("p"), py::arg("grad_p"),
        py::arg("scale"), py::arg("causal"), py::arg("key_padding_mask") = py::none(),
        "In place: grad_p -> grad of the scores (softmax backward, scale, mask).");
  m.def("cross_entropy_forward", &cross_entropy_forward, py::arg("logits"), py::arg("targets"),
        py::arg("ignore_index"), "-> (nll (N,), lse (N,)); IndexError on a target out of range.");
  m.def("cross_entropy_backward", &cross_entropy_backward, py::arg("logits"), py::arg("lse"),
        py::arg("targets"), py::arg("scale"), "(softmax - onehot) * scale[row].");
  m.def("scatter_add_rows", &scatter_add_rows, py::arg("target"), py::arg("index"), py::arg("values"),
        "In place target[index[i]] += values[i] (repeated indices accumulate); IndexError out of range.");
  m.def("adamw_update", &adamw_update, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("decay"), py::arg("has_decay"), py::arg("beta1"),
        py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"),
        py::arg("bias_correction2_sqrt"), py::arg("eps"), py::arg("step_size"),
        "One AdamW update in place (bit-identical to minillm.optim.adamw_update).");
}
