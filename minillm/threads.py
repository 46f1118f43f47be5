"""How many CPU threads minillm's math uses, chosen per phase (training, generation).

Scope
    Three thread pools do minillm's CPU work: the BLAS under NumPy's matrix products (OpenBLAS),
    the OpenMP team of the NF4 twin (``minillm._C``: the 4-bit dequantize-matmul) and the OpenMP
    threads of the C++ twins of the other ops (``minillm._fused``). ``phase(name)`` is a context
    manager that sets the BLAS threads for one phase, holds the OpenMP team at one thread
    (threadpoolctl's "openmp" API, i.e. ``omp_set_num_threads``), and restores both after;
    ``choose(name)`` says what it would pick. The ``_fused`` twins stay on one thread whatever the
    phase (``fused.set_num_threads`` changes that; they name their team size explicitly): they are
    memory-bound, and measured on the shared 2-core machine a second OpenMP thread made a 2-thread
    training step slower (docs/performance.md). The NF4 twin's team is held at one thread too:
    left at OpenMP's default (one thread per core) on a busy machine it waited for the descheduled
    thread at every call (a (8, 256) x (256, 1024) 4-bit matmul 40 ms instead of 0.2 ms), and
    following the phase's count on an idle one, its two threads and OpenBLAS's two spun against
    each other on two cores (the pipeline's QLoRA SFT stage: 47 s with both at 2 threads, 16 s with
    both at 1, 15 s with BLAS at 2 and the team at 1, measured in a fresh clone).
    The CLI runs each command, and the pipeline each stage, inside ``phase("train")``;
    ``GPT.generate`` runs inside ``phase("generate")``.

    The policy (measured: docs/performance.md):

    * generation: 1 thread. Decoding multiplies a few rows by each weight matrix; a second thread
      costs more in hand-offs than it saves.
    * training: a second BLAS thread only when a core is free right now. Before the phase starts the
      machine's CPU use is sampled for 0.2 s from /proc/stat, less this process's own (its BLAS
      threads may still be spinning from the last phase); with ≥ 1.75 idle cores (of the cores this process may run on) it uses
      2 threads, else 1. A second BLAS thread that has to share a core with another process makes
      every GEMM wait for it: the issue's measurement was 16× slower than PyTorch at 2 threads on a
      busy machine, so the choice errs towards 1.
    * ``MINILLM_THREADS=N`` fixes N threads for every phase; ``MINILLM_THREADS=auto`` (or unset) is
      the policy above. When unset, an explicit ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` in
      the environment is honoured as a fixed count, as NumPy users expect.

    Without threadpoolctl the BLAS pool is left as the environment set it (``limits()`` reports
    None for it).

Sources
    threadpoolctl (``threadpool_limits``, ``threadpool_info``); Linux ``proc(5)`` /proc/stat.

Deviations
    None (plumbing).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from minillm import fused

PHASES = ("train", "generate")
#: Most threads the policy picks for training (measured up to 2; see docs/performance.md).
MAX_TRAIN_THREADS = 2
#: Idle cores needed before training takes a second thread.
IDLE_CORES_FOR_TWO = 1.75

try:  # a dependency since this module exists; tolerated missing in an older environment
    import threadpoolctl as _tpc
except ImportError:  # pragma: no cover - depends on the environment
    _tpc = None


def cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [float(x) for x in fields[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return idle, sum(v[:8])


def idle_cores(window: float = 0.2) -> float | None:
    """Cores not used by other processes over the next ``window`` seconds, machine-wide (from
    /proc/stat), capped at ``cores()``; None where /proc/stat is unreadable (then
    ``os.getloadavg`` is used by ``choose``).

    This process's own CPU time in the window counts as idle: right after a BLAS-heavy phase,
    OpenBLAS's worker threads keep spinning for a while, and counted as busy they made the next
    phase see a loaded machine (measured on an idle 2-core machine: 1.46 idle cores, 0.53 of a
    core being this process's own spinning threads) — the pipeline then trained half its stages
    on one thread."""
    a = _cpu_times()
    if a is None:
        return None
    own0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(window)
    b = _cpu_times()
    own = (time.process_time() - own0) / max(time.perf_counter() - wall0, 1e-9)
    if b is None or b[1] <= a[1]:
        return None
    frac = (b[0] - a[0]) / (b[1] - a[1])
    return min(float(cores()), frac * (os.cpu_count() or 1) + own)


def _env_threads() -> int | None:
    """The fixed thread count the environment asks for, or None for the policy."""
    v = os.environ.get("MINILLM_THREADS", "").strip().lower()
    if v and v != "auto":
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"MINILLM_THREADS must be a positive integer or 'auto', got {v!r}") from None
        if n < 1:
            raise ValueError(f"MINILLM_THREADS must be ≥ 1, got {n}")
        return n
    if v == "auto":
        return None
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            n = int(os.environ.get(name, "").strip() or 0)
        except ValueError:
            continue
        if n >= 1:
            return n
    return None


def choose(name: str) -> int:
    """Threads for phase ``name`` ("train" or "generate") under the policy of the module docstring.

    Raises ValueError for another phase name or a malformed ``MINILLM_THREADS``.
    """
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
    fixed = _env_threads()
    if fixed is not None:
        return fixed
    if name == "generate":
        return 1
    top = min(cores(), MAX_TRAIN_THREADS)
    if top < 2:
        return 1
    idle = idle_cores()
    if idle is None:
        try:
            idle = cores() - os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average on this platform
            return 1
    return top if idle >= IDLE_CORES_FOR_TWO else 1


def limits() -> dict:
    """Current thread counts: {"blas": OpenBLAS threads, "openmp": the OpenMP team size (the NF4
    twin's), each int or None (threadpoolctl missing, or no such library loaded), "fused": the
    ``_fused`` twins' OpenMP threads}."""
    counts = {"blas": None, "openmp": None}
    if _tpc is not None:
        for info in reversed(_tpc.threadpool_info()):  # reversed: the first pool of each API wins, as before
            if info.get("user_api") in counts:
                counts[info["user_api"]] = info["num_threads"]
    return {**counts, "fused": fused.num_threads()}


@contextlib.contextmanager
def limit(n: int) -> Iterator[int]:
    """Run the block with ``n`` BLAS threads and an OpenMP team of one thread (threadpoolctl;
    nothing changes without it); restores the previous counts after. The ``_fused`` twins' own
    thread count is left as it is (see above)."""
    n = max(1, int(n))
    if _tpc is not None:
        with _tpc.threadpool_limits(limits={"blas": n, "openmp": 1}):
            yield n
    else:
        yield n


@contextlib.contextmanager
def phase(name: str) -> Iterator[int]:
    """Run the block with ``choose(name)`` threads (see ``limit``); yields the count.

    Nested phases: the inner one decides inside it (generation inside a PPO step gets 1 thread),
    and the outer one's count is restored after it.
    """
    with limit(choose(name)) as n:
        yield n
