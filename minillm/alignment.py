"""PPO vs DPO from one start on the same pairs, measured the same way (issue 14; chapters 08-10, 12).

Scope
    ``measure(method, ...)`` trains one aligned policy in the current process and measures it with
    one evaluator shared by both methods (``evaluate_policy``: one sample per prompt at T on
    ``n_prompts`` evenly spaced held-out-fact ("test") and train-fact ("train") prompts: gold,
    correctness, fault rates, KL to the start model, RM score; plus ``evaluate.sample_diversity``
    on a fixed prompt set). It records wall time, the process's peak resident memory
    (``bench.peak_rss_mb``, read right after training, before evaluation loads anything) and the
    models held in memory during training:

    * ``"ppo"``: policy, frozen reference, frozen reward model (a value head on the policy trunk,
      ``value_model="shared_head"``: 3 GPTs + one Linear(C, 1));
    * ``"dpo"``: the policy only (the reference's log-probabilities are precomputed before training
      and the reference is dropped: TRL ``precompute_ref_log_probs``).

    Peak memory is per process: run each method in its own process (the CLI:
    ``python -m minillm.alignment ppo --out result.json ...``) to compare them.

    Also: ``best_of_n_curve`` (gold and RM score of best-of-n against its analytic KL, for the
    over-optimization fit of ``overoptimization``), ``refusal_pair_files`` (the cautious rater's
    preference set, with and without helpfulness pairs), ``refusal_ppo_prompts`` (PPO's prompt
    pool with unanswerable questions mixed in), ``refusal_sft_file`` (SFT data of a start that
    sometimes declines), ``rm_prefers_refusal`` (how often a reward model
    ranks declining above answering) and ``refusal_rates`` (over-refusal on answerable questions,
    correct refusal on unanswerable ones).

Sources
    Rafailov et al. 2023 (DPO) §1/§6 ("stable, performant and computationally lightweight");
    Ouyang et al. 2022 (InstructGPT) §3.5 (PPO with a reward model and a KL penalty). The PPO and
    DPO implementations are ``train.ppo`` and ``train.dpo``; see their sources.

Deviations
    * Both methods are evaluated at the PPO sampling temperature (0.7) with one sample per prompt,
      not greedy: the KL column is then an unbiased estimate for both (docs/bugs.md B18).
    * DPO's and the RM's pairs are drawn over all prompts, held-out facts included (the world's
      design: the test split holds out pairs, not facts), so "test" gold measures prompts whose
      correct answer appeared in preference data, for both methods alike.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _select(records: list, n: int) -> list:
    if n >= len(records):
        return list(records)
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def evaluate_policy(model, tokenizer, reference=None, reward_model=None, n_prompts: int = 200,
                    temperature: float = 0.7, seed: int = 0, diversity_prompts: int = 32, diversity_n: int = 8) -> dict:
    """The shared evaluator: ``train.dpo.policy_eval`` at ``temperature`` on ``n_prompts`` held-out-fact
    ("test") and train-fact ("train") prompts (gold, exact_match, fault rates, KL to ``reference``
    in nats summed per response, ``rm_score``), and ``evaluate.sample_diversity`` (``diversity_n``
    samples on ``diversity_prompts`` held-out-fact prompts). Returns a JSON-able dict."""
    from minillm.evaluate import sample_diversity
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world
    from minillm.train.dpo import policy_eval

    world = default_world()
    judge = GoldJudge(world)
    out = {}
    for split, recs in (("test", world.sft_test_records()), ("train", world.sft_records("plain"))):
        d = policy_eval(model, tokenizer, _select(recs, n_prompts), judge, temperature, seed, 16,
                        reference=reference, reward_model=reward_model)
        d.pop("samples", None)
        if reference is None:
            d["kl"] = 0.0  # the start model itself
        out[split] = d
    out["diversity"] = sample_diversity(model, tokenizer, diversity_questions(diversity_prompts), diversity_n,
                                        temperature, 16, seed)
    return out


def diversity_questions(n_prompts: int = 32) -> list[str]:
    """The fixed prompt set of the diversity measurements: ``n_prompts`` evenly spaced held-out-fact
    questions of the built-in world (``evaluate_policy`` and ``checkpoint_diversity`` share it)."""
    from minillm.tasks import default_world

    return [r["instruction"] for r in _select(default_world().sft_test_records(), n_prompts)]


def checkpoint_diversity(checkpoint, n_prompts: int = 32, n: int = 8, temperature: float = 0.7,
                         seed: int = 1234) -> dict:
    """``evaluate.sample_diversity`` of a checkpoint on ``diversity_questions(n_prompts)``: ``n`` samples
    per prompt at ``temperature``, with the seed ``measure`` uses (1234), so that a base or SFT model
    is measured exactly as the start and the aligned policies are (issue 14: diversity before and
    after SFT). Raises FileNotFoundError for a missing checkpoint."""
    from minillm.checkpoint import load_model
    from minillm.evaluate import sample_diversity

    model, tok, _ = load_model(checkpoint, config_overrides={"dropout": 0.0})
    model.eval()
    return sample_diversity(model, tok, diversity_questions(n_prompts), n, temperature, 16, seed)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (s): on a shared machine a fairer cost than wall time
    for single-threaded NumPy (OPENBLAS_NUM_THREADS=1)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(method: str, sft: str, reward_model: str, out_dir: str, seed: int = 0, recipe: str = "clean",
            beta: float | None = None, iterations: int = 60, steps: int = 100, n_prompts: int = 200,
            evaluate_start: bool = False, data: str = "builtin", refusal: bool = False, prompts: str = "world") -> dict:
    """Train ``method`` ("ppo" or "dpo") from ``sft`` and measure it (see the module docstring).

    Args:
        sft: start checkpoint (policy init and reference); reward_model: the RM checkpoint (PPO's
            reward; for DPO only used to score the outputs); recipe: DPO's built-in pair recipe
            (the RM's recipe, so both learn from the same pairs); beta: PPO's KL coefficient
            (default 0.1) or DPO's β (default 0.1); iterations: PPO iterations; steps: DPO steps.
        evaluate_start: also evaluate the start model (KL 0) under the same evaluator.
        data: DPO's preference file ("builtin": the pairs of ``recipe``); refusal: also measure
            ``refusal_rates`` (greedy) of the start and the trained policy; prompts: PPO's prompt
            pool ("world": the answerable fact prompts; or a file, e.g. ``refusal_ppo_prompts``).
    Returns:
        dict: method, seed, beta, train_seconds (wall), train_cpu_seconds (user + system CPU time
        of the process, the fairer cost on a shared machine), peak_rss_mb (after training), models_in_memory,
        trainable_parameters, start/end evaluations, and for PPO the per-iteration history
        (rm_score, gold, correct, kl) for the over-optimization curve.
    Raises:
        ValueError: unknown method.
    """
    from minillm.bench import peak_rss_mb
    from minillm.checkpoint import load_model
    from minillm.train.reward import load_reward_model

    if method not in ("ppo", "dpo"):
        raise ValueError(f"method must be 'ppo' or 'dpo', got {method!r}")
    beta = 0.1 if beta is None else float(beta)
    res: dict = {"method": method, "seed": seed, "beta": beta, "sft": sft, "reward_model": reward_model}
    rss0 = peak_rss_mb()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if method == "ppo":
        from minillm.train.ppo import PPOConfig, ppo

        cfg = PPOConfig(sft=sft, reward=reward_model, out_dir=out_dir, seed=seed, beta=beta, iterations=iterations,
                        eval_prompts=0, progress=False, prompts=prompts)
        r = ppo(cfg)
        res["models_in_memory"] = "policy + reference + reward model (3 GPTs) + value head"
        res["history"] = [{k: h.get(k) for k in ("iteration", "rm_score", "score", "gold", "correct", "kl",
                                                  "entropy", "opener_rate", "response_length")} for h in r.history]
        res["score_norm"] = r.metrics.get("score_norm")
        ckpt = r.checkpoint
    else:
        from minillm.train.dpo import DPOConfig, dpo

        cfg = DPOConfig(sft=sft, data=data, recipe=recipe, out_dir=out_dir, seed=seed, beta=beta, max_steps=steps, eval=False,
                        progress=False)
        r = dpo(cfg)
        res["models_in_memory"] = "policy (1 GPT; reference log-probs precomputed, then the reference dropped)"
        res["final"] = r.metrics.get("final")
        ckpt = r.checkpoint
    res["train_seconds"] = round(time.perf_counter() - t0, 1)
    res["train_cpu_seconds"] = round(_cpu_seconds() - cpu0, 1)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["peak_rss_mb_before_training"] = round(rss0, 1)
    policy, tok, _ = load_model(ckpt, config_overrides={"dropout": 0.0})
    reference, _, _ = load_model(sft, config_overrides={"dropout": 0.0})
    rm, _ = load_reward_model(reward_model)
    policy.eval()
    reference.eval()
    res["trainable_parameters"] = policy.num_parameters()
    if evaluate_start:
        res["start"] = evaluate_policy(reference, tok, None, rm, n_prompts, seed=1234)
    res["end"] = evaluate_policy(policy, tok, reference, rm, n_prompts, seed=1234)
    if refusal:
        res["refusal_start"] = refusal_rates(reference, tok)
        res["refusal_end"] = refusal_rates(policy, tok)
    return res


def best_of_n_curve(sft: str, reward_model: str, n_max: int = 8, n_prompts: int = 160, temperature: float = 0.7,
                    seed: int = 0) -> dict:
    """Best-of-n against the analytic KL: for n = 1, 2, 4, ..., ``n_max`` the held-out-fact response the
    RM scores highest among the first n samples (same samples for every n), its gold and RM score.

    Returns {"n": [...], "kl": [log n − (n−1)/n], "d": [√KL], "gold": [...], "proxy": [...],
    "correct": [...]} (means over ``n_prompts`` evenly spaced held-out-fact prompts).
    Source: Nakano et al. 2021 (WebGPT) §3; Gao et al. 2022 §2 (KL of best-of-n).
    """
    from minillm.checkpoint import load_model
    from minillm.evaluate import generate_responses, prompt_ids_for
    from minillm.overoptimization import best_of_n_kl
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world
    from minillm.train.reward import load_reward_model, score_responses

    policy, tok, _ = load_model(sft, config_overrides={"dropout": 0.0})
    policy.eval()
    rm, _ = load_reward_model(reward_model)
    world = default_world()
    judge = GoldJudge(world)
    recs = _select(world.sft_test_records(), n_prompts)
    qs = [r["instruction"] for r in recs]
    prompts = [prompt_ids_for(tok, q, (), policy.config.block_size - 16)[0] for q in qs]
    rng = np.random.default_rng([seed, 15])
    gens = [generate_responses(policy, tok, prompts, 16, temperature=temperature, rng=rng) for _ in range(n_max)]
    scores = np.stack([score_responses(rm, tok, qs, [g.text for g in s], [g.ended for g in s]) for s in gens])
    golds = np.array([[judge.score(q, g.text, g.ended).total for q, g in zip(qs, s)] for s in gens])
    corr = np.array([[judge.score(q, g.text, g.ended).correct for q, g in zip(qs, s)] for s in gens])
    out: dict = {"n": [], "kl": [], "d": [], "gold": [], "proxy": [], "correct": []}
    n = 1
    cols = np.arange(len(qs))
    while n <= n_max:
        best = scores[:n].argmax(axis=0)
        kl = best_of_n_kl(n)
        out["n"].append(n)
        out["kl"].append(kl)
        out["d"].append(float(np.sqrt(kl)))
        out["gold"].append(float(golds[best, cols].mean()))
        out["proxy"].append(float(scores[best, cols].mean()))
        out["correct"].append(float(corr[best, cols].mean()))
        n *= 2
    return out


def refusal_pair_files(out_dir, n_unanswerable: int = 600, n_overcautious: int = 600, n_helpful: int = 600
                       ) -> dict:
    """Write the over-refusal preference sets as JSONL (issue 14) and return their paths.

    ``cautious.jsonl``: the "clean" recipe's pairs without the ``off_format`` kind (whose "I do not
    know." rejections on answerable prompts would be helpfulness pairs already) plus a cautious rater's
    ``tasks.TaskWorld.refusal_pair_records`` (``n_unanswerable`` refusals of fictional entities,
    ``n_overcautious`` refusals of answerable questions); ``cautious_helpful.jsonl``: the same plus
    ``n_helpful`` helpfulness pairs (the correct answer over ``facts.REFUSAL``). Measured with DPO
    from the noisy SFT model (greedy, issue 14): 600 helpfulness pairs cut refusal attempts on
    answerable questions from 17.5 % to 9.5 % and kept 65 % on unanswerable ones (72.5 % without);
    1200 removed refusals everywhere (0 % and 0 %).
    """
    import dataclasses

    from minillm.checkpoint import write_text_atomic
    from minillm.preferences import PREFERENCE_RECIPES
    from minillm.tasks import default_world

    world = default_world()
    cfg = PREFERENCE_RECIPES["clean"]
    cfg = dataclasses.replace(cfg, kind_weights=tuple((k, w) for k, w in cfg.kind_weights if k != "off_format"))
    base = world.preference_records("train", cfg)
    cautious = world.refusal_pair_records(n_unanswerable, n_overcautious, 0)
    helpful = [r for r in world.refusal_pair_records(0, 0, n_helpful)]
    out = Path(out_dir)
    paths = {}
    for name, recs in (("cautious", base + cautious), ("cautious_helpful", base + cautious + helpful)):
        rng = np.random.default_rng([0, 16])
        recs = [recs[int(i)] for i in rng.permutation(len(recs))]
        paths[name] = str(write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs)))
    return paths


def refusal_ppo_prompts(out_dir, unanswerable_fraction: float = 0.25) -> str:
    """Write PPO's prompt pool for over-refusal (issue 14) as text, one prompt per line, and return its path.

    The world's 1,610 answerable fact prompts (``train.ppo.world_prompts``) and the 90 unanswerable
    questions about the train-split fictional entities (``tasks.TaskWorld.unanswerable_records``,
    the entities of the cautious rater's pairs), repeated so that about ``unanswerable_fraction``
    of the pool is unanswerable (0.25: each 6 times, 540 of 2,150). The held-out fictional entities
    stay out of training: ``refusal_rates`` measures correct refusal on them.

    Raises ValueError when ``unanswerable_fraction`` is not in (0, 1).
    """
    from minillm.checkpoint import write_text_atomic
    from minillm.tasks import default_world
    from minillm.train.ppo import world_prompts

    if not 0.0 < unanswerable_fraction < 1.0:
        raise ValueError(f"unanswerable_fraction must be in (0, 1), got {unanswerable_fraction}")
    answerable, _ = world_prompts()
    unknown = [r["instruction"] for r in default_world().unanswerable_records("train")]
    k = max(1, round(unanswerable_fraction / (1 - unanswerable_fraction) * len(answerable) / len(unknown)))
    lines = answerable + unknown * k
    return str(write_text_atomic(Path(out_dir) / "ppo_prompts.txt", "".join(q + "\n" for q in lines)))


def refusal_sft_file(out_dir) -> str:
    """Write the SFT data of a start that sometimes declines (issue 14, a change of the world) as
    Alpaca JSONL and return its path: the noisy SFT demonstrations (``tasks.TaskWorld.sft_records``
    "noisy", 1,125 rows) and "I do not know." on each of the 90 questions about the train-split
    fictional entities (``unanswerable_records("train")``), shuffled (seeded). Why: the noisy SFT
    model never samples a refusal (0 of 720 samples at T = 0.7 on those questions), so PPO, which
    learns only from its own samples, cannot meet one; real SFT data holds such demonstrations."""
    from minillm.checkpoint import write_text_atomic
    from minillm.tasks import default_world

    world = default_world()
    recs = world.sft_records("noisy") + world.unanswerable_records("train")
    order = np.random.default_rng([0, 18]).permutation(len(recs))
    text = "".join(json.dumps({k: recs[int(i)][k] for k in ("instruction", "input", "output")}) + "\n" for i in order)
    return str(write_text_atomic(Path(out_dir) / "sft_refusal_demos.jsonl", text))


def rm_prefers_refusal(reward_model: str, n_answerable: int = 200) -> dict:
    """How a reward model ranks ``facts.REFUSAL`` (issue 14): on ``n_answerable`` evenly spaced
    held-out-fact prompts, the fraction where r(REFUSAL) > r(the correct answer); on the
    unanswerable prompts about held-out fictional entities, the fraction where r(REFUSAL) > r(a
    real capital or sound of the same relation, the first answer of that relation in the world).
    Returns {"answerable": float, "unanswerable": float}."""
    from minillm.facts import REFUSAL
    from minillm.tasks import default_world
    from minillm.train.reward import load_reward_model, score_responses

    rm, tok = load_reward_model(reward_model)
    world = default_world()
    known = _select(world.sft_test_records(), n_answerable)
    unknown = world.unanswerable_records("test")
    first = {}
    for f in world.facts:
        first.setdefault(f.relation, f.answer)
    out = {}
    for name, recs, alt in (("answerable", known, [r["answer"] for r in known]),
                            ("unanswerable", unknown, [first[r["task"]] for r in unknown])):
        qs = [r["instruction"] for r in recs]
        ref = score_responses(rm, tok, qs, [REFUSAL] * len(qs))
        other = score_responses(rm, tok, qs, [f"{a}." for a in alt])
        out[name] = float(np.mean(ref > other))
    return out


def refusal_rates(model, tokenizer, n_answerable: int = 200, temperature: float = 0.0, seed: int = 0) -> dict:
    """Refusal rate (``facts.is_refusal``) and gold on answerable held-out-fact prompts (over-refusal),
    on unanswerable prompts about held-out fictional entities (correct refusal) and on the fictional
    entities of the cautious rater's pairs ("unanswerable_train"). Greedy by default.
    ``refusal_attempt_rate`` counts responses that start declining ("I don", "I do not"), even
    when the small model garbles the rest ("I donkey.")."""
    from minillm.evaluate import generate_responses, prompt_ids_for
    from minillm.facts import is_refusal, strip_response
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world

    world = default_world()
    judge = GoldJudge(world)
    sets = {"answerable": _select(world.sft_test_records(), n_answerable),
            "unanswerable": world.unanswerable_records("test"),
            "unanswerable_train": world.unanswerable_records("train")}
    rng = np.random.default_rng([seed, 17]) if temperature > 0 else None
    out = {}
    for name, recs in sets.items():
        prompts = [prompt_ids_for(tokenizer, r["instruction"], (), model.config.block_size - 16)[0] for r in recs]
        gens = generate_responses(model, tokenizer, prompts, 16, temperature=temperature, rng=rng)
        attempts = [strip_response(g.text).lower().startswith(("i don", "i do not")) for g in gens]
        out[name] = {"refusal_rate": float(np.mean([is_refusal(g.text) for g in gens])),
                     "refusal_attempt_rate": float(np.mean(attempts)),
                     "gold": float(np.mean([judge.score(r["instruction"], g.text, g.ended).total
                                            for r, g in zip(recs, gens)])), "n": len(recs),
                     "samples": [(r["instruction"], g.text) for r, g in zip(recs[:3], gens[:3])]}
    return out


def main(argv=None) -> int:
    """``python -m minillm.alignment {ppo,dpo,bon} --sft ... --reward-model ... --out result.json``."""
    p = argparse.ArgumentParser(prog="python -m minillm.alignment", description=__doc__.split("\n")[0])
    p.add_argument("method", choices=("ppo", "dpo", "bon", "refusal-data"))
    p.add_argument("--sft", required=True, help="start checkpoint (policy init and reference)")
    p.add_argument("--reward-model", required=True, help="reward-model checkpoint")
    p.add_argument("--out-dir", required=True, help="training output directory")
    p.add_argument("--out", required=True, help="JSON file for the measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default="clean", help="DPO's built-in pair recipe (default: clean)")
    p.add_argument("--data", default="builtin", help="DPO's preference file (default: builtin pairs of --recipe)")
    p.add_argument("--refusal", action="store_true", help="also measure refusal rates before and after")
    p.add_argument("--prompts", default="world", help="PPO's prompt pool: world (answerable facts) or a file")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (PPO) or DPO beta (default 0.1)")
    p.add_argument("--iterations", type=int, default=60, help="PPO iterations (default 60)")
    p.add_argument("--steps", type=int, default=100, help="DPO steps (default 100)")
    p.add_argument("--n-prompts", type=int, default=200, help="evaluation prompts per split (default 200)")
    p.add_argument("--evaluate-start", action="store_true", help="also evaluate the start model")
    a = p.parse_args(argv)
    if a.method == "refusal-data":
        print(refusal_pair_files(a.out_dir))
        return 0
    if a.method == "bon":
        res = best_of_n_curve(a.sft, a.reward_model, seed=a.seed)
        from minillm.checkpoint import write_json_atomic

        write_json_atomic(Path(a.out), res)
        print(json.dumps(res))
        return 0
    res = measure(a.method, a.sft, a.reward_model, a.out_dir, a.seed, a.recipe, a.beta, a.iterations, a.steps,
                  a.n_prompts, a.evaluate_start, a.data, a.refusal, a.prompts)
    from minillm.checkpoint import write_json_atomic

    write_json_atomic(Path(a.out), res)
    print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
