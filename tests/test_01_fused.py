"""Chapter 01: the C++ twins of the non-GEMM ops (minillm._fused) equal their NumPy references.

Each op runs twice through its public function — once with ``MINILLM_KERNELS=numpy`` (the NumPy
reference in functional.py / optim.py) and once with the C++ twin — on float32 inputs of odd
shapes, and the outputs and every input gradient must agree to float32 rounding (AdamW: bit for
bit). A subprocess checks that with ``MINILLM_NO_EXTENSIONS=1`` the extension is ignored and the
chapter's op tests still pass on the pure NumPy path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm import fused
from minillm import functional as F
from minillm import optim
from minillm.model import GPT, GPTConfig
from minillm.tensor import Tensor

ROOT = Path(__file__).resolve().parents[1]

needs_fused = pytest.mark.skipif(not fused.available(), reason=f"C++ twins not built: {fused.unavailable_reason()}")
RTOL, ATOL = 2e-5, 2e-6


def _run(fn, arrays, mode, monkeypatch, seed=1):
    """Forward fn on float32 tensors made from ``arrays``, backward a fixed random projection;
    returns (output, [grad of each input]) as float32 arrays, with MINILLM_KERNELS=mode."""
    monkeypatch.setenv("MINILLM_KERNELS", mode)
    xs = [Tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    out = fn(*xs)
    r = np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32)
    (out * Tensor(r)).sum().backward()
    assert out.dtype == np.float32
    for x in xs:
        assert x.grad.dtype == np.float32, x.grad.dtype
    return out.data, [x.grad for x in xs]


def _same(fn, arrays, monkeypatch, rtol=RTOL, atol=ATOL):
    ref, ref_g = _run(fn, arrays, "numpy", monkeypatch)
    got, got_g = _run(fn, arrays, "cpp", monkeypatch)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg="forward")
    for i, (a, b) in enumerate(zip(got_g, ref_g)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=f"grad of input {i}")


@needs_fused
@pytest.mark.parametrize("shape", [(7,), (3, 5, 33), (2, 70001)])
def test_fused_gelu_equals_numpy(shape, monkeypatch, rng):
    x = rng.standard_normal(shape) * 3
    _same(F.gelu, [x], monkeypatch)


@needs_fused
def test_fused_gelu_extreme_inputs_stay_finite(monkeypatch):
    x = np.array([-1e4, -50, -9, -1e-6, 0, 1e-6, 9, 50, 1e4])
    out, (g,) = _run(F.gelu, [x], "cpp", monkeypatch)
    ref, (gr,) = _run(F.gelu, [x], "numpy", monkeypatch)
    assert np.isfinite(out).all() and np.isfinite(g).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-6)


@needs_fused
@pytest.mark.parametrize("shape", [(1, 3), (5, 7, 37), (300, 256)])
def test_fused_layer_norm_equals_numpy(shape, monkeypatch, rng):
    C = shape[-1]
    x = rng.standard_normal(shape) * 2 + 0.5
    w = rng.standard_normal(C)
    b = rng.standard_normal(C)
    _same(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b], monkeypatch, rtol=1e-4, atol=1e-5)


@needs_fused
@pytest.mark.parametrize("shape", [(1,), (3, 11), (4, 5, 129)])
def test_fused_softmax_equals_numpy(shape, monkeypatch, rng):
    x = rng.standard_normal(shape) * 4
    _same(lambda x: F.softmax(x, axis=-1), [x], monkeypatch)


@needs_fused
def test_fused_softmax_over_other_axis_uses_reference_and_agrees(monkeypatch, rng):
    x = rng.standard_normal((4, 6, 3))
    _same(lambda x: F.softmax(x, axis=1), [x], monkeypatch)


@needs_fused
@pytest.mark.parametrize("Tq,Tk,causal,padded", [(5, 5, True, False), (3, 9, True, True), (1, 7, True, False),
                                                 (6, 6, False, True), (4, 4, False, False)])
def test_fused_attention_equals_numpy(Tq, Tk, causal, padded, monkeypatch, rng):
    B, H, D = 2, 3, 5
    q, k, v = (rng.standard_normal(s) for s in [(B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)])
    kpm = None
    if padded:
        kpm = np.ones((B, Tk), dtype=bool)
        kpm[0, : Tk // 2] = False  # left padding in row 0
        kpm[1, :] = False  # row 1: no visible key at all (finite uniform rows, no gradient)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, key_padding_mask=kpm)  # noqa: E731
    _same(fn, [q, k, v], monkeypatch)


@needs_fused
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_cross_entropy_equals_numpy(reduction, monkeypatch, rng):
    N, V = 37, 61
    logits = rng.standard_normal((N, V)) * 5
    t = rng.integers(0, V, N)
    t[[0, 5, 6]] = -100
    _same(lambda z: F.cross_entropy(z, t, reduction=reduction), [logits], monkeypatch)


@needs_fused
def test_fused_cross_entropy_on_a_non_contiguous_view_and_bad_target(monkeypatch, rng):
    logits = rng.standard_normal((3, 9, 17))
    t = rng.integers(0, 17, (3, 8))
    _same(lambda z: F.cross_entropy(z[:, :-1], t), [logits], monkeypatch)
    monkeypatch.setenv("MINILLM_KERNELS", "cpp")
    with pytest.raises(IndexError, match="out of range"):
        F.cross_entropy(Tensor(logits[:, :-1].astype(np.float32)), np.full((3, 8), 17))


@needs_fused
def test_fused_adamw_update_is_bit_identical(monkeypatch, rng):
    shape = (13, 71)
    p0, m0 = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32) * 0.1
    v0 = np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.01
    g = rng.standard_normal(shape).astype(np.float32)
    results = {}
    for mode in ("numpy", "cpp"):
        monkeypatch.setenv("MINILLM_KERNELS", mode)
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        for step in (1, 2, 3):
            optim.adamw_update(p, g, m, v, step, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        assert p.dtype == m.dtype == v.dtype == np.float32
        results[mode] = (p, m, v)
    for a, b in zip(results["cpp"], results["numpy"]):
        np.testing.assert_array_equal(a, b)


@needs_fused
def test_fused_gpt_step_matches_numpy_step(monkeypatch):
    cfg = GPTConfig(vocab_size=67, block_size=19, n_layer=2, n_head=3, n_embd=24)
    ids = np.random.default_rng(0).integers(0, 67, (3, 19))
    mask = np.ones((3, 19), dtype=np.int64)
    mask[1, :4] = 0
    out = {}
    for mode in ("numpy", "cpp"):
        monkeypatch.setenv("MINILLM_KERNELS", mode)
        model = GPT(cfg, seed=0)
        opt = optim.AdamW(model.parameters(), lr=1e-3)
        _, loss = model(ids, labels=ids, attention_mask=mask)
        loss.backward()
        grads = [p.grad.copy() for p in model.parameters()]
        opt.step()
        out[mode] = (loss.item(), grads, [p.data.copy() for p in model.parameters()])
    assert out["cpp"][0] == pytest.approx(out["numpy"][0], rel=1e-5)
    for a, b in zip(out["cpp"][1], out["numpy"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    for a, b in zip(out["cpp"][2], out["numpy"][2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kernels_cpp_forced_without_extension_raises(monkeypatch):
    monkeypatch.setattr(fused, "_F", None)
    monkeypatch.setenv("MINILLM_KERNELS", "cpp")
    with pytest.raises(RuntimeError, match="_fused"):
        F.gelu(Tensor(np.ones(3, dtype=np.float32)))
    monkeypatch.setenv("MINILLM_KERNELS", "auto")
    assert F.gelu(Tensor(np.ones(3, dtype=np.float32))).dtype == np.float32  # falls back to NumPy


def test_no_extensions_env_runs_chapter_01_ops_on_numpy():
    env = {**os.environ, "MINILLM_NO_EXTENSIONS": "1", "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", "from minillm import fused; print(fused.available())"],
                           env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr
    ops = "gelu or layer_norm or softmax or cross_entropy or attention or adamw"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", ops,
                          str(ROOT / "tests" / "test_01_autograd.py")],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


# ------------------------------------------------------------------ threads and the step's FLOPs


def test_step_flops_of_the_reference_config():
    from minillm.bench import step_flops

    f = step_flops()
    # 6 · 2048 tokens · (4 layers · 12 · 256² + 512 · 256) = 40.27 GFLOP in the Linear layers and the
    # LM head; attention's Q·Kᵀ and P·V: 3 · 4 layers · 2 · 2 · 16 · 128² · 256 = 3.22 GFLOP.
    assert f["matmul_linear"] == pytest.approx(6 * 2048 * (4 * 12 * 256 ** 2 + 512 * 256) / 1e9, rel=1e-4)
    assert f["matmul_attention"] == pytest.approx(3 * 4 * 4 * 16 * 128 ** 2 * 256 / 1e9, rel=1e-4)
    assert 0 < f["rest_estimate"] < 0.05 * f["matmul"]
    assert f["total"] == pytest.approx(f["matmul"] + f["rest_estimate"], abs=2e-3)


def test_thread_policy_reads_the_environment(monkeypatch):
    from minillm import threads

    for name in ("MINILLM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MINILLM_THREADS", "3")
    assert threads.choose("train") == 3 and threads.choose("generate") == 3
    monkeypatch.setenv("MINILLM_THREADS", "auto")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert threads.choose("generate") == 1
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.2: 2.0)  # a quiet machine
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.choose("train") == 2  # auto beats the BLAS pin
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.2: 0.9)  # another process holds a core
    assert threads.choose("train") == 1
    monkeypatch.delenv("MINILLM_THREADS")
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.2: 2.0)
    assert threads.choose("train") == 1  # OPENBLAS_NUM_THREADS=1 honoured when MINILLM_THREADS is unset
    monkeypatch.setenv("MINILLM_THREADS", "0")
    with pytest.raises(ValueError, match="MINILLM_THREADS"):
        threads.choose("train")
    with pytest.raises(ValueError, match="phase"):
        threads.phase("eval").__enter__()


def test_idle_cores_counts_this_processs_own_cpu_time_as_idle(monkeypatch):
    """Right after a BLAS phase this process's spinning worker threads must not read as another
    process's load (they made the pipeline train half its stages on one thread)."""
    import types

    from minillm import threads

    # /proc/stat over the window: 2 CPUs, 100 jiffies in all, 50 idle -> 1.0 core idle machine-wide,
    # of which this process used 0.6 of a core (0.12 CPU-s in 0.2 s) -> 1.6 cores not used by others
    stat = iter([(0.0, 0.0), (50.0, 100.0)])
    clock = {"cpu": 0.0, "wall": 0.0}

    def sleep(s):
        clock["cpu"] += 0.6 * s
        clock["wall"] += s

    fake_time = types.SimpleNamespace(sleep=sleep, process_time=lambda: clock["cpu"],
                                      perf_counter=lambda: clock["wall"])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(stat))
    monkeypatch.setattr(threads, "time", fake_time)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.idle_cores(0.2) == pytest.approx(1.6)
    stat = iter([(0.0, 0.0), (100.0, 100.0)])  # all idle and this process idle too: capped at the cores
    clock["cpu"] = 0.0
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(stat))
    assert threads.idle_cores(0.2) == pytest.approx(2.0)


