"""Optimizers, the learning-rate schedule, gradient clipping and gradient accumulation.

Scope
    ``SGD`` (with momentum), ``AdamW`` (decoupled weight decay, bias correction — the same update,
    operation for operation, as ``torch.optim.AdamW``), parameter groups (so biases and LayerNorm
    weights can skip weight decay), ``cosine_lr`` with linear warmup, ``clip_grad_norm_``, and
    ``accumulate_gradients`` whose loss and gradient equal the big-batch loss: the mean over
    *all* supervised tokens of the window, not a mean of micro-batch means (docs/bugs.md B05).
    Optimizer state saves to and loads from plain host arrays (``state_dict``). ``PagedAdamW``
    (end of the file, with its own sources and deviations) is AdamW whose state lives in pages
    that move between a budgeted device pool and host memory (QLoRA §3 "Paged Optimizers").

Sources
    * Adam: Kingma & Ba 2015, Algorithm 1. AdamW: Loshchilov & Hutter 2019, Algorithm 2
      (decoupled weight decay). Operation order follows ``torch/optim/adamw.py`` (single-tensor
      path): p ← p·(1 − lr·λ); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
      p ← p − (lr/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε).
    * Cosine schedule with warmup: Loshchilov & Hutter 2017 (SGDR) without restarts; the warmup +
      cosine-to-min form of nanoGPT ``get_lr``.
    * ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` (total L2 norm, coefficient
      max_norm/(norm + 1e-6) clamped to 1).
    * Gradient accumulation normalised by the total token count: transformers PR #34191.

Deviations
    * The paper's schedule multiplier η_t scales weight decay too; as in PyTorch, the decay here
      is lr·λ with the scheduled lr (set ``group["lr"]``), which is the same thing.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

from minillm import backend
from minillm.tensor import Tensor, no_grad


def _groups(params, defaults: dict) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for g in groups:
        group = dict(defaults)
        group.update(g)
        group["params"] = list(g["params"])
        out.append(group)
    return out


class Optimizer:
    """Base class: parameter groups (each a dict with "params" and hyperparameters) and per-parameter state."""

    def __init__(self, params, defaults: dict):
        self.param_groups = _groups(params, defaults)
        self.state: dict[int, dict] = {}  # index of the parameter (in group order) -> state

    def _indexed(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (set to None, as ``zero_grad(set_to_none=True)``)."""
        for _, _, p in self._indexed():
            p.grad = None

    def state_dict(self) -> dict:
        """{"state": {index: {name: host array or number}}, "param_groups": [hyperparameters]}."""
        state = {i: {k: (backend.to_numpy(v).copy() if hasattr(v, "shape") else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Restore state saved by ``state_dict``; raises ValueError if the groups do not match."""
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                g["n_params"] != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match the parameter groups: "
                             f"{[g['n_params'] for g in groups]} vs {[len(g['params']) for g in self.param_groups]}")
        for g, own in zip(groups, self.param_groups):
            own.update({k: v for k, v in g.items() if k != "n_params"})
        params = {i: p for i, _, p in self._indexed()}
        self.state = {}
        for i, s in sd["state"].items():
            i = int(i)
            if i not in params:
                raise ValueError(f"optimizer state for parameter {i}, but the optimizer has {len(params)} parameters")
            p = params[i]
            for k, v in s.items():
                if hasattr(v, "shape") and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}, "
                                     f"the parameter {tuple(p.shape)}")
            xp = backend.get_array_module(p.data)
            self.state[i] = {k: (xp.asarray(v, dtype=p.dtype).copy() if hasattr(v, "shape") else v)
                             for k, v in s.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and (coupled) weight decay, as ``torch.optim.SGD``."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self) -> None:
        with no_grad():
            for i, group, p in self._indexed():
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g + p.dtype.type(group["weight_decay"]) * p.data
                if group["momentum"]:
                    buf = self.state.get(i, {}).get("momentum_buffer")
                    buf = g.copy() if buf is None else buf * group["momentum"] + g
                    self.state[i] = {"momentum_buffer": buf}
                    g = buf
                p.data -= p.dtype.type(group["lr"]) * g


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """One AdamW update of arrays ``p``, ``m``, ``v`` in place (torch.optim.AdamW's order of operations).

    Shapes: all arrays the parameter's shape, float32. ``step`` is 1 on the first update.
    Shared by ``AdamW`` and ``PagedAdamW`` so both give bit-identical parameters.
    """
    dt = p.dtype.type
    if weight_decay:
        p *= dt(1 - lr * weight_decay)
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * (g * g)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    xp = backend.get_array_module(p)
    denom = xp.sqrt(v)
    denom /= dt(bias_correction2_sqrt)
    denom += dt(eps)
    p -= dt(step_size) * (m / denom)


def _check_hyperparameters(who: str, lr, betas, eps, weight_decay) -> None:
    """Raise ValueError naming the value when lr, eps or weight_decay is negative or not finite
    (NaN passes ``lr < 0``, so finiteness is tested explicitly) or a beta is outside [0, 1)."""
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(f"{who}: invalid {name}={v}: must be a finite number ≥ 0")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"{who}: betas={tuple(betas)} must each be in [0, 1)")


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2), = ``torch.optim.AdamW``.

    Args:
        params: parameters, or a list of groups ``{"params": [...], "weight_decay": 0.0, ...}``.
        lr, betas, eps, weight_decay: as in PyTorch (defaults 1e-3, (0.9, 0.999), 1e-8, 0.01).
    State per parameter: step (int), exp_avg and exp_avg_sq (arrays of the parameter's shape).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        _check_hyperparameters("AdamW", lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        with no_grad():
            for i, group, p in self._indexed():
                if p.grad is None:
                    continue
                st = self.state.get(i)
                if st is None:
                    xp = backend.get_array_module(p.data)
                    st = self.state[i] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                          "exp_avg_sq": xp.zeros_like(p.data)}
                st["step"] += 1
                b1, b2 = group["betas"]
                adamw_update(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], group["lr"],
                             b1, b2, group["eps"], group["weight_decay"])


def weight_decay_groups(named_params: Iterable, weight_decay: float) -> list[dict]:
    """Two parameter groups: 2-D (and higher) weights with ``weight_decay``, the rest (biases,
    LayerNorm weights) with 0 — the GPT-2/nanoGPT convention. Frozen parameters are left out.

    The one parameter-group rule of the project: every trainer (pretrain, SFT, LoRA, reward, DPO,
    PPO's policy and value head) builds its optimizer from it. ``named_params``: ``(name, Tensor)``
    pairs (``model.named_parameters()``) or bare Tensors; LoRA's A/B matrices are 2-D, so they decay.
    Source: nanoGPT ``configure_optimizers`` (decay iff ``p.dim() >= 2``)."""
    decay, no_decay = [], []
    for item in named_params:
        p = item[1] if isinstance(item, tuple) else item
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def cosine_lr(step: int, max_steps: int, peak_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``peak_lr`` over ``warmup_steps``
    (step 0 gets peak/warmup), then half a cosine down to ``min_lr_ratio·peak_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    min_lr = peak_lr * min_lr_ratio
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale gradients in place so their total L2 norm is at most ``max_norm``.

    Returns the total norm before clipping (a float), as ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) if not backend.is_cupy(g)
                          else float((g ** 2).sum()) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total


def accumulate_gradients(micro_batches: Sequence, loss_sum_fn: Callable[[object], Tensor],
                         n_tokens_fn: Callable[[object], int]) -> tuple[float, int]:
    """Backward over micro-batches so the gradient equals that of one big batch (docs/bugs.md B05).

    ``loss_sum_fn(mb)`` returns the *summed* loss of a micro-batch (e.g. ``cross_entropy(...,
    reduction="sum")``, nats); ``n_tokens_fn(mb)`` its number of supervised tokens. Every micro-batch
    loss is divided by the total count N of the whole window before backward, so the gradients
    add up to ∇(Σ loss / N). Returns (mean loss per token over the window, N). A window with no
    supervised token returns (0.0, 0) and leaves the gradients untouched (no NaN).
    """
    total = sum(int(n_tokens_fn(mb)) for mb in micro_batches)
    if total == 0:
        return 0.0, 0
    loss_total = 0.0
    for mb in micro_batches:
        loss_sum = loss_sum_fn(mb)
        (loss_sum * (1.0 / total)).backward()
        loss_total += float(loss_sum.item())
    return loss_total / total, total


# ============================================================================================
# Paged optimizers
# ============================================================================================
#
# Scope
#     ``PagedAdamW``: AdamW (the same ``adamw_update``, so parameters are bit-identical to
#     ``AdamW``) whose state (exp_avg m, exp_avg_sq v) lives in fixed-size pages that move between
#     a budgeted "device" pool and a host store. Before a chunk of a parameter is updated its page
#     is paged in; when the pool is full the least recently used page is written back to the host
#     (paged out). The traffic is counted (``stats()``).
#
# Sources
#     * Dettmers et al. 2023, QLoRA (arXiv:2305.14314) §3 "Paged Optimizers": optimizer states in
#       NVIDIA unified memory are evicted to CPU RAM when the GPU runs out and paged back for the
#       optimizer update, absorbing the memory spikes of long mini-batches.
#     * bitsandbytes ``bitsandbytes/optim/optimizer.py`` (``Optimizer8bit.get_state_buffer``,
#       ``prefetch_state`` before each parameter's update), ``bitsandbytes/functional.py``
#       (``get_paged``), ``csrc/pythonInterface.cpp`` (``cudaMallocManaged``,
#       ``cudaMemPrefetchAsync``); ``bitsandbytes/optim/adamw.py`` ``PagedAdamW`` defaults (lr 1e-3,
#       betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2). Shared docs/reference.md §3.
#
# Deviations
#     * bitsandbytes allocates the state with CUDA unified memory and lets the driver migrate pages
#       (its granularity, on demand, no page-size knob); here paging is explicit: pages of
#       ``page_size`` bytes, a pool of ``device_budget // page_size`` slots, LRU eviction, every
#       copy counted — so the mechanism is visible and testable on a CPU. ``device_budget=None``
#       (everything fits) is the "no oversubscription" case, where bitsandbytes costs nothing.
#     * bitsandbytes pages only state buffers with ≥ 1e5 elements and prefetches a parameter's
#       whole state before its update; here every parameter is paged and pages are faulted in
#       one chunk at a time (the AdamW update is elementwise, so chunking changes no value).
#     * 32-bit state only (bitsandbytes also offers 8-bit paged state).
#     * On NumPy the "device" pool and the host store are both host arrays (the copies are real
#       copies). On CuPy the pool is a cupy array, the host store pinned memory, and pages move on
#       a side stream (``_to_device`` / ``_to_host``); each copy is waited for before use, so
#       copies do not yet overlap the update (prefetching the next page would).

from collections import OrderedDict  # noqa: E402  (kept with the paged optimizer it serves)


class PagedAdamW(Optimizer):
    """AdamW with paged optimizer state (QLoRA §3; bitsandbytes ``PagedAdamW``, 32-bit state).

    Args:
        params, lr, betas, eps, weight_decay: as ``AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        page_size: bytes per page (default 64 KiB; a positive multiple of 8). A page holds the
            state of ``page_size // 8`` consecutive elements of one parameter: exp_avg and
            exp_avg_sq, float32 each. A parameter of n elements spans ceil(8n / page_size) pages.
        device_budget: bytes of the device pool (None: room for every page, no eviction). It holds
            ``device_budget // page_size`` pages; raises ValueError if that is less than one page.

    The update is ``adamw_update`` on each page's chunk (elementwise, hence bit-identical to
    ``AdamW``). A page is created zero-filled on first use (counted in ``allocations``, no copy),
    paged in from the host store when it is not resident (``page_ins``), and written back to the
    host when evicted, least recently used first (``page_outs``); ``bytes_moved`` =
    page_size·(page_ins + page_outs). ``state_dict`` holds plain host arrays in AdamW's format
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so the two optimizers can load each
    other's state.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 64 * 1024, device_budget: int | None = None):
        _check_hyperparameters("PagedAdamW", lr, betas, eps, weight_decay)
        if int(page_size) != page_size or page_size <= 0 or page_size % 8:
            raise ValueError(f"PagedAdamW: page_size must be a positive multiple of 8 bytes, got {page_size}")
        if device_budget is not None and device_budget < page_size:
            raise ValueError(f"PagedAdamW: device_budget={device_budget} bytes is smaller than one page "
                             f"(page_size={page_size} bytes)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.page_size = int(page_size)
        self.page_elems = self.page_size // 8  # parameter elements per page (m and v, float32 each)
        self.device_budget = device_budget
        params_all = [p for _, _, p in self._indexed()]
        self._n_pages = [max(1, -(-int(p.size) // self.page_elems)) for p in params_all]
        total_pages = sum(self._n_pages)
        slots = total_pages if device_budget is None else min(total_pages, int(device_budget) // self.page_size)
        xp = backend.get_array_module(params_all[0].data)
        self._pool = xp.zeros((slots, 2, self.page_elems), dtype=np.float32)  # the "device" pool
        self._free = list(range(slots - 1, -1, -1))
        self._resident: "OrderedDict[tuple[int, int], int]" = OrderedDict()  # (param, page) -> slot, LRU first
        self._host: dict[int, np.ndarray] = {}  # param -> (n_pages, 2, page_elems) host backing store
        self._created: set[tuple[int, int]] = set()
        self.page_ins = self.page_outs = self.allocations = 0

    # ---------------------------------------------------------------- transfer hooks
    @property
    def _on_gpu(self) -> bool:
        return backend.is_cupy(self._pool)

    def _side_stream(self):  # pragma: no cover - GPU only
        """The CUDA stream page copies run on (created on first use), apart from the compute stream."""
        if getattr(self, "_stream", None) is None:
            import cupy

            self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def _to_device(self, key: tuple[int, int], slot: int) -> None:
        """Copy page ``key`` (param index, page index) from the host store into pool ``slot``.

        On CuPy: an asynchronous host-to-device copy from pinned memory on the side stream, then a
        wait for that stream, so the update that follows reads the whole page."""
        i, k = key
        if self._on_gpu:  # pragma: no cover - GPU only
            stream = self._side_stream()
            self._pool[slot].set(self._host[i][k], stream=stream)
            stream.synchronize()
        else:
            self._pool[slot][...] = self._host[i][k]

    def _to_host(self, key: tuple[int, int], slot: int) -> None:
        """Copy pool ``slot`` back to page ``key`` of the host store (on CuPy: a device-to-host
        copy into pinned memory on the side stream, after the compute stream's pending work)."""
        i, k = key
        if self._on_gpu:  # pragma: no cover - GPU only
            import cupy

            stream = self._side_stream()
            stream.wait_event(cupy.cuda.get_current_stream().record())
            self._pool[slot].get(stream=stream, out=self._host[i][k])
            stream.synchronize()
        else:
            self._host[i][k][...] = self._pool[slot]

    # ---------------------------------------------------------------- paging
    def _evict_one(self) -> int:
        key, slot = self._resident.popitem(last=False)  # least recently used
        self._to_host(key, slot)
        self.page_outs += 1
        return slot

    def _page(self, key: tuple[int, int]) -> int:
        """The pool slot holding page ``key``, paging it in (and evicting LRU pages) if needed."""
        slot = self._resident.get(key)
        if slot is not None:
            self._resident.move_to_end(key)
            return slot
        slot = self._free.pop() if self._free else self._evict_one()
        if key in self._created:
            self._to_device(key, slot)
            self.page_ins += 1
        else:  # first touch: zero-filled on the device, as bitsandbytes' fill kernel
            self._pool[slot][...] = 0
            self._created.add(key)
            self.allocations += 1
        self._resident[key] = slot
        return slot

    def _host_store(self, i: int) -> np.ndarray:
        """Parameter i's host backing store (n_pages, 2, page_elems) float32; page-locked (pinned)
        memory on CuPy so copies can run asynchronously (cudaHostAlloc, as bitsandbytes' managed
        memory is host-resident when evicted)."""
        if i not in self._host:
            shape = (self._n_pages[i], 2, self.page_elems)
            if self._on_gpu:  # pragma: no cover - GPU only
                import cupyx

                self._host[i] = cupyx.zeros_pinned(shape, dtype=np.float32)
            else:
                self._host[i] = np.zeros(shape, dtype=np.float32)
        return self._host[i]

    def step(self) -> None:
        """Apply one AdamW update to every parameter with a gradient, page by page."""
        pe = self.page_elems
        with no_grad():
            for i, group, p in self._indexed():
                if p.grad is None:
                    continue
                if p.dtype != np.float32:
                    raise TypeError(f"PagedAdamW keeps float32 state; parameter {i} is {p.dtype}")
                self._host_store(i)
                st = self.state.setdefault(i, {"step": 0})
                st["step"] += 1
                b1, b2 = group["betas"]
                contiguous = p.data.flags.c_contiguous
                flat = p.data.reshape(-1) if contiguous else p.data.ravel()  # a view when contiguous
                g = p.grad.reshape(-1)
                n = flat.shape[0]
                for k in range(self._n_pages[i]):
                    lo, hi = k * pe, min(n, (k + 1) * pe)
                    slot = self._page((i, k))
                    m = self._pool[slot, 0, :hi - lo]  # exp_avg chunk (view into the pool)
                    v = self._pool[slot, 1, :hi - lo]  # exp_avg_sq chunk
                    adamw_update(flat[lo:hi], g[lo:hi], m, v, st["step"], group["lr"], b1, b2, group["eps"],
                                 group["weight_decay"])
                if not contiguous:
                    p.data[...] = flat.reshape(p.shape)

    # ---------------------------------------------------------------- accounting
    def stats(self) -> dict:
        """Paging counters: page_ins, page_outs, allocations (pages created), bytes_moved
        (page_size·(page_ins + page_outs)), resident_pages, resident_bytes, pool_pages (slots),
        page_size and device_budget (bytes), state_bytes (8 bytes per element of the paged state)."""
        return {"page_ins": self.page_ins, "page_outs": self.page_outs, "allocations": self.allocations,
                "bytes_moved": self.page_size * (self.page_ins + self.page_outs),
                "resident_pages": len(self._resident), "resident_bytes": self.page_size * len(self._resident),
                "pool_pages": int(self._pool.shape[0]), "page_size": self.page_size,
                "device_budget": self.device_budget,
                "state_bytes": 8 * sum(int(p.size) for i, _, p in self._indexed() if i in self._host)}

    def _gather(self, i: int, p) -> tuple[np.ndarray, np.ndarray]:
        """(exp_avg, exp_avg_sq) of parameter i as host arrays of its shape (no page moves)."""
        pages = self._host[i].copy()
        for k in range(self._n_pages[i]):
            slot = self._resident.get((i, k))
            if slot is not None:
                pages[k] = backend.to_numpy(self._pool[slot])
            elif (i, k) not in self._created:
                pages[k] = 0
        n = int(p.size)
        m = pages[:, 0, :].reshape(-1)[:n].reshape(p.shape).copy()
        v = pages[:, 1, :].reshape(-1)[:n].reshape(p.shape).copy()
        return m, v

    def state_dict(self) -> dict:
        """AdamW's format: {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}
        with host (numpy) arrays of each parameter's shape; paging counters are not saved."""
        params = {i: p for i, _, p in self._indexed()}
        state = {}
        for i, s in self.state.items():
            m, v = self._gather(i, params[i])
            state[i] = {"step": s["step"], "exp_avg": m, "exp_avg_sq": v}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state saved by ``PagedAdamW.state_dict`` or ``AdamW.state_dict``: every page
        goes to the host store (nothing resident; pages fault in on the next step). Raises
        ValueError when the groups or a state array's shape do not match."""
        Optimizer.load_state_dict(self, sd)  # checks groups, copies hyperparameters
        loaded, self.state = self.state, {}
        params = {i: p for i, _, p in self._indexed()}
        self._resident.clear()
        self._free = list(range(self._pool.shape[0] - 1, -1, -1))
        self._host.clear()
        self._created.clear()
        pe = self.page_elems
        for i, s in loaded.items():
            p = params[i]
            host = self._host_store(i)
            for j, name in enumerate(("exp_avg", "exp_avg_sq")):
                arr = backend.to_numpy(s[name]).astype(np.float32)
                if arr.shape != tuple(p.shape):
                    raise ValueError(f"optimizer state {i}.{name}: shape {arr.shape} vs parameter {tuple(p.shape)}")
                flat = arr.reshape(-1)
                for k in range(self._n_pages[i]):
                    chunk = flat[k * pe:(k + 1) * pe]
                    host[k, j, :chunk.shape[0]] = chunk
                    self._created.add((i, k))
            self.state[i] = {"step": int(s["step"])}
