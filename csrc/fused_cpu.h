// fused_cpu.h — the C++ CPU twins of minillm's non-GEMM training ops (fused_cpu.cpp).
//
// Every function works on C-contiguous float32 buffers that the caller (csrc/fused_bindings.cpp)
// has checked, and each one fuses a NumPy function of minillm/functional.py or minillm/optim.py
// (named next to each declaration). Row-wise ops take (rows, cols) with cols the last axis.
#pragma once

#include <cstdint>

namespace fused {

// functional.GELU.forward: y = 0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³), n elements; t gets
// tanh(u), which the backward needs (saved, as the reference does: recomputing it costs more).
void gelu_forward(const float* x, float* y, float* t, int64_t n);
// functional.GELU.backward: dx = g · dGELU/dx from x and the saved t.
void gelu_backward(const float* x, const float* t, const float* g, float* dx, int64_t n);

// functional.LayerNorm.forward over the last axis of x (N, C): y, and per row mean and rstd (N,).
void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean,
                        float* rstd, int64_t N, int64_t C, float eps);
// functional.LayerNorm.backward: dx (N, C) (skipped when null), dw and db (C,) (skipped when null).
void layer_norm_backward(const float* g, const float* x, const float* w, const float* mean,
                         const float* rstd, float* dx, float* dw, float* db, int64_t N, int64_t C);

// functional.Softmax.forward / backward over the last axis of (R, L).
void softmax_forward(const float* x, float* y, int64_t R, int64_t L);
void softmax_backward(const float* y, const float* g, float* dx, int64_t R, int64_t L);

// The non-GEMM middle of functional.ScaledDotProductAttention, in place on att (B, H, Tq, Tk):
// forward turns scores q·kᵀ into probabilities (scale, causal mask with the KV-cache offset
// Tk − Tq, key padding mask kpm (B, Tk) or null, stable softmax; a row with no visible key becomes
// uniform, as the NumPy reference's finite fill value gives). Backward turns gp = dL/dp into
// dL/dscores = p·(gp − Σ gp·p)·scale on visible entries, 0 elsewhere.
void attention_softmax_forward(float* att, int64_t B, int64_t H, int64_t Tq, int64_t Tk,
                               float scale, bool causal, const uint8_t* kpm);
void attention_softmax_backward(const float* p, float* gp, int64_t B, int64_t H, int64_t Tq,
                                int64_t Tk, float scale, bool causal, const uint8_t* kpm);

// functional.CrossEntropy.forward: per row lse = log Σ exp(logits) and nll = lse − logits[t]
// (0 where t == ignore_index). Targets must already be range-checked.
void cross_entropy_forward(const float* logits, const int64_t* targets, int64_t ignore_index,
                           float* nll, float* lse, int64_t N, int64_t V);
// functional.CrossEntropy.backward: dlogits = (softmax − onehot(t)) · scale[row].
void cross_entropy_backward(const float* logits, const float* lse, const int64_t* targets,
                            const float* scale, float* dlogits, int64_t N, int64_t V);

// optim.adamw_update: one AdamW step in place, the same float32 operations in the same order
// (bit-identical to the NumPy reference: this file is compiled without FMA contraction).
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float decay,
                  bool has_decay, float beta1, float one_minus_beta1, float beta2,
                  float one_minus_beta2, float bias_correction2_sqrt, float eps, float step_size);

// functional.scatter_add for rows: target[index[i], :] += values[i, :] for i < N, repeated indices
// accumulated in order (np.add.at). Indices must already be in [-V, V) (negative: from the end).
void scatter_add_rows(float* target, int64_t V, const int64_t* index, const float* values,
                      int64_t N, int64_t C);

// OpenMP threads the kernels use (1 without OpenMP; 1 until set_num_threads).
int num_threads();
// Set the OpenMP threads of the kernels (values < 1 mean 1). Not thread-safe: set it between steps.
void set_num_threads(int n);

}  // namespace fused