def test_thread_limit_sets_and_restores_blas_and_leaves_fused_on_one_thread():
    from minillm import threads

    before = threads.limits()
    with threads.limit(2) as n:
        assert n == 2
        inside = threads.limits()
        assert inside["fused"] == before["fused"] == 1
        if inside["blas"] is not None:
            assert inside["blas"] == 2
    assert threads.limits() == before


def test_thread_limit_holds_the_nf4_twins_openmp_team_at_one_and_restores_it():
    from minillm import kernels, threads

    if kernels._C is None or threads.limits()["openmp"] is None:
        pytest.skip("the NF4 C++ twin was built without OpenMP or is not installed")
    with threads._tpc.threadpool_limits(limits=2, user_api="openmp"):  # OpenMP's default on 2 cores
        for n in (1, 2):
            with threads.limit(n):
                assert kernels._C.num_threads() == 1  # the team the 4-bit matmul runs with
                assert threads.limits()["openmp"] == 1 and threads.limits()["blas"] in (n, None)
            assert kernels._C.num_threads() == 2  # restored after the phase


def test_gemm_probe_covers_exactly_the_linear_flops_of_a_step():
    from minillm.bench import _gemm_shapes, step_flops

    total = sum(2 * M * K * N * count for M, K, N, count in _gemm_shapes())
    assert total / 1e9 == pytest.approx(step_flops()["matmul_linear"], rel=1e-4)


