"""Paged optimizers: AdamW whose state pages between a budgeted device pool and host memory (chapter 07).

Scope
    ``PagedAdamW``: AdamW (the same ``adamw_update``, so parameters are bit-identical to
    ``AdamW``) whose state (exp_avg m, exp_avg_sq v) lives in fixed-size pages that move between
    a budgeted "device" pool and a host store. Before a chunk of a parameter is updated its page
    is paged in; when the pool is full the least recently used page is written back to the host
    (paged out). The traffic is counted (``stats()``).

Sources
    * Dettmers et al. 2023, QLoRA (arXiv:2305.14314) §3 "Paged Optimizers": optimizer states in
      NVIDIA unified memory are evicted to CPU RAM when the GPU runs out and paged back for the
      optimizer update, absorbing the memory spikes of long mini-batches.
    * bitsandbytes ``bitsandbytes/optim/optimizer.py`` (``Optimizer8bit.get_state_buffer``,
      ``prefetch_state`` before each parameter's update), ``bitsandbytes/functional.py``
      (``get_paged``), ``csrc/pythonInterface.cpp`` (``cudaMallocManaged``,
      ``cudaMemPrefetchAsync``); ``bitsandbytes/optim/adamw.py`` ``PagedAdamW`` defaults (lr 1e-3,
      betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2). Shared docs/reference.md §3.

Deviations
    * bitsandbytes allocates the state with CUDA unified memory and lets the driver migrate pages
      (its granularity, on demand, no page-size knob); here paging is explicit: pages of
      ``page_size`` bytes, a pool of ``device_budget // page_size`` slots, LRU eviction, every
      copy counted — so the mechanism is visible and testable on a CPU. ``device_budget=None``
      (everything fits) is the "no oversubscription" case, where bitsandbytes costs nothing.
    * bitsandbytes pages only state buffers with ≥ 1e5 elements and prefetches a parameter's
      whole state before its update; here every parameter is paged and pages are faulted in
      one chunk at a time (the AdamW update is elementwise, so chunking changes no value).
    * 32-bit state only (bitsandbytes also offers 8-bit paged state).
    * On NumPy the "device" pool and the host store are both host arrays (the copies are real
      copies). On CuPy the pool is a cupy array, the host store pinned memory, and pages move on
      a side stream (``_to_device`` / ``_to_host``); each copy is waited for before use, so
      copies do not yet overlap the update (prefetching the next page would).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from minillm import backend
from minillm.optim import Optimizer, _check_hyperparameters, adamw_update
from minillm.tensor import no_grad


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
