"""Chapter 07: paged optimizers (minillm.paged_optim.PagedAdamW; docs/reference.md §3)."""
from __future__ import annotations

import numpy as np
import pytest

from minillm.model import GPT, GPTConfig
from minillm.nn import Parameter
from minillm.optim import AdamW
from minillm.paged_optim import PagedAdamW

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
IDS = np.random.default_rng(0).integers(0, 64, (4, 16))


def train(model, opt, steps: int, start: int = 0) -> list[float]:
    losses = []
    for s in range(start, start + steps):
        ids = np.roll(IDS, s, axis=1)
        opt.zero_grad()
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_bytes(model) -> int:
    return 8 * sum(p.size for p in model.parameters())  # m and v, float32


def assert_same_params(a, b) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.dtype == np.float32 and q.dtype == np.float32
        assert np.array_equal(p.data, q.data), n


def test_small_budget_bit_identical_to_adamw_with_page_traffic():
    ref, paged = GPT(TINY, seed=0), GPT(TINY, seed=0)
    page, budget = 4096, 8 * 4096
    assert budget < state_bytes(paged) // 4  # the pool holds under a quarter of the state
    opt_ref = AdamW(ref.parameters(), lr=1e-2)
    opt = PagedAdamW(paged.parameters(), lr=1e-2, page_size=page, device_budget=budget)
    assert train(ref, opt_ref, 4) == train(paged, opt, 4)
    assert_same_params(ref, paged)
    s = opt.stats()
    assert s["page_outs"] > 0 and s["page_ins"] > 0 and s["bytes_moved"] > 0
    assert s["bytes_moved"] == page * (s["page_ins"] + s["page_outs"])
    assert s["pool_pages"] == 8 and s["resident_bytes"] <= budget
    # each parameter's state spans ceil(8·numel / page_size) pages, all created once
    assert s["allocations"] == sum(-(-8 * p.size // page) for p in paged.parameters())
    # cyclic access larger than the pool: LRU re-faults every page on every later step
    assert s["page_ins"] == 3 * s["allocations"]
    sd_ref, sd = opt_ref.state_dict(), opt.state_dict()
    for i, st in sd_ref["state"].items():
        assert sd["state"][i]["step"] == st["step"] == 4
        for k in ("exp_avg", "exp_avg_sq"):
            assert sd["state"][i][k].dtype == np.float32
            assert np.array_equal(sd["state"][i][k], st[k]), (i, k)


def test_large_budget_no_page_outs_after_warmup():
    model = GPT(TINY, seed=0)
    opt = PagedAdamW(model.parameters(), lr=1e-2, page_size=8192, device_budget=10 * state_bytes(model))
    train(model, opt, 1)
    warm = opt.stats()
    assert warm["allocations"] == warm["resident_pages"] > 0 and warm["page_ins"] == 0
    train(model, opt, 3, start=1)
    s = opt.stats()
    assert s["page_outs"] == 0 and s["page_ins"] == 0 and s["bytes_moved"] == 0
    assert s["allocations"] == warm["allocations"]
    ref = GPT(TINY, seed=0)
    train(ref, AdamW(ref.parameters(), lr=1e-2), 4)
    assert_same_params(ref, model)


def test_lru_eviction_order():
    ps = [Parameter(np.full(4, float(i + 1), dtype=np.float32)) for i in range(3)]  # 32 bytes of state each
    opt = PagedAdamW(ps, lr=0.1, page_size=32, device_budget=64)  # 2 pages fit, 3 are needed
    for p in ps:
        p.grad = np.ones(4, dtype=np.float32)
    opt.step()  # create p0, p1; creating p2 evicts p0 (least recently used)
    assert (opt.stats()["allocations"], opt.stats()["page_ins"], opt.stats()["page_outs"]) == (3, 0, 1)
    opt.step()  # p0 in (evicts p1), p1 in (evicts p2), p2 in (evicts p0)
    assert (opt.stats()["page_ins"], opt.stats()["page_outs"]) == (3, 4)
    assert list(opt._resident) == [(1, 0), (2, 0)]


def test_state_dict_round_trip_resumes_identically():
    straight = GPT(TINY, seed=0)
    opt_s = PagedAdamW(straight.parameters(), lr=1e-2, page_size=4096, device_budget=12 * 4096)
    train(straight, opt_s, 6)

    first = GPT(TINY, seed=0)
    opt_1 = PagedAdamW(first.parameters(), lr=1e-2, page_size=4096, device_budget=12 * 4096)
    train(first, opt_1, 3)
    sd = opt_1.state_dict()
    for st in sd["state"].values():  # plain host arrays, AdamW's format
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and type(st["exp_avg"]) is np.ndarray
    resumed = GPT(TINY, seed=1)
    resumed.load_state_dict({k: v.copy() for k, v in first.state_dict().items()})
    opt_2 = PagedAdamW(resumed.parameters(), lr=5.0, page_size=2048, device_budget=5 * 2048)  # other paging
    opt_2.load_state_dict(sd)
    assert opt_2.param_groups[0]["lr"] == 1e-2
    train(resumed, opt_2, 3, start=3)
    assert_same_params(straight, resumed)

    # the formats are interchangeable with AdamW
    cross = GPT(TINY, seed=1)
    cross.load_state_dict({k: v.copy() for k, v in first.state_dict().items()})
    opt_a = AdamW(cross.parameters(), lr=1e-2)
    opt_a.load_state_dict(sd)
    train(cross, opt_a, 3, start=3)
    assert_same_params(straight, cross)


def test_invalid_budget_and_page_size():
    ps = [Parameter(np.zeros(10, dtype=np.float32))]
    with pytest.raises(ValueError, match=r"device_budget=1000 bytes is smaller than one page \(page_size=4096"):
        PagedAdamW(ps, page_size=4096, device_budget=1000)
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 8 bytes, got 100"):
        PagedAdamW(ps, page_size=100)
    with pytest.raises(ValueError, match="page_size"):
        PagedAdamW(ps, page_size=0)


def test_pages_per_parameter():
    p = Parameter(np.zeros(1000, dtype=np.float32))  # 8000 bytes of state
    opt = PagedAdamW([p], page_size=1024)
    p.grad = np.ones(1000, dtype=np.float32)
    opt.step()
    assert opt.stats()["allocations"] == 8 == -(-8000 // 1024)
    assert opt.stats()["state_bytes"] == 8000
