"""Chapter 01 — the autograd engine: every op's gradient, the classic autograd bugs, modules, optimizers.

What is measured
    * ``gradcheck`` (central differences in float64, atol 1e-6 + rtol 1e-4) for every differentiable
      op, with broadcasting in both directions, batched/broadcast matmul, every reduction form, repeated
      indices (gather, integer indexing, embedding), masks, dropout with a fixed mask, cross-entropy with
      ignore_index=-100, attention with a KV-cache offset and a fully masked query row.
    * docs/bugs.md B06 (re-used node): c = (2a)² at a = 3 gives 36 and dc/da = 24; L = b² + b gives 42 and 26.
    * A deliberately wrong backward is caught, and the message names the input and the element.
    * docs/bugs.md B08 at op level: masked softmax [1, 2, masked] = [0.2689414213699951, 0.7310585786300049, 0];
      softmax([1000, 1001]) without overflow; log_softmax([1000, 0]) = [0, −1000].
    * dtype discipline: float32 in → float32 out (and float32 gradients) whatever the Python/NumPy scalars.
    * Module naming, tied weights, state_dict round trip and its errors, train/eval, freezing.
    * AdamW against a float64 transcription of torch's algorithm, the cosine schedule, clipping,
      docs/bugs.md B05 gradient accumulation (0.875 and 1/8 per token; equals the big batch for a GPT).
    * Cross-checks (marker ``crosscheck``): every op and a whole GPT forward/backward against torch /
      transformers' GPT2LMHeadModel, and AdamW against torch.optim.AdamW, to 1e-5 relative.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minillm import functional as F
from minillm import optim
from minillm.model import GPT, GPTConfig, shift_labels
from minillm.nn import Dropout, Linear, Module, Parameter
from minillm.tensor import Function, Tensor, no_grad
from minillm.train.loop import accumulate_gradients

# ----------------------------------------------------------------------------- helpers


def t64(shape, seed=0, low=None, high=None, grad=True):
    """A float64 leaf: standard normal, or uniform in [low, high)."""
    r = np.random.default_rng(seed)
    a = r.standard_normal(shape) if low is None else r.uniform(low, high, shape)
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def away_from(shape, seed=0, gap=0.2):
    """float64 leaf with |x| ≥ gap (for kinks at 0: relu, clip bounds, maximum)."""
    r = np.random.default_rng(seed)
    a = r.uniform(gap, 1.5, shape) * r.choice([-1.0, 1.0], shape)
    return Tensor(a, requires_grad=True)


def check(fn, *inputs):
    assert F.gradcheck(fn, list(inputs)) is True


# ------------------------------------------------------------------ 1. gradcheck for every op

BROADCAST_SHAPES = [((3, 4), (4,)), ((4,), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((3, 1), (2, 3, 4)),
                    ((2, 1, 4), (3, 1))]


@pytest.mark.parametrize("sa,sb", BROADCAST_SHAPES, ids=[f"{a}x{b}" for a, b in BROADCAST_SHAPES])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "minimum"])
def test_gradcheck_binary_broadcast(op, sa, sb):
    a = away_from(sa, 1)
    b = t64(sb, 2, 0.5, 1.5) if op == "div" else away_from(sb, 2, gap=0.2)
    if op in ("maximum", "minimum"):  # keep |a − b| away from 0 so the kink is not straddled
        b = Tensor(b.data + 0.05 * np.sign(b.data), requires_grad=True)
        fa, fb = np.broadcast_arrays(a.data, b.data)
        assert np.abs(fa - fb).min() > 1e-3
    check(getattr(F, op), a, b)


def test_gradcheck_operators_and_python_scalars():
    x = t64((3, 4), 3, 0.5, 2.0)
    check(lambda x: 2.5 * x - x * np.float64(0.5) + 1 - (3 - x) / 4 + 2 / x - (-x), x)


@pytest.mark.parametrize("exponent", [3, 2.0, 0.5, -1.5])
def test_gradcheck_pow_scalar_exponent(exponent):
    check(lambda x: x ** exponent, t64((3, 4), 4, 0.5, 2.0))


def test_gradcheck_pow_tensor_exponent_broadcast():
    base, expo = t64((3, 4), 5, 0.5, 2.0), t64((4,), 6, -1.0, 2.0)
    check(F.pow, base, expo)
    check(F.pow, t64((1, 4), 7, 0.5, 2.0), t64((3, 1), 8, -1.0, 2.0))


MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)),
                 ((2, 1, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 2))]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES, ids=[f"{a}@{b}" for a, b in MATMUL_SHAPES])
def test_gradcheck_matmul(sa, sb):
    a, b = t64(sa, 9), t64(sb, 10)
    out = a @ b
    assert out.shape == np.matmul(a.data, b.data).shape
    check(F.matmul, a, b)


def test_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        F.matmul(t64((3, 4)), t64((5, 2)))


@pytest.mark.parametrize("xshape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_linear(xshape, bias):
    x, w, b = t64(xshape, 11), t64((5, 4), 12), t64((5,), 13)
    if bias:
        check(F.linear, x, w, b)
        np.testing.assert_allclose(F.linear(x, w, b).data, x.data @ w.data.T + b.data, rtol=1e-12)
    else:
        check(F.linear, x, w)


REDUCE_AXES = [(None, False), (None, True), (1, False), (-1, True), ((0, 2), False), ((0, 2), True)]


@pytest.mark.parametrize("axis,keepdims", REDUCE_AXES, ids=[f"{a}-{k}" for a, k in REDUCE_AXES])
@pytest.mark.parametrize("op", ["sum", "mean", "max", "var", "var1"])
def test_gradcheck_reductions(op, axis, keepdims):
    x = t64((2, 3, 4), 14)
    if op == "var1":
        fn = lambda x: F.var(x, axis, keepdims, correction=1)  # noqa: E731
        ref = np.var(x.data, axis=axis, keepdims=keepdims, ddof=1)
    else:
        fn = lambda x: getattr(F, op)(x, axis, keepdims)  # noqa: E731
        ref = getattr(np, op)(x.data, axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(fn(x).data, ref, rtol=1e-12)
    check(fn, x)


def test_max_ties_share_gradient():
    x = Tensor(np.array([1.0, 3.0, 3.0, 2.0]), requires_grad=True)
    F.max(x).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5, 0.0])


def test_var_rejects_zero_denominator():
    with pytest.raises(ValueError, match="correction 1"):
        F.var(t64((1, 3)), axis=0, correction=1)


UNARY = {
    "exp": (F.exp, None), "log": (F.log, (0.2, 3.0)), "tanh": (F.tanh, None), "sqrt": (F.sqrt, (0.2, 3.0)),
    "relu": (F.relu, "kink"), "gelu": (F.gelu, None), "sigmoid": (F.sigmoid, None),
    "softplus": (F.softplus, None), "logsigmoid": (F.logsigmoid, None),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_gradcheck_unary(name):
    fn, dom = UNARY[name]
    if dom == "kink":
        x = away_from((3, 4), 15)
    elif dom is None:
        x = t64((3, 4), 15)
        x.data *= 3  # reach the tails
    else:
        x = t64((3, 4), 15, *dom)
    check(fn, x)


def test_unary_values():
    x = np.array([-30.0, -1.0, 0.0, 0.5, 30.0])
    T = Tensor(x)
    np.testing.assert_allclose(F.sigmoid(T).data, 1 / (1 + np.exp(-x)), rtol=1e-14)
    np.testing.assert_allclose(F.softplus(T).data, np.log1p(np.exp(x)), rtol=1e-14)
    np.testing.assert_allclose(F.logsigmoid(T).data, -np.log1p(np.exp(-x)), rtol=1e-14)
    c = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(F.gelu(T).data, 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3))), rtol=1e-14)
    np.testing.assert_array_equal(F.relu(T).data, np.maximum(x, 0))
    big = Tensor(np.array([-1000.0, 1000.0]))  # docs/bugs.md B16: finite in the far tails
    np.testing.assert_array_equal(F.logsigmoid(big).data, [-1000.0, 0.0])
    np.testing.assert_array_equal(F.softplus(big).data, [0.0, 1000.0])
    np.testing.assert_array_equal(F.sigmoid(big).data, [0.0, 1.0])


def test_gradcheck_shape_ops():
    x = t64((2, 3, 4), 16)
    check(lambda x: x.reshape(4, 6), x)
    check(lambda x: x.reshape(-1), x)
    check(lambda x: x.transpose(0, 2), x)
    check(lambda x: x.T, x)
    check(lambda x: x.permute(2, 0, 1), x)
    check(lambda x: x.permute(-1, 0, 1).reshape(4, 6).T, x)
    np.testing.assert_array_equal(x.permute(2, 0, 1).data, x.data.transpose(2, 0, 1))


INDEXES = {
    "slices": (slice(1, None), slice(None, None, 2)),
    "ellipsis_int": (Ellipsis, 1),
    "newaxis": (None, 0),
    "negative_step": (slice(None, None, -1),),
    "int_array_repeats": np.array([0, 2, 0, 0]),
    "list_repeats": [2, 2, 1],
    "2d_int_array": np.array([[0, 1], [1, 1]]),
    "mixed": (slice(None), np.array([3, 3, 0])),
    "pairs": (np.array([0, 0, 2]), np.array([1, 1, 3])),
    "bool_mask": np.array([True, False, True]),
}


@pytest.mark.parametrize("name", list(INDEXES))
def test_gradcheck_indexing(name):
    idx = INDEXES[name]
    x = t64((3, 4), 17)
    np.testing.assert_array_equal(x[idx].data, x.data[idx])
    check(lambda x: x[idx], x)


def test_index_repeats_accumulate():
    x = Tensor(np.zeros(3), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])


def test_gradcheck_gather():
    x = t64((3, 4), 18)
    idx1 = np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])
    np.testing.assert_array_equal(F.gather(x, 1, idx1).data, np.take_along_axis(x.data, idx1, 1))
    check(lambda x: F.gather(x, 1, idx1), x)
    idx0 = np.array([[2, 0, 2, 2], [2, 1, 0, 2]])
    check(lambda x: F.gather(x, 0, idx0), x)
    check(lambda x: F.gather(x, -1, idx1), x)


def test_gather_backward_3d_repeats_without_sparse_indices(monkeypatch):
    """Gather's backward on a 3-D input (repeated indices accumulate) is gradchecked, and it
    never calls ``xp.indices(..., sparse=True)``: cupy.indices has no ``sparse`` argument, so the
    array module is replaced by one whose ``indices`` refuses it."""
    import types

    x = t64((2, 3, 4), 31)
    idx = np.array([[[0, 0], [3, 1], [2, 2]], [[1, 1], [1, 0], [3, 3]]])  # (2, 3, 2) along axis 2
    check(lambda x: F.gather(x, 2, idx), x)
    idx1 = np.array([[[2, 2, 2, 0]], [[1, 0, 1, 1]]])  # (2, 1, 4) along axis 1
    check(lambda x: F.gather(x, 1, idx1), x)

    def indices(dimensions, dtype=int):  # cupy 14's signature: no ``sparse``
        return np.indices(dimensions, dtype=dtype)

    class NoSparse(types.ModuleType):  # numpy, except for ``indices``
        def __getattr__(self, name):
            return getattr(np, name)

    no_sparse = NoSparse("no_sparse")
    no_sparse.indices = indices
    monkeypatch.setattr(F, "_xp", lambda a: no_sparse)
    x = Tensor(np.arange(24, dtype=np.float32).reshape(2, 3, 4), requires_grad=True)
    F.gather(x, 2, idx).sum().backward()
    expected = np.zeros((2, 3, 4), np.float32)
    np.add.at(expected, (np.arange(2)[:, None, None], np.arange(3)[None, :, None], idx), 1.0)
    np.testing.assert_array_equal(x.grad, expected)
    assert x.grad.dtype == np.float32 and expected[0, 0, 0] == 2.0


def test_gradcheck_concat_stack_split():
    a, b, c = t64((2, 3), 19), t64((2, 1), 20), t64((2, 2), 21)
    check(lambda a, b, c: F.concat([a, b, c], axis=1), a, b, c)
    check(lambda a, c: F.concat([a.T, c.T * 2.0], axis=0), a, c)
    d, e = t64((2, 3), 22), t64((2, 3), 23)
    assert F.stack([a, d, e], axis=0).shape == (3, 2, 3)
    assert F.stack([a, d, e], axis=-1).shape == (2, 3, 3)
    np.testing.assert_array_equal(F.stack([a, d], axis=1).data, np.stack([a.data, d.data], axis=1))
    check(lambda a, d, e: F.stack([a, d, e], axis=0), a, d, e)
    check(lambda a, d, e: F.stack([a, d, e], axis=-1), a, d, e)
    x = t64((7, 2), 24)
    assert [p.shape for p in F.split(x, 3)] == [(3, 2), (3, 2), (1, 2)]

    def weighted(x, sections, axis):
        parts = F.split(x, sections, axis)
        return F.concat([p * float(i + 1) for i, p in enumerate(parts)], axis=axis)

    check(lambda x: weighted(x, 3, 0), x)
    check(lambda x: weighted(x, [1, 1], 1), x)
    check(lambda x: weighted(x, [4, 0, 3], 0), x)
    with pytest.raises(ValueError, match=r"\[2, 2\].*size 7"):
        F.split(x, [2, 2], 0)


def test_gradcheck_where_masked_fill_clip():
    cond = np.array([[True, False, True, False], [False, False, True, True], [True, True, False, False]])
    a, b = t64((3, 4), 25), t64((4,), 26)
    check(lambda a, b: F.where(cond, a, b), a, b)
    check(lambda a, b: F.where(cond[:, :1], b, a), a, b)
    check(lambda a: F.masked_fill(a, cond, -7.0), a)
    np.testing.assert_array_equal(F.masked_fill(a, cond, -7.0).data, np.where(cond, -7.0, a.data))
    x = Tensor(np.array([-2.0, -0.7, -0.3, 0.2, 0.6, 3.0]), requires_grad=True)
    check(lambda x: F.clip(x, -0.5, 0.5), x)
    F.clip(x, -0.5, 0.5).sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 0, 1, 1, 0, 0])
    lo = np.array([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0])
    check(lambda x: F.clip(x, lo, 1.0), x)


def test_gradcheck_embedding_repeated_ids():
    w = t64((5, 3), 27)
    ids = np.array([[1, 1, 4], [0, 1, 1]])
    np.testing.assert_array_equal(F.embedding(ids, w).data, w.data[ids])
    check(lambda w: F.embedding(ids, w), w)
    w.grad = None
    F.embedding(ids, w).sum().backward()
    np.testing.assert_array_equal(w.grad[:, 0], [1, 4, 0, 0, 1])  # id 1 appears four times
    with pytest.raises(IndexError, match="token id 5 out of range for a vocabulary of 5"):
        F.embedding(np.array([[0, 5]]), w)


@pytest.mark.parametrize("axis", [-1, 0])
def test_gradcheck_softmax_family(axis):
    x = t64((3, 4), 28)
    check(lambda x: F.softmax(x, axis), x)
    check(lambda x: F.log_softmax(x, axis), x)
    ref = np.exp(x.data) / np.exp(x.data).sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(F.softmax(x, axis).data, ref, rtol=1e-14)
    np.testing.assert_allclose(F.log_softmax(x, axis).data, np.log(ref), rtol=1e-13)


def test_gradcheck_layer_norm():
    x, w, b = t64((2, 3, 5), 29), t64((5,), 30), t64((5,), 31)
    check(F.layer_norm, x, w, b)
    check(lambda x, w, b: F.layer_norm(x, w, b, eps=1e-2), x, w, b)
    xd = x.data
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * w.data + b.data
    np.testing.assert_allclose(F.layer_norm(x, w, b).data, ref, rtol=1e-12)


def test_dropout_mask_statistics_and_backward_uses_same_mask():
    p = 0.25
    x = Tensor(np.ones((200, 100), dtype=np.float32), requires_grad=True)
    y = F.dropout(x, p, np.random.default_rng(1))
    assert y.dtype == np.float32
    zero = y.data == 0
    assert abs(zero.mean() - p) < 0.02  # 20 000 draws: std 0.003
    np.testing.assert_array_equal(y.data[~zero], np.float32(1 / (1 - p)))  # inverted dropout scale 4/3
    assert abs(y.data.mean() - 1.0) < 0.03  # expectation preserved
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)  # for x = 1 the output IS the mask: backward reuses it
    # same seed -> same mask; evaluation -> identity (the very same tensor)
    np.testing.assert_array_equal(F.dropout(x, p, np.random.default_rng(1)).data, y.data)
    assert F.dropout(x, p, np.random.default_rng(1), training=False) is x
    assert F.dropout(x, 0.0, None) is x
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            F.dropout(x, bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Generator"):
        F.dropout(x, 0.5, None)


def test_gradcheck_dropout_fixed_mask():
    x = t64((4, 5), 32)
    check(lambda x: F.dropout(x, 0.4, np.random.default_rng(7)) * x, x)


def _ce_inputs():
    logits = t64((2, 3, 5), 33)
    targets = np.array([[1, -100, 4], [4, 0, -100]])
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cross_entropy(reduction):
    logits, targets = _ce_inputs()
    out = F.cross_entropy(logits, targets, reduction=reduction)
    lp = logits.data - np.log(np.exp(logits.data).sum(-1, keepdims=True))
    valid = targets != -100
    nll = np.where(valid, -np.take_along_axis(lp, np.where(valid, targets, 0)[..., None], -1)[..., 0], 0.0)
    ref = {"none": nll, "sum": nll.sum(), "mean": nll.sum() / valid.sum()}[reduction]
    np.testing.assert_allclose(out.data, ref, rtol=1e-13)
    check(lambda z: F.cross_entropy(z, targets, reduction=reduction), logits)
    if reduction != "none":  # ignored positions get exactly zero gradient
        logits.grad = None
        F.cross_entropy(logits, targets, reduction=reduction).backward()
        assert not logits.grad[~valid].any()


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32), requires_grad=True)
    targets = np.full((2, 3), -100)
    loss = F.cross_entropy(logits, targets)
    assert loss.item() == 0.0 and loss.dtype == np.float32
    loss.backward()
    assert np.isfinite(logits.grad).all() and not logits.grad.any()
    assert F.cross_entropy(logits, targets, reduction="sum").item() == 0.0


def test_cross_entropy_errors():
    logits, targets = _ce_inputs()
    with pytest.raises(ValueError, match=r"targets of shape \(2, 3\)"):
        F.cross_entropy(logits, targets[:, :2])
    with pytest.raises(IndexError, match="target 5 out of range for 5 classes"):
        F.cross_entropy(logits, np.array([[1, 5, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="unknown reduction"):
        F.cross_entropy(logits, targets, reduction="avg")


def _sdpa_ref(q, k, v, visible, scale):
    s = q @ np.swapaxes(k, -1, -2) * scale
    s = np.where(visible, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("Tq,Tk,causal", [(3, 3, True), (2, 4, True), (1, 4, True), (3, 4, False)])
def test_gradcheck_attention(Tq, Tk, causal):
    q, k, v = t64((1, 2, Tq, 3), 34), t64((1, 2, Tk, 3), 35), t64((1, 2, Tk, 3), 36)
    out = F.scaled_dot_product_attention(q, k, v, causal=causal)
    # KV-cache convention: query i sits at absolute position Tk − Tq + i
    vis = np.tril(np.ones((Tq, Tk), bool), k=Tk - Tq) if causal else np.ones((Tq, Tk), bool)
    np.testing.assert_allclose(out.data, _sdpa_ref(q.data, k.data, v.data, vis, 1 / math.sqrt(3)), rtol=1e-12)
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), q, k, v)


def test_attention_kv_cache_offset_equals_last_rows_of_full():
    q, k, v = t64((1, 2, 4, 3), 37), t64((1, 2, 4, 3), 38), t64((1, 2, 4, 3), 39)
    full = F.scaled_dot_product_attention(q, k, v).data
    last = F.scaled_dot_product_attention(q[:, :, 2:], k, v).data
    np.testing.assert_allclose(last, full[:, :, 2:], rtol=1e-13)


def test_attention_fully_masked_row_finite_and_gradcheck():
    # Left padding: row 0 has keys [pad, pad, t, t]; causal query 0 sees only key 0, which is masked.
    B, H, T, D = 2, 1, 4, 3
    q, k, v = t64((B, H, T, D), 40), t64((B, H, T, D), 41), t64((B, H, T, D), 42)
    kpm = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = F.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm)
    assert np.isfinite(out.data).all()
    # every score of that row is the same constant: it averages all of v uniformly (not NaN)
    np.testing.assert_allclose(out.data[0, :, 0], v.data[0].mean(axis=1), rtol=1e-13)
    vis = np.tril(np.ones((T, T), bool))[None, None] & kpm.astype(bool)[:, None, None, :]
    ok = vis.any(-1)  # rows with at least one visible key match −inf masking exactly
    ref = _sdpa_ref(q.data, k.data, v.data, vis | ~ok[..., None], 1 / math.sqrt(D))
    np.testing.assert_allclose(out.data[ok], ref[ok], rtol=1e-12)
    (out * Tensor(np.random.default_rng(0).standard_normal(out.shape))).sum().backward()
    assert all(np.isfinite(t.grad).all() for t in (q, k, v))
    assert not q.grad[0, :, 0].any()  # a fully masked query gets exactly zero gradient
    assert not k.grad[0, :, :2].any()  # padded keys get exactly zero gradient
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm), q, k, v)


def test_attention_errors():
    q = t64((1, 2, 3, 4))
    with pytest.raises(ValueError, match="attention shape mismatch"):
        F.scaled_dot_product_attention(q, t64((1, 2, 3, 5)), t64((1, 2, 3, 5)))
    with pytest.raises(ValueError, match=r"key_padding_mask \(1, 4\) must be \(B, Tk\) = \(1, 3\)"):
        F.scaled_dot_product_attention(q, q, q, key_padding_mask=np.ones((1, 4)))


def test_gradcheck_handles_non_contiguous_inputs():
    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)).T, requires_grad=True)  # Fortran-ordered
    check(lambda x: x * x, x)
    y = Tensor(np.random.default_rng(1).standard_normal((4, 6))[:, ::2], requires_grad=True)
    check(lambda y: F.tanh(y), y)


def test_gradcheck_composite_mlp():
    x, w1, b1, w2 = t64((2, 3, 4), 43), t64((6, 4), 44), t64((6,), 45), t64((3, 6), 46)
    targets = np.array([[0, 2, -100], [1, 1, 0]])

    def fn(x, w1, b1, w2):
        h = F.gelu(F.linear(F.layer_norm(x, F.exp(b1[:4] * 0.0), b1[:4] * 0.1), w1, b1))
        return F.cross_entropy(F.linear(h, w2), targets)

    check(fn, x, w1, b1, w2)


# --------------------------------------------------------------- 2. docs/bugs.md B06 (re-used node)


def test_a_reused_scalar_node_gets_the_sum_of_its_gradients():
    a = Tensor(np.array(3.0), requires_grad=True)
    b = a * 2
    c = b * b
    assert c.item() == 36.0
    c.backward()
    assert a.grad.item() == 24.0  # the buggy "overwrite" version gives 12

    a = Tensor(np.array(3.0), requires_grad=True)
    b = a * 2
    L = b * b + b
    assert L.item() == 42.0
    L.backward()
    assert a.grad.item() == 26.0

    h = 1e-6
    fd = (((3 + h) * 2) ** 2 - ((3 - h) * 2) ** 2) / (2 * h)
    assert abs(fd - 24.0) < 1e-5 and abs(a.grad.item() - 26.0) < 1e-12


def test_a_reused_tensor_node_matches_finite_differences():
    x, W = t64((3, 4), 47), t64((4, 2), 48)

    def fn(x, W):
        y = x @ W
        return y + y * y

    check(fn, x, W)
    # analytic: dz/dy = 1 + 2y, summed over z
    x.grad = W.grad = None
    y = x.data @ W.data
    fn(x, W).sum().backward()
    np.testing.assert_allclose(x.grad, (1 + 2 * y) @ W.data.T, rtol=1e-13)
    np.testing.assert_allclose(W.grad, x.data.T @ (1 + 2 * y), rtol=1e-13)


def test_backward_accumulates_into_leaf_grad_across_calls():
    """PyTorch semantics (micrograd #53): .grad accumulates over backward() calls until zeroed."""
    a = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (a * 3.0).sum().backward()
    (a * a).sum().backward()  # a separate graph
    np.testing.assert_array_equal(a.grad, [3 + 2, 3 + 4])
    a.zero_grad()
    assert a.grad is None
    # the graph is freed after backward unless retain_graph=True
    b = Tensor(np.array(2.0), requires_grad=True)
    y = (b * b) * 1.0
    y.backward(retain_graph=True)
    y.backward()
    assert b.grad.item() == 8.0


def test_backward_errors_and_no_grad():
    x = Tensor(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        x.sum().backward()
    w = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"explicit grad .*\(3,\)"):
        (w * 2.0).backward()
    with no_grad():
        y = w * 2.0
    assert not y.requires_grad and y.is_leaf
    (w * 2.0).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(w.grad, [2.0, 4.0, 6.0])


def test_leaf_grads_are_owned_writable_arrays():
    """Add/Sum backward hand the same (read-only, broadcast) array to several inputs; each leaf must own its
    .grad, or an in-place update (clip_grad_norm_) raises or scales a shared array twice."""
    a = Tensor(np.ones((2, 2), np.float32), requires_grad=True)
    b = Tensor(np.ones((2, 2), np.float32), requires_grad=True)
    (a + b).sum().backward()
    assert a.grad is not b.grad and a.grad.flags.writeable and b.grad.flags.writeable
    norm = optim.clip_grad_norm_([a, b], max_norm=0.5)
    assert norm == pytest.approx(math.sqrt(8))
    np.testing.assert_allclose(a.grad, 0.5 / (math.sqrt(8) + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(b.grad, 0.5 / (math.sqrt(8) + 1e-6), rtol=1e-6)


def test_deep_graph_does_not_hit_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0 + 0.0
    y.backward()
    assert x.grad.item() == 1.0


# -------------------------------------------------------- 3. a wrong backward is caught


class WrongAtOneElement(Function):
    """out = a·b elementwise, but the gradient for b is doubled at element (1, 2)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        gb = g * self.a
        gb[1, 2] *= 2
        return g * self.b, gb


class DoubledGradient(Function):
    """out = x (times 1), backward returns 2g."""

    def forward(self, x):
        return x * 1

    def backward(self, g):
        return 2 * g


def test_gradcheck_catches_wrong_backward():
    a, b = t64((2, 3), 49), t64((2, 3), 50)
    with pytest.raises(AssertionError) as info:
        F.gradcheck(WrongAtOneElement.apply, [a, b])
    msg = str(info.value)
    assert "input 1" in msg and "(1, 2)" in msg and "1 of 6 elements off" in msg
    assert F.gradcheck(WrongAtOneElement.apply, [a, b], raise_on_fail=False) is False
    with pytest.raises(AssertionError, match=r"input 0 \(shape \(2, 3\)\)"):
        F.gradcheck(DoubledGradient.apply, [a])
    # and the correct op passes, so the check can tell the two apart
    assert F.gradcheck(F.mul, [a, b]) is True


# ------------------------------------------------------ 4. docs/bugs.md B08 at the op level


def test_masked_softmax_gives_zero_weight_and_finite_fully_masked_rows():
    expect = [0.2689414213699951, 0.7310585786300049, 0.0]
    x = Tensor(np.array([1.0, 2.0, 5.0]))
    y = F.softmax(F.masked_fill(x, np.array([False, False, True]), -np.inf))
    np.testing.assert_allclose(y.data, expect, rtol=0, atol=2e-16)
    # the same through attention: scores [1, 2, 5] with key 2 padded, v = identity -> output = weights
    q = Tensor(np.array([1.0, 0.0, 0.0]).reshape(1, 1, 1, 3))
    k = Tensor(np.array([[1.0, 0, 0], [2.0, 0, 0], [5.0, 0, 0]]).reshape(1, 1, 3, 3))
    v = Tensor(np.eye(3).reshape(1, 1, 3, 3))
    out = F.scaled_dot_product_attention(q, k, v, causal=False, key_padding_mask=np.array([[1, 1, 0]]), scale=1.0)
    np.testing.assert_allclose(out.data.reshape(-1), expect, rtol=0, atol=2e-16)


def test_softmax_does_not_overflow_on_large_logits():
    for dt in (np.float64, np.float32):
        y = F.softmax(Tensor(np.array([1000.0, 1001.0], dtype=dt)))
        assert y.dtype == dt and np.isfinite(y.data).all()
        np.testing.assert_allclose(y.data, [0.2689414213699951, 0.7310585786300049],
                                   rtol=2e-16 if dt == np.float64 else 1e-7)
        np.testing.assert_array_equal(F.log_softmax(Tensor(np.array([1000.0, 0.0], dtype=dt))).data, [0.0, -1000.0])
    x = Tensor(np.array([1000.0, 0.0]), requires_grad=True)
    F.log_softmax(x)[1].backward()
    assert np.isfinite(x.grad).all()
    np.testing.assert_allclose(x.grad, [-1.0, 1.0], atol=1e-300)


# --------------------------------------------------------------------- 5. dtype discipline


def _f32(shape, seed=0, low=None, high=None):
    r = np.random.default_rng(seed)
    a = r.standard_normal(shape) if low is None else r.uniform(low, high, shape)
    return Tensor(a.astype(np.float32), requires_grad=True)


DTYPE_CASES = {
    "mul_np_float64": lambda x, w, p: x * np.float64(2.0),
    "rmul_np_float64": lambda x, w, p: np.float64(2.0) * x,
    "py_scalars": lambda x, w, p: 0.5 * x + 1 - x / 3.0 + 2.0 / p - (-x),
    "np_float64_array": lambda x, w, p: x * np.ones((3, 4)) + np.full(4, 0.5),
    "int_array": lambda x, w, p: x + np.arange(4),
    "pow": lambda x, w, p: p ** 0.5 + p ** np.float64(2) + F.pow(p, x * 0.1),
    "matmul": lambda x, w, p: x @ w.T,
    "linear": lambda x, w, p: F.linear(x, w, w[:, 0]),
    "reductions": lambda x, w, p: x.sum(0) + x.mean(0) + x.max(0) + x.var(0) + F.var(x, 0, correction=1),
    "full_reductions": lambda x, w, p: x.sum() + x.mean() + x.max() + x.var(),
    "unary": lambda x, w, p: (F.exp(x) + F.log(p) + F.tanh(x) + F.sqrt(p) + F.relu(x) + F.gelu(x)
                              + F.sigmoid(x) + F.softplus(x) + F.logsigmoid(x)),
    "shape": lambda x, w, p: x.reshape(2, 6).T.reshape(3, 4).permute(1, 0).transpose(0, 1),
    "index": lambda x, w, p: x[1:, [0, 0, 2]] + x[np.array([0, 0]), 1:2],
    "gather": lambda x, w, p: F.gather(x, 1, np.array([[0, 0], [1, 3], [2, 2]])),
    "concat_stack_split": lambda x, w, p: F.concat(F.split(x, 2, 1), 0)[:2] + F.stack([x, p], 0).sum(0)[:2, :2],
    "where_masked_fill": lambda x, w, p: F.where(x.data > 0, x, 0.5) + F.masked_fill(p, p.data > 1, -1e9),
    "max_min_clip": lambda x, w, p: F.maximum(x, 0.1) + F.minimum(x, np.float64(0.2)) + F.clip(x, -0.5, 0.5),
    "embedding": lambda x, w, p: F.embedding(np.array([[0, 2, 2]]), x),
    "softmax": lambda x, w, p: F.softmax(x) + F.log_softmax(x, 0),
    "layer_norm": lambda x, w, p: F.layer_norm(x, p[0], x[0]),
    "dropout": lambda x, w, p: F.dropout(x, 0.3, np.random.default_rng(0)),
    "cross_entropy": lambda x, w, p: F.cross_entropy(x, np.array([1, -100, 3])),
    "cross_entropy_sum": lambda x, w, p: F.cross_entropy(x, np.array([1, -100, 3]), reduction="sum"),
    "cross_entropy_none": lambda x, w, p: F.cross_entropy(x, np.array([1, -100, 3]), reduction="none"),
    "attention": lambda x, w, p: F.scaled_dot_product_attention(
        x.reshape(1, 1, 3, 4), w[:3].reshape(1, 1, 3, 4), p.reshape(1, 1, 3, 4),
        key_padding_mask=np.array([[0, 1, 1]])),
}


@pytest.mark.parametrize("name", list(DTYPE_CASES))
def test_float32_in_float32_out(name):
    x, w, p = _f32((3, 4), 1), _f32((5, 4), 2), _f32((3, 4), 3, 0.5, 2.0)
    out = DTYPE_CASES[name](x, w, p)
    assert out.dtype == np.float32, f"{name}: output {out.dtype}"
    (out * Tensor(np.ones(out.shape, np.float32))).sum().backward()
    for nm, t in (("x", x), ("w", w), ("p", p)):
        if t.grad is not None:
            assert t.grad.dtype == np.float32, f"{name}: grad of {nm} is {t.grad.dtype}"
            assert t.grad.shape == t.shape


def test_tensor_construction_dtypes():
    assert Tensor([1.0, 2.0]).dtype == np.float32  # Python floats -> float32
    assert Tensor(1.5).dtype == np.float32
    assert Tensor(np.zeros(2)).dtype == np.float64  # existing arrays keep their dtype (gradcheck)
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor(np.zeros(2), dtype=np.float32).dtype == np.float32


# ------------------------------------------------------------------------- 6. nn.Module

TINY = dict(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=8)


def test_gpt_parameter_names():
    m = GPT(GPTConfig(**TINY))
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "transformer.h.0.attn.q_proj.weight" in names
    assert "transformer.h.1.mlp.c_proj.bias" in names
    assert names[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    block = [n[len("transformer.h.0."):] for n in names if n.startswith("transformer.h.0.")]
    attn = [f"attn.{p}_proj.{w}" for p in "qkvc" for w in ("weight", "bias")]
    assert block == ["ln_1.weight", "ln_1.bias"] + attn + [
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    assert len(names) == 2 + 2 * 16 + 2 and len(set(names)) == len(names)
    C, V, L = 8, 23, 12
    per_block = 2 * C + 4 * (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert m.num_parameters() == V * C + L * C + 2 * per_block + 2 * C


def test_tied_weights_counted_once():
    tied = GPT(GPTConfig(**TINY))
    untied = GPT(GPTConfig(**TINY, tie_weights=False))
    assert untied.num_parameters() - tied.num_parameters() == 23 * 8
    assert "lm_head.weight" in dict(untied.named_parameters())
    # share a Parameter between two modules by hand: listed once, under its first name
    untied.lm_head.weight = untied.transformer.wte.weight
    names = [n for n, _ in untied.named_parameters()]
    assert "lm_head.weight" not in names and names.count("transformer.wte.weight") == 1
    assert untied.num_parameters() == tied.num_parameters()
    assert list(untied.state_dict()) == names
    # the tied matrix gets both gradients (embedding rows + LM head) summed into one .grad
    ids = np.array([[1, 2, 3, 4]])
    _, loss = tied(ids, labels=ids)
    loss.backward()
    g = tied.transformer.wte.weight.grad
    assert g.shape == (23, 8) and np.abs(g[10:]).sum() > 0  # rows never looked up still get head gradient


def test_state_dict_round_trip():
    a, b = GPT(GPTConfig(**TINY), seed=1), GPT(GPTConfig(**TINY), seed=2)
    ids = np.array([[3, 1, 4, 1, 5]])
    assert not np.allclose(a(ids)[0].data, b(ids)[0].data)
    sd = a.state_dict()
    assert all(isinstance(k, str) for k in sd) and sd["transformer.wte.weight"].shape == (23, 8)
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a(ids)[0].data, b(ids)[0].data)
    # load copies: changing the source afterwards does not change b
    sd["transformer.wte.weight"][...] = 0
    assert np.abs(b.transformer.wte.weight.data).sum() > 0


def test_load_state_dict_errors_name_keys_and_shapes():
    m = GPT(GPTConfig(**TINY))
    sd = dict(m.state_dict())
    del sd["transformer.h.1.attn.k_proj.bias"]
    sd["transformer.h.0.attn.c_attn.weight"] = np.zeros((8, 24), np.float32)
    with pytest.raises(KeyError) as info:
        m.load_state_dict(sd, source="ckpt.safetensors")
    msg = str(info.value)
    assert "transformer.h.1.attn.k_proj.bias" in msg and "transformer.h.0.attn.c_attn.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "ckpt.safetensors" in msg
    sd = dict(m.state_dict())
    sd["transformer.wpe.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError) as info:
        m.load_state_dict(sd)
    assert "transformer.wpe.weight: checkpoint (16, 8) vs model (12, 8)" in str(info.value)
    # strict=False ignores unknown and missing keys, but never a shape mismatch
    sd = {"transformer.ln_f.bias": np.ones(8, np.float32), "extra": np.zeros(1)}
    m.load_state_dict(sd, strict=False)
    np.testing.assert_array_equal(m.transformer.ln_f.bias.data, 1.0)
    assert m.transformer.ln_f.bias.dtype == np.float32


def test_train_eval_toggles_dropout():
    cfg = GPTConfig(**TINY, dropout=0.5)
    m, ref = GPT(cfg, seed=3), GPT(GPTConfig(**TINY), seed=3)
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    assert m.training and all(mod.training for mod in m.modules())
    t1, t2 = m(ids)[0].data, m(ids)[0].data
    assert not np.allclose(t1, t2)  # fresh masks each call
    m.eval()
    assert not any(mod.training for mod in m.modules())
    e1, e2 = m(ids)[0].data, m(ids)[0].data
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(e1, ref(ids)[0].data, rtol=1e-6, atol=1e-7)  # eval == no dropout at all
    m.train()
    assert all(isinstance(d, Dropout) and d.training for d in m.modules() if isinstance(d, Dropout))


def test_requires_grad_false_freezes():
    m = GPT(GPTConfig(**TINY))
    m.transformer.wte.requires_grad_(False)
    m.transformer.h[0].requires_grad_(False)
    ids = np.array([[1, 2, 3, 4]])
    _, loss = m(ids, labels=ids)
    loss.backward()
    for name, p in m.named_parameters():
        frozen = name.startswith("transformer.wte.") or name.startswith("transformer.h.0.")
        assert (p.grad is None) == frozen, name
    assert m.num_parameters(trainable_only=True) == m.num_parameters() - 23 * 8 - sum(
        p.size for p in m.transformer.h[0].parameters())
    groups = optim.weight_decay_groups(m.named_parameters(), 0.1)
    assert all(p.requires_grad for g in groups for p in g["params"])
    m.requires_grad_(False)
    _, loss = m(ids, labels=ids)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError):
        loss.backward()


def test_module_buffers_in_state_dict():
    class WithBuffer(Module):
        def __init__(self):
            super().__init__()
            self.lin = Linear(3, 2, rng=np.random.default_rng(0))
            self.register_buffer("scale", np.full(2, 0.5, np.float32))

    m = WithBuffer()
    assert list(m.state_dict()) == ["lin.weight", "lin.bias", "scale"]
    sd = {k: np.asarray(v).copy() for k, v in m.state_dict().items()}
    sd["scale"][:] = 2.0
    m.load_state_dict(sd)
    np.testing.assert_array_equal(m.scale, [2.0, 2.0])
    assert isinstance(m.lin.weight, Parameter) and m.lin.weight.shape == (2, 3)


# -------------------------------------------------------------------------------- 7. optim


def adamw_reference(p, grads, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch.optim.AdamW's single-tensor algorithm (torch/optim/adamw.py), transcribed in float64."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = betas
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        p *= 1 - lr * weight_decay
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        p -= (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p


def test_adamw_matches_reference_transcription():
    r = np.random.default_rng(0)
    W = Parameter(r.standard_normal((4, 3)).astype(np.float32))
    b = Parameter(r.standard_normal(3).astype(np.float32))
    W0, b0 = W.data.copy(), b.data.copy()
    groups = optim.weight_decay_groups([("W", W), ("b", b)], weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["weight_decay"] == 0.0
    opt = optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    gW = [r.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    gb = [r.standard_normal(3).astype(np.float32) * 1e-3 for _ in range(4)]
    lrs = [optim.cosine_lr(s, 4, 1e-2, warmup_steps=1) for s in range(4)]
    for s in range(4):
        optim.set_lr(opt, lrs[s])
        W.grad, b.grad = gW[s].copy(), gb[s].copy()
        opt.step()
    assert W.dtype == np.float32 and b.dtype == np.float32
    W_ref = adamw_reference(W0, gW, lrs, (0.9, 0.95), weight_decay=0.1)
    b_ref = adamw_reference(b0, gb, lrs, (0.9, 0.95), weight_decay=0.0)
    np.testing.assert_allclose(W.data, W_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.data, b_ref, rtol=1e-6, atol=1e-7)
    assert np.abs(W_ref - W0).min() > 1e-4  # the parameters did move
    # the first step moves every coordinate by ~lr (Adam's normalised update), whatever the gradient scale
    p = Parameter(np.zeros(3, np.float32))
    p.grad = np.array([1e-4, 1.0, -50.0], np.float32)
    optim.AdamW([p], lr=0.1, weight_decay=0.0).step()
    np.testing.assert_allclose(p.data, [-0.1 * 1e-4 / (1e-4 + 1e-8), -0.1, 0.1], rtol=1e-6)  # eps matters at 1e-4
    assert opt.state[0]["step"] == 4


def test_adamw_skips_params_without_grad_and_state_dict_round_trip():
    a, b = Parameter(np.ones(2, np.float32)), Parameter(np.ones(2, np.float32))
    opt = optim.AdamW([a, b], lr=0.1)
    a.grad = np.ones(2, np.float32)
    opt.step()
    np.testing.assert_array_equal(b.data, 1.0)
    assert 1 not in opt.state
    sd = opt.state_dict()
    opt2 = optim.AdamW([Parameter(a.data.copy()), Parameter(b.data.copy())], lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.state[0]["step"] == 1
    np.testing.assert_array_equal(opt2.state[0]["exp_avg"], opt.state[0]["exp_avg"])
    with pytest.raises(ValueError, match="parameter groups"):
        optim.AdamW([a], lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="invalid"):
        optim.AdamW([a], lr=-1.0)


def test_weight_decay_groups_no_decay_on_1d():
    m = GPT(GPTConfig(**TINY))
    groups = optim.weight_decay_groups(m.named_parameters(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    named = dict(m.named_parameters())
    ids = {id(p) for p in no_decay["params"]}
    assert id(named["transformer.h.0.ln_1.weight"]) in ids and id(named["transformer.h.0.attn.q_proj.bias"]) in ids
    assert id(named["transformer.wte.weight"]) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_cosine_lr_values():
    peak, lr = 1e-3, optim.cosine_lr
    assert lr(0, 100, peak, warmup_steps=10) == pytest.approx(1e-4)  # step 0 gets peak/warmup, not 0
    assert lr(4, 100, peak, warmup_steps=10) == pytest.approx(5e-4)
    assert lr(9, 100, peak, warmup_steps=10) == pytest.approx(peak)
    assert lr(10, 100, peak, warmup_steps=10) == pytest.approx(peak)  # peak at the end of warmup
    assert lr(55, 100, peak, warmup_steps=10) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down
    assert lr(100, 100, peak, warmup_steps=10) == pytest.approx(1e-4)  # min_lr_ratio 0.1
    assert lr(500, 100, peak, warmup_steps=10) == pytest.approx(1e-4)
    assert lr(100, 100, peak, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-18)
    assert lr(0, 100, peak) == pytest.approx(peak)
    vals = [lr(s, 100, peak, warmup_steps=10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_clip_grad_norm():
    a, b = Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(1, np.float32))
    a.grad, b.grad = np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)
    norm = optim.clip_grad_norm_([a, b], max_norm=100.0)
    assert norm == pytest.approx(13.0)
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])  # under the limit: untouched
    norm = optim.clip_grad_norm_([a, b], max_norm=1.0)
    assert norm == pytest.approx(13.0)  # the pre-clip norm
    new = math.sqrt(float((a.grad.astype(np.float64) ** 2).sum() + (b.grad.astype(np.float64) ** 2).sum()))
    assert new == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(a.grad, [3 / 13, 4 / 13], rtol=1e-6)
    assert a.grad.dtype == np.float32
    assert optim.clip_grad_norm_([Parameter(np.zeros(1, np.float32))], 1.0) == 0.0


def test_gradient_accumulation_divides_by_all_tokens_not_per_micro_batch():
    per_token = Parameter(np.array([1.0, 3.0] + [0.5] * 6, np.float32))
    micro = [np.array([0, 1]), np.array([2, 3, 4, 5, 6, 7])]
    loss, n = accumulate_gradients(micro, lambda idx: per_token[idx].sum(), len)
    assert n == 8
    assert loss == pytest.approx(0.875)  # the buggy mean of means gives 1.25
    np.testing.assert_allclose(per_token.grad, np.full(8, 1 / 8), rtol=1e-7)  # not 0.25 / 0.0833
    # the logged loss does not depend on how the window is split
    per_token.grad = None
    loss4, _ = accumulate_gradients([np.array([i, i + 1]) for i in range(0, 8, 2)],
                                          lambda idx: per_token[idx].sum(), len)
    assert loss4 == pytest.approx(0.875)
    np.testing.assert_allclose(per_token.grad, np.full(8, 1 / 8), rtol=1e-7)
    # a window without supervised tokens: (0.0, 0), gradients untouched, no NaN
    per_token.grad = None
    assert accumulate_gradients([np.array([], int)], lambda idx: per_token[idx].sum(), len) == (0.0, 0)
    assert per_token.grad is None


def test_accumulated_gpt_gradient_equals_the_big_batch():
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=8)
    big, acc = GPT(cfg, seed=4), GPT(cfg, seed=4)
    r = np.random.default_rng(5)
    ids = r.integers(0, 17, (3, 6))
    labels = ids.copy()
    labels[0, 3:] = -100  # ragged: 2, 5 and 1 supervised targets after the shift
    labels[2, :4] = -100
    labels[2, 5] = -100
    labels[2, 4] = ids[2, 4]
    n_per_row = (shift_labels(labels) != -100).sum(axis=1)
    assert n_per_row.tolist() == [2, 5, 1]
    _, loss = big(ids, labels=labels)
    loss.backward()

    def loss_sum(i):
        logits, _ = acc(ids[i:i + 1])
        return F.cross_entropy(logits, shift_labels(labels[i:i + 1]), reduction="sum")

    acc_loss, n = accumulate_gradients([0, 1, 2], loss_sum, lambda i: int(n_per_row[i]))
    assert n == 8
    assert acc_loss == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), (_, q) in zip(big.named_parameters(), acc.named_parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------------ 8. cross-checks

CROSS = dict(rtol=1e-5, atol=1e-6)


def _both(torch, *arrays):
    """minillm float32 leaves and torch float32 leaves holding the same values."""
    ours = [Tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    return ours, theirs


def _compare_op(torch, ours_fn, torch_fn, *arrays, rtol=1e-5, atol=1e-6):
    ours, theirs = _both(torch, *arrays)
    y, yt = ours_fn(*ours), torch_fn(*theirs)
    assert y.dtype == np.float32 and tuple(y.shape) == tuple(yt.shape)
    np.testing.assert_allclose(y.data, yt.detach().numpy(), rtol=rtol, atol=atol)
    R = np.random.default_rng(99).standard_normal(y.shape).astype(np.float32)
    (y * Tensor(R)).sum().backward()
    (yt * torch.tensor(R)).sum().backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b.grad is None:
            assert a.grad is None or not a.grad.any()
            continue
        assert a.grad.dtype == np.float32
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"input {i}")


def _rand(shape, seed, low=None, high=None):
    r = np.random.default_rng(seed)
    return r.standard_normal(shape) if low is None else r.uniform(low, high, shape)


@pytest.mark.crosscheck
def test_crosscheck_elementwise_and_matmul(torch):
    tf = torch.nn.functional
    for sa, sb in BROADCAST_SHAPES:
        a, b = _rand(sa, 1), _rand(sb, 2, 0.5, 1.5)
        _compare_op(torch, F.add, torch.add, a, b)
        _compare_op(torch, F.sub, torch.sub, a, b)
        _compare_op(torch, F.mul, torch.mul, a, b)
        _compare_op(torch, F.div, torch.div, a, b)
        _compare_op(torch, F.maximum, torch.maximum, a, b + 0.05)
        _compare_op(torch, F.minimum, torch.minimum, a, b + 0.05)
    _compare_op(torch, F.pow, torch.pow, _rand((3, 4), 3, 0.5, 2), _rand((4,), 4, -1, 2))
    _compare_op(torch, lambda x: x ** 1.5, lambda x: x ** 1.5, _rand((3, 4), 3, 0.5, 2))
    for sa, sb in MATMUL_SHAPES:
        _compare_op(torch, F.matmul, torch.matmul, _rand(sa, 5), _rand(sb, 6))
    x, w, b = _rand((2, 3, 4), 7), _rand((5, 4), 8), _rand((5,), 9)
    _compare_op(torch, F.linear, tf.linear, x, w, b)
    _compare_op(torch, F.linear, tf.linear, x, w)
    _compare_op(torch, lambda x: F.clip(x, -0.5, 0.5), lambda x: torch.clamp(x, -0.5, 0.5), _rand((3, 4), 10))
    cond = _rand((3, 4), 11) > 0
    _compare_op(torch, lambda a, b: F.where(cond, a, b), lambda a, b: torch.where(torch.tensor(cond), a, b),
                _rand((3, 4), 12), _rand((4,), 13))


@pytest.mark.crosscheck
def test_crosscheck_reductions_unary_shape(torch):
    tf = torch.nn.functional
    x = _rand((2, 3, 4), 14)
    for axis, keepdims in REDUCE_AXES:
        dim = tuple(range(3)) if axis is None else axis
        _compare_op(torch, lambda t: F.sum(t, axis, keepdims), lambda t: torch.sum(t, dim=dim, keepdim=keepdims), x)
        _compare_op(torch, lambda t: F.mean(t, axis, keepdims), lambda t: torch.mean(t, dim=dim, keepdim=keepdims), x)
        _compare_op(torch, lambda t: F.max(t, axis, keepdims), lambda t: torch.amax(t, dim=dim, keepdim=keepdims), x)
        _compare_op(torch, lambda t: F.var(t, axis, keepdims, correction=1),
                    lambda t: torch.var(t, dim=dim, keepdim=keepdims, correction=1), x)
    pos = _rand((3, 4), 15, 0.2, 3.0)
    xs = _rand((3, 4), 16) * 3
    pairs = [(F.neg, torch.neg, xs), (F.exp, torch.exp, xs), (F.log, torch.log, pos), (F.tanh, torch.tanh, xs), (F.sqrt, torch.sqrt, pos),
             (F.relu, torch.relu, xs), (F.gelu, lambda t: tf.gelu(t, approximate="tanh"), xs),
             (F.sigmoid, torch.sigmoid, xs), (F.softplus, tf.softplus, xs), (F.logsigmoid, tf.logsigmoid, xs),
             (lambda t: F.softmax(t, -1), lambda t: torch.softmax(t, -1), xs),
             (lambda t: F.softmax(t, 0), lambda t: torch.softmax(t, 0), xs),
             (lambda t: F.log_softmax(t, -1), lambda t: torch.log_softmax(t, -1), xs),
             (lambda t: t.reshape(4, 3).T.permute(1, 0)[1:, ::2], lambda t: t.reshape(4, 3).T.permute(1, 0)[1:, ::2],
              xs),
             (lambda t: t[np.array([0, 2, 0])], lambda t: t[torch.tensor([0, 2, 0])], xs)]
    for ours, theirs, arr in pairs:
        _compare_op(torch, ours, theirs, arr)
    idx = np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])
    _compare_op(torch, lambda t: F.gather(t, 1, idx), lambda t: torch.gather(t, 1, torch.tensor(idx)), xs)
    ids = np.array([[1, 1, 4], [0, 1, 1]])
    _compare_op(torch, lambda w: F.embedding(ids, w), lambda w: tf.embedding(torch.tensor(ids), w), _rand((5, 3), 17))
    _compare_op(torch, lambda a, b: F.concat([a, b], 1), lambda a, b: torch.cat([a, b], 1),
                _rand((2, 3), 18), _rand((2, 2), 19))
    _compare_op(torch, lambda a, b: F.stack([a, b], -1), lambda a, b: torch.stack([a, b], -1),
                _rand((2, 3), 18), _rand((2, 3), 19))


@pytest.mark.crosscheck
def test_crosscheck_layer_norm_cross_entropy(torch):
    tf = torch.nn.functional
    _compare_op(torch, F.layer_norm, lambda x, w, b: tf.layer_norm(x, (6,), w, b, eps=1e-5),
                _rand((2, 3, 6), 20) * 2 + 1, _rand((6,), 21), _rand((6,), 22))
    targets = np.array([[1, -100, 4, 2], [4, 0, -100, -100]])
    tt = torch.tensor(targets)
    logits = _rand((2, 4, 5), 23) * 3
    for red in ("mean", "sum", "none"):
        _compare_op(torch, lambda z: F.cross_entropy(z, targets, reduction=red),
                    lambda z: tf.cross_entropy(z.reshape(-1, 5), tt.reshape(-1), ignore_index=-100,
                                               reduction=red).reshape(() if red != "none" else (2, 4)), logits)


@pytest.mark.crosscheck
def test_crosscheck_attention(torch):
    tf = torch.nn.functional
    B, H, T, D = 2, 2, 5, 4
    q, k, v = _rand((B, H, T, D), 24), _rand((B, H, T, D), 25), _rand((B, H, T, D), 26)
    _compare_op(torch, F.scaled_dot_product_attention, lambda q, k, v: tf.scaled_dot_product_attention(
        q, k, v, is_causal=True), q, k, v)
    _compare_op(torch, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
                lambda q, k, v: tf.scaled_dot_product_attention(q, k, v), q, k, v)
    # KV cache: 2 new queries against 5 keys; torch's is_causal aligns top-left, so pass the mask explicitly
    offset = torch.tensor(np.tril(np.ones((2, T), bool), k=T - 2))
    _compare_op(torch, F.scaled_dot_product_attention,
                lambda q, k, v: tf.scaled_dot_product_attention(q, k, v, attn_mask=offset), q[:, :, 3:], k, v)
    # right padding (every query still sees a real key) as a boolean attn_mask
    kpm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = torch.tensor(np.tril(np.ones((T, T), bool))[None, None] & kpm.astype(bool)[:, None, None, :])
    _compare_op(torch, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm),
                lambda q, k, v: tf.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)


def _hf_gpt2_twin(torch, model: GPT):
    """transformers' GPT2LMHeadModel holding model's weights (q, k, v fused into Conv1D c_attn (in, out))."""
    from conftest import require

    transformers = require("transformers")
    c = model.config
    hf_cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                     n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = {k: np.asarray(v) for k, v in model.state_dict().items()}
    new = {}
    for name in ours:
        if ".attn.q_proj." in name or ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        arr = ours[name]
        if name.endswith(("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            arr = arr.T  # Conv1D stores (in, out)
        new[name] = arr
    for i in range(c.n_layer):
        p = f"transformer.h.{i}.attn."
        new[p + "c_attn.weight"] = np.concatenate([ours[p + f"{x}_proj.weight"] for x in "qkv"], axis=0).T
        new[p + "c_attn.bias"] = np.concatenate([ours[p + f"{x}_proj.bias"] for x in "qkv"], axis=0)
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, arr in new.items():
            assert tuple(hf_params[name].shape) == arr.shape, name
            hf_params[name].copy_(torch.tensor(np.ascontiguousarray(arr)))
    assert set(hf_params) == set(new), set(hf_params) ^ set(new)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied like ours
    return hf


@pytest.mark.crosscheck
def test_crosscheck_gpt_against_transformers_gpt2(torch):
    cfg = GPTConfig(vocab_size=31, block_size=10, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, seed=6)
    r = np.random.default_rng(7)
    for _, p in model.named_parameters():  # move biases / LayerNorm off their trivial init
        p.data = (p.data + r.normal(0, 0.1, p.shape)).astype(np.float32)
    hf = _hf_gpt2_twin(torch, model)
    ids = r.integers(0, 31, (2, 7))
    labels = ids.copy()
    labels[0, :3] = -100
    labels[1, 5:] = -100
    logits, loss = model(ids, labels=labels)
    out = hf(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
    np.testing.assert_allclose(logits.data, out.logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    loss.backward()
    out.loss.backward()
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    ours = {n: p.grad for n, p in model.named_parameters()}
    for name, g in ours.items():
        if ".attn.q_proj." in name or ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        ref = hf_grads[name].T if name.endswith(("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")) \
            else hf_grads[name]
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=name)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}.attn."
        fused_w = np.concatenate([ours[p + f"{x}_proj.weight"] for x in "qkv"], axis=0).T
        fused_b = np.concatenate([ours[p + f"{x}_proj.bias"] for x in "qkv"], axis=0)
        for got, ref, nm in ((fused_w, hf_grads[p + "c_attn.weight"], "c_attn.weight"),
                             (fused_b, hf_grads[p + "c_attn.bias"], "c_attn.bias")):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=p + nm)


@pytest.mark.crosscheck
def test_crosscheck_adamw_against_torch(torch):
    r = np.random.default_rng(8)
    shapes = [(4, 3), (3,), (2, 2), (5,)]
    init = [r.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[r.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    ours = [(f"p{i}", Parameter(a.copy())) for i, a in enumerate(init)]
    theirs = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    opt = optim.AdamW(optim.weight_decay_groups(ours, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    topt = torch.optim.AdamW([{"params": [theirs[0], theirs[2]], "weight_decay": 0.1},
                              {"params": [theirs[1], theirs[3]], "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        lr = optim.cosine_lr(step, 3, 3e-3, warmup_steps=1)
        optim.set_lr(opt, lr)
        for g in topt.param_groups:
            g["lr"] = lr
        for (_, p), tp, g in zip(ours, theirs, grads[step]):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    for (name, p), tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    i = 0  # exp_avg / exp_avg_sq state equal too
    for g in opt.param_groups:
        for p in g["params"]:
            tp = theirs[[id(q) for _, q in ours].index(id(p))]
            np.testing.assert_allclose(opt.state[i]["exp_avg"], topt.state[tp]["exp_avg"].numpy(), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(opt.state[i]["exp_avg_sq"], topt.state[tp]["exp_avg_sq"].numpy(), rtol=1e-5,
                                       atol=1e-10)
            i += 1