def test_generate_runs_on_one_thread_while_training_may_take_two(monkeypatch):
    from minillm import threads

    for name in ("MINILLM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.2: 2.0)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    seen = []
    real_limit = threads.limit

    def spy(n):
        seen.append(n)
        return real_limit(n)

    monkeypatch.setattr(threads, "limit", spy)
    model = GPT(GPTConfig(vocab_size=31, block_size=12, n_layer=1, n_head=2, n_embd=8), seed=0)
    with threads.phase("train") as n_train:
        out = model.generate(np.array([[1, 2]]), max_new_tokens=3, temperature=0)
    assert n_train == 2 and seen == [2, 1]
    assert out.new_tokens.shape == (1, 3)


@needs_fused
def test_fused_embedding_backward_equals_numpy_with_repeated_and_negative_ids(monkeypatch, rng):
    V, C = 11, 7
    w = rng.standard_normal((V, C))
    ids = np.array([[3, 3, 0, 10], [3, 5, 10, 1]])
    _same(lambda w: F.embedding(ids, w), [w], monkeypatch)
    x = rng.standard_normal((V, C))
    rows = np.array([-1, 2, 2, -11, 4])  # fancy indexing with negatives and repeats: Index.backward
    _same(lambda x: x[rows], [x], monkeypatch)


def test_bench_rejects_a_bad_thread_list(capsys, monkeypatch):
    from minillm import cli

    monkeypatch.setenv("MINILLM_THREADS", "1")
    assert cli.main(["bench", "train-step", "--threads", "0,2"]) == 1
    assert "--threads must be positive integers" in capsys.readouterr().err
