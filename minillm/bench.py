"""Speed and memory benchmarks, printed as JSON, side by side with PyTorch where it is installed.

Scope
    ``minillm bench generate``: tokens/s of greedy generation of 256 new tokens with and without
    the KV cache, and their ratio. ``minillm bench train-step``: seconds per training step
    (forward + backward + AdamW) of the reference config (n_layer=4, n_embd=256, n_head=4,
    block_size=128, batch 16, vocab 512), peak resident memory, the same step of the same
    architecture in PyTorch eager on the CPU with the same number of threads, and the ratio
    minillm / PyTorch; ``--profile`` adds where minillm's time goes (by function, from cProfile).
    ``minillm bench quant`` and ``minillm bench kernel`` call the benchmarks of quant.py and
    kernels.py. Speed targets are measured here, never asserted by timed tests.

Sources
    PyTorch eager ``nn.Linear``/``F.scaled_dot_product_attention``/``torch.optim.AdamW`` as the
    reference; timing is the median of repeated runs after one warm-up step.

Deviations
    None.
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
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_generate(new_tokens: int = 256, repeats: int = 3, seed: int = 0) -> dict:
    """Greedy generation of ``new_tokens`` after a 1-token prompt, with and without the KV cache."""
    cfg = GPTConfig(**{**REFERENCE, "block_size": new_tokens + 1})
    model = GPT(cfg, seed=seed)
    prompt = np.array([[1]], dtype=np.int64)
    out = {}
    for use_cache in (True, False):
        s = _median_time(lambda: model.generate(prompt, max_new_tokens=new_tokens, temperature=0,
                                                use_cache=use_cache), repeats)
        out["kv_cache" if use_cache else "recompute"] = {"seconds": round(s, 4), "tokens_per_s": round(new_tokens / s, 1)}
    out["speedup"] = round(out["recompute"]["seconds"] / out["kv_cache"]["seconds"], 2)
    out["config"] = cfg.to_dict()
    out["new_tokens"] = new_tokens
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


def bench_train_step(repeats: int = 5, profile: bool = False, with_torch: bool = True) -> dict:
    """Seconds per step of the reference config in minillm and (if installed) PyTorch eager."""
    # numpy's BLAS uses OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) threads, else one per core: torch gets the same
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or cores)
    step = _minillm_step()
    out: dict = {"config": {**REFERENCE, "batch_size": 16}, "threads": threads}
    out["minillm_seconds_per_step"] = round(_median_time(step, repeats), 4)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if with_torch:
        try:
            tstep, version = _torch_step(threads)
            out["torch_seconds_per_step"] = round(_median_time(tstep, repeats), 4)
            out["torch_version"] = version
            out["ratio_minillm_over_torch"] = round(out["minillm_seconds_per_step"] / out["torch_seconds_per_step"], 3)
        except ImportError:
            out["torch_seconds_per_step"] = None
            out["note"] = "torch not installed: pip install -e '.[crosscheck]' for the side-by-side figure"
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        step()
        prof.disable()
        stats = pstats.Stats(prof)
        names = _qualnames()
        rows = sorted(((v[2], names.get((k[0], k[1]), f"{Path(k[0]).name}:{k[1]}({k[2]})"))
                       for k, v in stats.stats.items()), reverse=True)
        total = sum(r[0] for r in rows)
        out["profile_top"] = [{"function": name, "seconds": round(t, 4), "share": round(t / total, 3)}
                              for t, name in rows[:15]]
    return out


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=["generate", "train-step", "quant", "kernel"], help="which benchmark")
    from minillm.train.common import number_in_range

    parser.add_argument("--repeats", type=number_in_range(int, "repeats", (1, float("inf"), True, False)), default=5,
                        help="timed repetitions (int ≥ 1; default 5)")
    parser.add_argument("--profile", action="store_true", help="train-step: add a cProfile breakdown")
    parser.add_argument("--no-torch", action="store_true", help="train-step: skip the PyTorch side")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="kernel: which device")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")


def run(args) -> int:
    if args.what == "generate":
        res = bench_generate(repeats=args.repeats)
    elif args.what == "train-step":
        res = bench_train_step(repeats=args.repeats, profile=args.profile, with_torch=not args.no_torch)
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
                                                   device="cpu", out=None)))


def bench_quant(repeats: int = 5, n: int = 4096, seed: int = 0) -> dict:
    """NF4 quantize/dequantize throughput (MB/s of float32 input) and Linear4bit forward vs Linear.

    Shapes: a (n, n) float32 weight (64 MiB for n = 4096); Linear forward on x (16, n).
    """
    import time

    from minillm import kernels
    from minillm.linear4bit import Linear4bit
    from minillm.nn import Linear
    from minillm.quant import bits_per_parameter, dequantize_4bit, quantize_4bit
    from minillm.tensor import Tensor, no_grad

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n)).astype(np.float32)
    mb = W.nbytes / 1e6

    def t(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

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
