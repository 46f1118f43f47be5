"""Chapter 09: output diversity (minillm.evaluate.diversity_metrics / sample_diversity) and the
reward-model over-optimization fit (minillm.overoptimization, Gao et al. 2022)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minillm.evaluate import diversity_metrics, sample_diversity
from minillm.overoptimization import best_of_n_kl, curve_from_history, fit_overoptimization, predict

pytestmark = pytest.mark.ch09


# ------------------------------------------------------------------------------------ diversity

def test_distinct_n_and_identical_fraction_match_hand_computed_values():
    # prompt A: unigrams 1,2,3,1,2,4 -> 4 unique of 6; bigrams (1,2),(2,3),(1,2),(2,4) -> 3 of 4
    # prompt B: unigrams 5,5 -> 1 of 2; no bigram (left out of distinct-2); its samples are identical
    d = diversity_metrics([[[1, 2, 3], [1, 2, 4]], [[5], [5]]], token_entropies=[0.5, 1.0, 1.5, 0.0])
    assert d["distinct_1"] == pytest.approx((4 / 6 + 1 / 2) / 2, abs=1e-12)
    assert d["distinct_2"] == pytest.approx(0.75, abs=1e-12)
    assert d["all_identical"] == 0.5
    assert d["entropy"] == pytest.approx(0.75, abs=1e-12)
    assert (d["n_prompts"], d["n_samples"]) == (2, 2)


def test_collapsed_samples_have_distinct_one_over_n_and_all_identical():
    # n identical samples of length L: L unique tokens out of n*L -> distinct-1 = 1/n
    d = diversity_metrics([[[7, 8, 9]] * 4, [[1, 2, 3]] * 4])
    assert d["distinct_1"] == pytest.approx(0.25)
    assert d["distinct_2"] == pytest.approx(2 / 8)
    assert d["all_identical"] == 1.0
    assert math.isnan(d["entropy"])


def test_all_different_samples_have_distinct_one():
    d = diversity_metrics([[[1, 2], [3, 4], [5, 6]]])
    assert (d["distinct_1"], d["distinct_2"], d["all_identical"]) == (1.0, 1.0, 0.0)


def test_diversity_rejects_a_prompt_with_one_sample():
    with pytest.raises(ValueError, match="prompt 1 has 1 sample"):
        diversity_metrics([[[1], [2]], [[3]]])
    with pytest.raises(ValueError, match="no prompts"):
        diversity_metrics([])


def test_sample_diversity_on_a_tiny_model_is_reproducible_and_in_range():
    from minillm.model import GPT, GPTConfig
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.train("What is the capital of France? Paris. Berlin. " * 20, vocab_size=280)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0)
    qs = ["What is the capital of France?", "What is the capital of Germany?"]
    a = sample_diversity(model, tok, qs, n=3, temperature=1.0, max_new_tokens=4, seed=0)
    b = sample_diversity(model, tok, qs, n=3, temperature=1.0, max_new_tokens=4, seed=0)
    assert a == b
    assert 0.0 < a["distinct_1"] <= 1.0 and 0.0 <= a["all_identical"] <= 1.0
    assert 0.0 < a["entropy"] <= math.log(tok.vocab_size) + 1e-6
    with pytest.raises(ValueError, match="n must be"):
        sample_diversity(model, tok, qs, n=1)


# ------------------------------------------------------------------------ over-optimization fit

def test_best_of_n_kl_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5, abs=1e-12)  # 0.1931472
    np.testing.assert_allclose(best_of_n_kl(np.array([4, 8])), [math.log(4) - 0.75, math.log(8) - 0.875], atol=1e-12)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.4), ("rl", 0.8, 0.5)])
def test_fit_recovers_the_parameters_of_synthetic_curves(form, alpha, beta):
    d = np.linspace(0.05, 4.0, 40)
    r = predict(d, alpha, beta, form)
    f = fit_overoptimization(d, r, form)
    assert f["alpha"] == pytest.approx(alpha, abs=1e-9) and f["beta"] == pytest.approx(beta, abs=1e-9)
    assert f["rmse"] < 1e-9
    if form == "bon":
        assert f["d_peak"] == pytest.approx(alpha / (2 * beta)) and f["r_peak"] == pytest.approx(alpha ** 2 / (4 * beta))
        assert f["d_zero"] == pytest.approx(alpha / beta)
    else:
        assert f["d_peak"] == pytest.approx(math.exp(alpha / beta - 1)) and f["r_peak"] == pytest.approx(beta * f["d_peak"])
        assert f["d_zero"] == pytest.approx(math.exp(alpha / beta))
    # the peak is the maximum of the fitted curve
    xs = np.linspace(0.01, 10, 5000)
    assert predict(f["d_peak"], alpha, beta, form) >= predict(xs, alpha, beta, form).max() - 1e-9


def test_fit_with_noise_is_close_and_least_squares():
    rng = np.random.default_rng(0)
    d = np.linspace(0.1, 3.0, 200)
    r = predict(d, 1.0, 0.3, "bon") + rng.normal(0, 0.05, d.size)
    f = fit_overoptimization(d, r, "bon")
    assert abs(f["alpha"] - 1.0) < 0.05 and abs(f["beta"] - 0.3) < 0.03
    # least squares: nudging a parameter never lowers the residual
    base = np.mean((r - predict(d, f["alpha"], f["beta"], "bon")) ** 2)
    for da, db in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert np.mean((r - predict(d, f["alpha"] + da, f["beta"] + db, "bon")) ** 2) >= base


def test_a_rising_curve_has_no_peak():
    d = np.linspace(0.1, 2, 10)
    f = fit_overoptimization(d, 0.5 * d, "bon")
    assert f["beta"] == pytest.approx(0.0, abs=1e-9) or f["beta"] < 1e-9
    assert math.isnan(f["d_peak"]) and math.isnan(f["d_zero"])


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="form"):
        fit_overoptimization([1, 2], [0, 0], "ppo")
    with pytest.raises(ValueError, match="at least 2"):
        fit_overoptimization([1], [0], "rl")
    with pytest.raises(ValueError, match="≥ 0"):
        fit_overoptimization([-1, 1], [0, 0], "rl")
    with pytest.raises(ValueError, match="finite"):
        fit_overoptimization([1, 2], [0, float("nan")], "rl")


def test_curve_from_history_is_relative_to_the_start_and_clips_negative_kl():
    h = [{"kl": 0.0, "gold": 0.2, "rm_score": 1.0}, {"kl": -0.01, "gold": 0.3, "rm_score": 1.5},
         {"kl": 4.0, "gold": 0.1, "rm_score": 3.0}]
    c = curve_from_history(h)
    np.testing.assert_allclose(c["d"], [0.0, 0.0, 2.0])
    np.testing.assert_allclose(c["gold"], [0.0, 0.1, -0.1], atol=1e-12)
    np.testing.assert_allclose(c["proxy"], [0.0, 0.5, 2.0])
    assert c["d"].dtype == np.float64


def test_plot_overoptimization_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from minillm.report import plot_overoptimization

    d = np.linspace(0, 2, 20)
    c = {"d": d, "gold": predict(d, 1.0, 0.5, "rl"), "proxy": predict(d, 2.0, 0.1, "rl")}
    fits = {"clean": {k: fit_overoptimization(d, c[k], "rl") for k in ("gold", "proxy")}}
    p = plot_overoptimization({"clean": c}, tmp_path / "o.png", fits)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_diversity_measures_a_checkpoint_on_the_evaluators_prompts(tmp_path):
    from minillm.alignment import checkpoint_diversity, diversity_questions
    from minillm.checkpoint import save_checkpoint
    from minillm.model import GPT, GPTConfig
    from minillm.tokenizer import Tokenizer

    qs = diversity_questions(4)
    assert len(qs) == 4 and len(set(qs)) == 4 and diversity_questions(4) == qs
    tok = Tokenizer.train(" ".join(qs) * 10, vocab_size=280)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16), seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, tok)
    d = checkpoint_diversity(path, n_prompts=4, n=3, seed=5)
    model.eval()
    assert d == sample_diversity(model, tok, qs, 3, 0.7, 16, 5)
    assert d["n_prompts"] == 4 and d["n_samples"] == 3 and 0.0 < d["distinct_1"] <= 1.0
    with pytest.raises(FileNotFoundError):
        checkpoint_diversity(tmp_path / "missing.safetensors")
