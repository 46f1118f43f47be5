"""Speed and memory benchmarks, printed as JSON, side by side with PyTorch where it is installed.

Scope
    ``minillm bench generate``: tokens/s of greedy generation of 256 new tokens with and without
    the KV cache, and their ratio, at each thread count of ``--threads``. ``minillm bench
    train-step``: one training step (forward + backward + AdamW) of the reference config
    (n_layer=4, n_embd=256, n_head=4, block_size=128, batch 16, vocab 512) against its own
    ceiling: the step's FLOPs from the config (``step_flops``: matrix products and the rest), the
    machine's float32 GEMM rate on the step's shapes at the same thread count (``gemm_rate``), and
    their ratio, the model FLOPs utilisation (MFU); beside it the same architecture in PyTorch eager
    on the CPU at the same threads. For each thread count of ``--threads`` (default ``1,2,default``;
    ``default`` = each side unconfigured: minillm's thread policy, PyTorch's own default) the
    minillm step, the PyTorch step and a GEMM probe alternate for ``--repeats`` rounds; min and
    median of wall-clock and process-CPU seconds, the ratio minillm / PyTorch, the MFU, peak
    resident memory, and how busy the machine was before and after (a ``note`` marks a measurement
    taken under load). ``--profile`` adds where minillm's time goes (by function, from cProfile).
    ``minillm bench quant`` and ``minillm bench kernel``: the NF4 quantization and kernel
    benchmarks. Speed targets are measured here, never asserted by timed tests; the measurements
    behind the defaults are in docs/performance.md.

Sources
    PyTorch eager ``nn.Linear``/``F.scaled_dot_product_attention``/``torch.optim.AdamW`` as the
    reference; model FLOPs utilisation as in Chowdhery et al. 2022 (PaLM) Appendix B, with the
    machine's measured GEMM rate in place of the accelerator's peak.

Deviations
    * MFU here counts the FLOPs minillm actually computes (attention over the full T × T, the
      causal half included) and divides by the measured GEMM rate of this machine at the same
      thread count, not by a datasheet peak.
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import resource
import sys
import time
from pathlib import Path

import numpy as np

from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW

REFERENCE = dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` of /proc/self/status on Linux (the
    high-water mark of this program's own address space), else ``ru_maxrss`` (KiB on Linux). Linux
    carries ``ru_maxrss`` across fork + exec, so a child started by a large process would report
    its parent's size as its own peak; ``VmHWM`` starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_generate(new_tokens: int = 256, repeats: int = 3, seed: int = 0, thread_counts: tuple = (1, 2, "default")) -> dict:
    """Greedy generation of ``new_tokens`` after a 1-token prompt, with and without the KV cache, at
    each thread count (``MINILLM_THREADS`` set for the measurement, so ``GPT.generate``'s own
    choice is overridden; ``"default"``: ``MINILLM_THREADS=auto``, the policy's choice).
    Seconds are medians; ``speedup`` = recompute / KV cache at the first count.
    """
    cfg = GPTConfig(**{**REFERENCE, "block_size": new_tokens + 1})
    model = GPT(cfg, seed=seed)
    prompt = np.array([[1]], dtype=np.int64)
    out: dict = {"config": cfg.to_dict(), "new_tokens": new_tokens, "load_before": machine_load(), "by_threads": {}}
    saved = os.environ.get("MINILLM_THREADS")
    try:
        for t in thread_counts:
            os.environ["MINILLM_THREADS"] = "auto" if t == "default" else str(t)
            row = {}
            for use_cache in (True, False):
                s = _median_time(lambda: model.generate(prompt, max_new_tokens=new_tokens, temperature=0,
                                                        use_cache=use_cache), repeats)
                row["kv_cache" if use_cache else "recompute"] = {"seconds": round(s, 4), "tokens_per_s": round(new_tokens / s, 1)}
            row["speedup"] = round(row["recompute"]["seconds"] / row["kv_cache"]["seconds"], 2)
            out["by_threads"][str(t)] = row
    finally:
        if saved is None:
            os.environ.pop("MINILLM_THREADS", None)
        else:
            os.environ["MINILLM_THREADS"] = saved
    first = out["by_threads"][str(thread_counts[0])]
    out["kv_cache"], out["recompute"], out["speedup"] = first["kv_cache"], first["recompute"], first["speedup"]
    out["load_after"] = machine_load()
    return out


def _minillm_step(seed: int = 0):
    cfg = GPTConfig(**REFERENCE)
    model = GPT(cfg, seed=seed)
    opt = AdamW(model.parameters(), lr=1e-3)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (16, cfg.block_size))

    def step():
        _, loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _torch_step(threads: int, seed: int = 0):
    import torch
    import torch.nn as nn
    import torch.nn.functional as TF

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    C, H, L, V, T = REFERENCE["n_embd"], REFERENCE["n_head"], REFERENCE["n_layer"], REFERENCE["vocab_size"], REFERENCE["block_size"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
            self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T_, _ = x.shape
            h = self.ln_1(x)
            q, k, v = (f(h).view(B, T_, H, C // H).transpose(1, 2) for f in (self.q, self.k, self.v))
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T_, C)
            x = x + self.o(y)
            return x + self.proj(TF.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for b in self.h:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return TF.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ids = torch.randint(0, V, (16, T))

    def step():
        loss = net(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, torch.__version__


def _qualnames() -> dict:
    """(file, first line) -> "functional.Linear.backward" for every Function method, so a profile
    names the op, not just a line number."""
    from minillm import functional
    from minillm.tensor import Function

    out = {}
    for cls in vars(functional).values():
        if isinstance(cls, type) and issubclass(cls, Function):
            for meth in ("forward", "backward"):
                code = getattr(cls, meth).__code__
                out[(code.co_filename, code.co_firstlineno)] = f"{cls.__name__}.{meth}"
    return out


def step_flops(config: dict | None = None, batch_size: int = 16) -> dict:
    """Floating-point operations of one training step (forward + backward + AdamW), from the config.

    ``matmul``: every matrix product as minillm computes it — the Linear layers and the tied LM
    head (2·N·in·out forward, twice that backward: the input and the weight gradient) and attention's
    Q·Kᵀ and P·V (full T×T, the causal half is computed too); N = batch·T tokens.
    ``rest``: an operation count of everything else (LayerNorm, GELU, softmax, residual and bias
    adds, cross-entropy, AdamW), with exp/tanh/sqrt/division counted as one operation each: an
    estimate, to say how much of the step is not a GEMM. Returns GFLOP (1e9) per part and in total.
    """
    c = {**REFERENCE, **(config or {})}
    B, T, C, L, V, H = batch_size, c["block_size"], c["n_embd"], c["n_layer"], c["vocab_size"], c["n_head"]
    N = B * T
    linear_fwd = 2 * N * (L * 12 * C * C + V * C)  # q, k, v, o (4C²) + MLP (8C²) per layer; LM head
    attn_fwd = L * 2 * (2 * B * T * T * C)  # Q·Kᵀ and P·V over all heads
    per_layer_rest = (2 * 20 * N * C  # two LayerNorms, ≈ 8 ops/element forward, 12 backward
                      + 26 * N * 4 * C  # GELU ≈ 10 forward, 16 backward
                      + 10 * B * H * T * T  # softmax ≈ 5 forward, 5 backward
                      + 2 * 3 * N * C  # two residual adds forward, gradient sums backward
                      + 2 * N * 9 * C)  # bias adds forward, bias-gradient sums backward (q,k,v,o: 4C, MLP: 5C)
    params = L * (12 * C * C + 13 * C) + V * C + c["block_size"] * C + 2 * C
    rest = L * per_layer_rest + 20 * N * C + 8 * N * V + 12 * params  # ln_f, cross-entropy, AdamW
    g = 1e9
    return {"matmul_linear": round(3 * linear_fwd / g, 3), "matmul_attention": round(3 * attn_fwd / g, 3),
            "matmul": round(3 * (linear_fwd + attn_fwd) / g, 3), "rest_estimate": round(rest / g, 3),
            "total": round((3 * (linear_fwd + attn_fwd) + rest) / g, 3)}


def _gemm_shapes(config: dict | None = None, batch_size: int = 16) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the Linear-layer GEMMs of one step (forward, input grad, weight grad)."""
    c = {**REFERENCE, **(config or {})}
    C, L, V = c["n_embd"], c["n_layer"], c["vocab_size"]
    Ntok = batch_size * c["block_size"]
    shapes = []
    for fin, fout, n in ((C, C, 4 * L), (C, 4 * C, L), (4 * C, C, L), (C, V, 1)):
        shapes += [(Ntok, fin, fout, n), (Ntok, fout, fin, n), (fout, Ntok, fin, n)]
    return shapes


def gemm_rate(repeats: int = 3, config: dict | None = None, batch_size: int = 16) -> dict:
    """The machine's float32 GEMM rate through NumPy at the current thread count, in GFLOP/s.

    ``step_shapes``: the FLOP-weighted rate over the Linear GEMMs of one training step (the ceiling
    a step can reach); ``square_1024``: a 1024³ product (the machine's peak). Best of ``repeats``.
    """
    rng = np.random.default_rng(0)
    total_flops = total_time = total_cpu = 0.0
    for M, K, N, count in _gemm_shapes(config, batch_size):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        a @ b
        wall, cpu = [], []
        for _ in range(repeats):
            _timed_cpu(lambda: a @ b, wall, cpu)
        total_flops += 2 * M * K * N * count
        total_time += min(wall) * count
        total_cpu += max(min(cpu), 1e-9) * count
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    a @ a
    sq = min(_timed(lambda: a @ a) for _ in range(repeats))
    return {"step_shapes": round(total_flops / total_time / 1e9, 1),
            "step_shapes_per_cpu_second": round(total_flops / total_cpu / 1e9, 1),
            "square_1024": round(2 * 1024 ** 3 / sq / 1e9, 1)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _timed_cpu(fn, wall: list, cpu: list) -> None:
    """Append fn's wall-clock and process CPU seconds (all threads) to ``wall`` and ``cpu``."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)


def _stats(ts: list[float]) -> dict:
    return {"min": round(min(ts), 4), "median": round(float(np.median(ts)), 4), "runs": len(ts)}


def machine_load() -> dict:
    """What else the machine is doing now: idle cores over 0.2 s and the 1-minute load average."""
    from minillm import threads

    out = {"cores": threads.cores(), "idle_cores": threads.idle_cores()}
    if out["idle_cores"] is not None:
        out["idle_cores"] = round(out["idle_cores"], 2)
    if hasattr(os, "getloadavg"):
        out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


def bench_train_step(repeats: int = 5, profile: bool = False, with_torch: bool = True,
                     thread_counts: tuple = (1, 2, "default")) -> dict:
    """Seconds per step of the reference config in minillm and (if installed) PyTorch eager, at each
    thread count, against the FLOP count of the step and the machine's GEMM rate.

    For each count t in ``thread_counts`` (NumPy's BLAS and the C++ twins limited to t threads by
    ``minillm.threads.limit``, torch by ``torch.set_num_threads(t)``), after one warm-up step each,
    ``repeats`` rounds of: one minillm step, one torch step, one GEMM-rate probe — interleaved so a
    change in the machine's load hits all three alike. Reports min and median of each, the ratio
    minillm / torch (of the medians and of the minima), process CPU seconds beside the wall-clock
    ones (at one thread the CPU time is the work done, which load inflates much less than the
    wall-clock time: ``ratio_cpu_seconds_min`` is the load-robust comparison), and the model FLOPs utilisation
    ``mfu = step GFLOP (matmul + rest) / seconds / GEMM rate`` for both (``mfu_cpu``: the same
    from CPU seconds of the step and of the GEMM probe, the figure load disturbs least at one thread). ``load`` says how busy the
    machine was (idle cores before and after); figures measured under load are marked so.
    The count ``"default"`` runs each side as it would run unconfigured: minillm with the thread
    count its CLI policy picks now (``threads.choose("train")``), PyTorch with its own default
    (one thread per core).
    """
    from minillm import threads

    torch_default = None
    if with_torch:
        try:
            import torch

            torch_default = torch.get_num_threads()
        except ImportError:
            pass

    flops = step_flops()
    out: dict = {"config": {**REFERENCE, "batch_size": 16}, "flops_gflop": flops,
                 "load_before": machine_load(), "policy_threads_train": threads.choose("train"),
                 "extensions": {"fused": __import__("minillm.fused", fromlist=["x"]).available()},
                 "by_threads": {}}
    step = _minillm_step()
    for t in thread_counts:
        row: dict = {}
        n = threads.choose("train") if t == "default" else int(t)
        if t == "default":
            row["minillm_threads"], row["torch_threads"] = n, torch_default
        with threads.limit(n):
            tstep = None
            if with_torch:
                try:
                    tstep, version = _torch_step(torch_default if t == "default" else n)
                    out["torch_version"] = version
                except ImportError:
                    out["note_torch"] = "torch not installed: pip install -e '.[crosscheck]' for the side-by-side figure"
            step()
            if tstep is not None:
                tstep()
            ms, ts, mc, tc, rates, cpu_rates = [], [], [], [], [], []
            for _ in range(repeats):
                _timed_cpu(step, ms, mc)
                if tstep is not None:
                    _timed_cpu(tstep, ts, tc)
                r = gemm_rate(repeats=1)
                rates.append(r["step_shapes"])
                cpu_rates.append(r["step_shapes_per_cpu_second"])
            peak = gemm_rate(repeats=3)
        row["minillm_seconds"] = _stats(ms)
        row["minillm_cpu_seconds"] = _stats(mc)
        row["gemm_gflops_step_shapes"] = {"max": max(rates), "median": round(float(np.median(rates)), 1)}
        row["gemm_gflops_square_1024"] = peak["square_1024"]
        rate = row["gemm_gflops_step_shapes"]["median"]
        row["minillm_gflops"] = round(flops["total"] / row["minillm_seconds"]["median"], 1)
        row["mfu_median"] = round(flops["total"] / row["minillm_seconds"]["median"] / rate, 3)
        row["mfu_best"] = round(flops["total"] / row["minillm_seconds"]["min"] / row["gemm_gflops_step_shapes"]["max"], 3)
        # the same in CPU seconds (GEMM probe and step alike): what the step does with the CPU time it gets
        row["gemm_gflops_per_cpu_second"] = max(cpu_rates)
        row["mfu_cpu"] = round(flops["total"] / row["minillm_cpu_seconds"]["min"] / max(cpu_rates), 3)
        if ts:
            row["torch_seconds"] = _stats(ts)
            row["torch_cpu_seconds"] = _stats(tc)
            row["ratio_cpu_seconds_min"] = round(row["minillm_cpu_seconds"]["min"] / row["torch_cpu_seconds"]["min"], 3)
            row["torch_mfu_cpu"] = round(flops["total"] / row["torch_cpu_seconds"]["min"] / max(cpu_rates), 3)
            row["torch_mfu_median"] = round(flops["total"] / row["torch_seconds"]["median"] / rate, 3)
            row["ratio_minillm_over_torch_median"] = round(row["minillm_seconds"]["median"] / row["torch_seconds"]["median"], 3)
            row["ratio_minillm_over_torch_min"] = round(row["minillm_seconds"]["min"] / row["torch_seconds"]["min"], 3)
        out["by_threads"][str(t)] = row
    out["load_after"] = machine_load()
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    idle = [x["idle_cores"] for x in (out["load_before"], out["load_after"]) if x["idle_cores"] is not None]
    if idle and min(idle) < out["load_before"]["cores"] - 0.5:
        out["note"] = (f"measured under load: only {min(idle):.1f} of {out['load_before']['cores']} cores were idle "
                       "(other processes); times, ratios and MFU are not quiet-machine figures, and a ratio "
                       "measured under load flatters whichever side loses less to the load")
    if profile:
        prof = cProfile.Profile()
        with threads.limit(threads.choose("train") if thread_counts[0] == "default" else int(thread_counts[0])):
            prof.enable()
            step()
            prof.disable()
        out["profile_top"] = profile_rows(prof)
    return out


def profile_rows(prof: cProfile.Profile, n: int = 15) -> list[dict]:
    """The ``n`` functions with the most self time (cProfile's ``tottime``) in a finished profile,
    largest first: ``[{"function", "seconds", "share"}]``, share of the profile's total self time.

    A Function's forward/backward is named ``"Linear.backward"`` (see ``_qualnames``), anything else
    ``file.py:line(name)``. Used by ``bench train-step --profile`` and ``pipeline --profile``."""
    stats = pstats.Stats(prof)
    names = _qualnames()
    rows = sorted(((v[2], names.get((k[0], k[1]), f"{Path(k[0]).name}:{k[1]}({k[2]})"))
                   for k, v in stats.stats.items()), reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    return [{"function": name, "seconds": round(t, 4), "share": round(t / total, 3)} for t, name in rows[:n]]


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=["generate", "train-step", "quant", "kernel"], help="which benchmark")
    from minillm.train.common import number_in_range

    parser.add_argument("--repeats", type=number_in_range(int, "repeats", (1, float("inf"), True, False)), default=5,
                        help="timed repetitions (int ≥ 1; default 5)")
    parser.add_argument("--profile", action="store_true", help="train-step: add a cProfile breakdown")
    parser.add_argument("--no-torch", action="store_true", help="train-step: skip the PyTorch side")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="kernel: which device")
    parser.add_argument("--threads", default=None,
                        help="train-step/generate: comma-separated thread counts to measure; 'default' = each "
                             "side unconfigured (minillm's policy, PyTorch's default). Default: train-step "
                             "1,2,default; generate 1,2 (its policy is 1 thread)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")


def run(args) -> int:
    spec = args.threads or ("1,2" if args.what == "generate" else "1,2,default")
    try:
        counts = tuple(x.strip() if x.strip() == "default" else int(x) for x in str(spec).split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min((c for c in counts if c != "default"), default=1) < 1:
        raise ValueError(f"--threads must be positive integers or 'default', separated by commas; got {spec!r}")
    if args.what == "generate":
        res = bench_generate(repeats=args.repeats, thread_counts=counts)
    elif args.what == "train-step":
        res = bench_train_step(repeats=args.repeats, profile=args.profile, with_torch=not args.no_torch,
                               thread_counts=counts)
    elif args.what == "quant":

        res = bench_quant(repeats=args.repeats)
    else:
        from minillm.kernels import bench_kernel

        res = bench_kernel(device=args.device, repeats=args.repeats)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from minillm.checkpoint import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(__import__("argparse").Namespace(what=sys.argv[1], repeats=3, profile=False, no_torch=False,
                                                   device="cpu", out=None, threads=None)))


def bench_quant(repeats: int = 5, n: int = 4096, seed: int = 0) -> dict:
    """NF4 quantize/dequantize throughput (MB/s of float32 input) and Linear4bit forward vs Linear.

    Shapes: a (n, n) float32 weight (64 MiB for n = 4096); Linear forward on x (16, n).
    """
    from minillm import kernels
    from minillm.linear4bit import Linear4bit
    from minillm.nn import Linear
    from minillm.quant import bits_per_parameter, dequantize_4bit, quantize_4bit
    from minillm.tensor import Tensor, no_grad

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n)).astype(np.float32)
    mb = W.nbytes / 1e6

    def t(fn):
        return _median_time(fn, repeats)

    out = {"shape": [n, n]}
    for dq in (False, True):
        packed, qs = quantize_4bit(W, compress_statistics=dq)
        tq = t(lambda: quantize_4bit(W, compress_statistics=dq))
        td = t(lambda: dequantize_4bit(packed, qs))
        key = "nf4_double_quant" if dq else "nf4"
        out[key] = {"quantize_MB_per_s": round(mb / tq, 1), "dequantize_MB_per_s": round(mb / td, 1),
                    "bits_per_parameter": round(bits_per_parameter(packed, qs), 4)}
    x = Tensor(rng.standard_normal((16, n)).astype(np.float32))
    lin = Linear(n, n, bias=False, rng=rng)
    q4 = Linear4bit(lin.weight.data)
    with no_grad():
        out["linear_forward_ms"] = round(1e3 * t(lambda: lin(x)), 3)
        out["linear4bit_forward_ms"] = round(1e3 * t(lambda: q4(x)), 3)
    out["kernel_backend"] = kernels.select_backend(np.zeros(1, np.float32))
    out["weight_bytes"] = {"float32": int(W.nbytes), "nf4_double_quant": q4.nbytes}
    return out
