"""The stages of ``minillm pipeline``: what each one trains or measures (chapter 12; the driver is ``pipeline.py``).

Scope
    One function per stage, ``stage_<name>(ctx) -> summary dict``, in the order of
    ``pipeline.STAGES``: pretraining, prompting the base model, the five SFT variants, the reward
    model, best-of-n, the three PPO runs, DPO; issue 14's alignment from one start (the clean reward
    model, PPO with it and DPO on the same pairs, each in its own process, best-of-n with it; opt-in:
    PPO β = 0 with it and over-refusal with DPO and with reward model + PPO); GRPO (chapter 14) and chapter 13's retrieval arms. Each stage
    reads the checkpoints of the stages before it through ``ctx.path(stage)`` and returns what the
    report needs; ``pipeline.run_stage`` caches, fingerprints and times it.

Sources
    The recipes are the measured ones of docs/task-world.md and docs/rlhf-notes.md (see each
    train/*.py); best-of-n: Nakano et al. 2021 (WebGPT) §3 / Gao et al. 2022 §3.

Deviations
    See ``pipeline.py``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: pipeline.py imports this module for its stage table
    from minillm.pipeline import Context


def stage_pretrain(ctx: Context) -> dict:
    from minillm.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(corpus=ctx.cfg.corpus, out_dir=str(ctx.dir / "pretrain"), seed=ctx.cfg.seed,
                         vocab_size=ctx.steps(1024, 512),
                         max_steps=ctx.steps(1200, 30), eval_interval=ctx.steps(300, 15),
                         checkpoint_interval=ctx.steps(300, 15), progress=ctx.cfg.progress, resume=True)
    res = pretrain(cfg)
    return {"checkpoint": res.checkpoint, "losses": res.train_losses, "val_losses": res.val_losses,
            "seconds": res.seconds, "n_tokens": res.n_tokens}


def _sft_cfg(ctx: Context, out: str, **kw):
    from minillm.train.sft import SFTConfig

    base = dict(base=str(ctx.path("pretrain")), data=ctx.cfg.sft_data, out_dir=str(ctx.dir / out),
                max_steps=ctx.steps(150, 8), seed=ctx.cfg.seed, eval_max_prompts=ctx.eval_prompts,
                progress=ctx.cfg.progress, eval_base=False, variant="plain")
    base.update(kw)
    return SFTConfig(**base)


def _sft_summary(res) -> dict:
    return {"checkpoint": res.checkpoint, "losses": res.losses, "metrics": res.metrics, "seconds": res.seconds}


def stage_prompting(ctx: Context) -> dict:
    """The base model asked zero-shot and 3-shot (chapter 03): EM, contains, format."""
    if not ctx.builtin:
        return {"skipped": "prompting is measured on the built-in world only"}
    from minillm.checkpoint import load_model
    from minillm.train.sft import world_eval

    t0 = time.perf_counter()
    model, tok, _ = load_model(ctx.path("pretrain"))
    cfg = _sft_cfg(ctx, "prompting")
    out = {"zero_shot": world_eval(model, tok, cfg, 0, splits=("test",))["test"],
           "three_shot": world_eval(model, tok, cfg, 3, splits=("test",))["test"]}
    out["seconds"] = time.perf_counter() - t0
    return out


def stage_sft(ctx: Context) -> dict:
    from minillm.train.sft import sft

    return _sft_summary(sft(_sft_cfg(ctx, "sft")))


def stage_sft_lora(ctx: Context) -> dict:
    from minillm.train.sft import sft

    return _sft_summary(sft(_sft_cfg(ctx, "sft_lora", lora=True, lr=3e-3)))


def stage_sft_qlora(ctx: Context) -> dict:
    from minillm.train.sft import sft

    return _sft_summary(sft(_sft_cfg(ctx, "sft_qlora", qlora=True, lr=2e-3)))


def stage_sft_opener(ctx: Context) -> dict:
    """SFT where 25 % of the demonstrations open with "Sure!" (docs/rlhf-notes.md §2, SFT "a"): the start of
    best-of-n and PPO, so the policy can produce the cue the reward model over-values."""
    from minillm.train.sft import sft

    if not ctx.builtin:
        return {"skipped": "the \"Sure!\"-demo variant exists only for the built-in world (PPO starts from sft)"}
    return _sft_summary(sft(_sft_cfg(ctx, "sft_opener", variant="opener", max_steps=ctx.steps(200, 8))))


def stage_sft_noisy(ctx: Context) -> dict:
    """SFT on demonstrations of which ~20 % ramble or are rude (as real SFT data): DPO's start."""
    from minillm.train.sft import sft

    if not ctx.builtin:
        return {"skipped": "the noisy-demo variant exists only for the built-in world (DPO starts from sft)"}
    return _sft_summary(sft(_sft_cfg(ctx, "sft_noisy", variant="noisy", max_steps=ctx.steps(200, 8))))


def stage_reward(ctx: Context) -> dict:
    """A Bradley-Terry reward model initialised from the SFT model, on preference pairs of recipe "a"
    (docs/task-world.md §7: 20 % wrong-fact rejections; the chosen answer carries the "Sure!" cue 80 % of
    the time, the rejected one 20 %), which gave the stronger held-out accuracy on this world."""
    from minillm.train.reward import RewardConfig, reward

    cfg = RewardConfig(sft=str(ctx.path("sft")), data=ctx.cfg.pref_data, recipe="a", out_dir=str(ctx.dir / "reward"),
                       max_steps=ctx.steps(250, 6), seed=ctx.cfg.seed, progress=ctx.cfg.progress,
                       cue_prompts=ctx.steps(200, 16))
    res = reward(cfg)
    return {"checkpoint": res.checkpoint, "losses": res.losses, "metrics": res.metrics, "seconds": res.seconds}


def stage_best_of_n(ctx: Context) -> dict:
    """Sample n responses per held-out prompt, keep the one the reward model scores highest."""
    if not ctx.builtin or "checkpoint" not in ctx.summaries.get("reward", {}):
        return {"skipped": "best-of-n needs the built-in world and a reward model"}
    from minillm.checkpoint import load_model
    from minillm.data import render_prompt
    from minillm.evaluate import generate_responses, score_generations
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world
    from minillm.train.reward import load_reward_model, reward_scores

    t0 = time.perf_counter()
    policy, tok, _ = load_model(ctx.path("sft_opener"))
    rm, _ = load_reward_model(ctx.path("reward"))
    world = default_world()
    judge = GoldJudge(world)
    recs = world.sft_test_records()
    k = ctx.eval_prompts or 160
    recs = [recs[int(i)] for i in np.linspace(0, len(recs) - 1, min(k, len(recs))).round().astype(int)]
    prompts = [render_prompt([{"role": "user", "content": r["instruction"]}], tok) for r in recs]
    rng = np.random.default_rng(ctx.cfg.seed)
    n_max = 8
    samples = [generate_responses(policy, tok, prompts, 16, temperature=0.7, rng=rng) for _ in range(n_max)]
    scores = []
    for s in samples:
        seqs = [p + g.ids for p, g in zip(prompts, s)]
        ids, mask = _right_pad(seqs, tok.pad_id)
        scores.append(reward_scores(rm, ids, mask))
    scores = np.stack(scores)  # (n_max, P)
    out = {"n": {}}
    for n in (1, 2, 4, 8):
        best = scores[:n].argmax(axis=0)
        gens = [samples[int(b)][i] for i, b in enumerate(best)]
        res = score_generations(recs, gens, judge)
        out["n"][n] = {"rm_score": float(scores[:n].max(axis=0).mean()), **res.metrics}
    out["seconds"] = time.perf_counter() - t0
    return out


def _right_pad(seqs, pad_id):
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def _ppo_stage(ctx: Context, out: str, **kw) -> dict:
    """PPO from the SFT model against the reward model (or the gold judge), docs/rlhf-notes.md §6 recipe."""
    from minillm.train.ppo import PPOConfig, ppo

    reward = kw.pop("reward", None) or str(ctx.path("reward"))
    if reward == "gold" and not ctx.builtin:
        return {"skipped": f"{out}: the gold judge exists only for the built-in world"}
    quick = dict(batch_size=8, eval_prompts=8, score_norm_samples=16, ppo_epochs=1) if ctx.cfg.quick else {}
    sft = kw.pop("sft", None) or str(ctx.path("sft_opener" if ctx.builtin else "sft"))
    cfg = PPOConfig(sft=sft, reward=reward,
                    out_dir=str(ctx.dir / out), seed=ctx.cfg.seed,
                    iterations=ctx.steps(60, 2), progress=ctx.cfg.progress,
                    prompts="world" if ctx.builtin else ctx.cfg.pref_data, **quick, **kw)
    res = ppo(cfg)
    return {"checkpoint": res.checkpoint, "history": res.history, "metrics": res.metrics, "seconds": res.seconds}


def stage_ppo(ctx: Context) -> dict:
    return _ppo_stage(ctx, "ppo", beta=0.1)


def stage_ppo_beta0(ctx: Context) -> dict:
    return _ppo_stage(ctx, "ppo_beta0", beta=0.0)


def stage_ppo_gold(ctx: Context) -> dict:
    return _ppo_stage(ctx, "ppo_gold", beta=0.1, reward="gold")


def stage_dpo(ctx: Context) -> dict:
    """DPO from the SFT model trained on noisy demonstrations, on the same preference pairs."""
    from minillm.train.dpo import DPOConfig, dpo

    start = ctx.path("sft_noisy") if ctx.builtin else ctx.path("sft")
    cfg = DPOConfig(sft=str(start), data=ctx.cfg.pref_data, out_dir=str(ctx.dir / "dpo"),
                    max_steps=ctx.steps(100, 4), seed=ctx.cfg.seed, progress=ctx.cfg.progress,
                    eval_prompts=ctx.steps(200, 8), reward_model=str(ctx.path("reward")))
    res = dpo(cfg)
    return {"checkpoint": res.checkpoint, "losses": [h.get("loss") for h in res.history], "history": res.history,
            "metrics": res.metrics, "seconds": res.seconds}


def stage_grpo(ctx: Context) -> dict:
    """GRPO (chapter 14) on the verifiable addition task (``verifiable.AdditionTask``): a brief SFT start of
    its own (``verifiable.sft_start``, kept in ``grpo/`` under a name holding seed and steps), then
    GRPO with the accuracy reward, β = 0 (no reference model held), ``loss_type`` "dapo". The stage
    is the notebook's recipe for seed 0 (1,200 SFT steps, 150 iterations of 16 prompts × G = 8, two
    minibatch steps each, lr 5e-5) with 200 held-out problems instead of 815: it shows the method in
    the table, the notebook measures it. Skipped with user SFT or preference data: GRPO needs a
    reward a program checks, which those files do not carry."""
    if not ctx.builtin:
        return {"skipped": "grpo trains on the built-in addition task, whose answers a program checks; "
                           "user SFT/preference data has no such checker"}
    from minillm.train.grpo import GRPOConfig, grpo

    steps = ctx.steps(1200, 20)
    cfg = GRPOConfig(sft=str(ctx.dir / "grpo" / f"sft-seed{ctx.cfg.seed}-steps{steps}.safetensors"),
                     sft_steps=steps, out_dir=str(ctx.dir / "grpo"), iterations=ctx.steps(150, 2),
                     num_mini_batches=ctx.steps(2, 1),
                     prompts_per_iteration=ctx.steps(16, 4), eval_prompts=ctx.steps(200, 16),
                     seed=ctx.cfg.seed, progress=ctx.cfg.progress)
    res = grpo(cfg)
    return {"checkpoint": res.checkpoint, "history": res.history, "metrics": res.metrics, "seconds": res.seconds}


# ------------------------------------------------------------------ chapter 13: retrieval vs fine-tuning

#: Paraphrase counts of the stage's continued-pretraining arm (the notebook runs the whole curve 1, 3, 10, 30).
RAG_CURVE_NS = (1, 30)


def stage_rag(ctx: Context) -> dict:
    """Chapter 13's arms (``rag_experiments.run_chapter``) on the pipeline's own ``pretrain`` and ``sft`` models, at the
    chapter's quick step counts (``rag_experiments.QUICK_STEPS``) in every pipeline so that the stage stays cheap: retriever
    recall, closed book, oracle context, RAG on the plain SFT model, QA fine-tuning (full, LoRA), the
    RAFT-style reader with RAG, QA fine-tuning + RAG, continued pretraining with 1 and 30 paraphrases, and
    updating one fact. Its results live in ``rag/results/``, cleared whenever the stage runs (``run_chapter``'s
    JSON caches are keyed on the checkpoint paths, which stay the same when ``sft`` is rebuilt); the summary
    keeps the decision table and the key numbers. The notebook (chapter 13) runs the chapter's full step counts;
    quick step counts train too little for its claims. Skipped with user SFT data (the knowledge world
    extends the built-in one)."""
    if not ctx.builtin:
        return {"skipped": "rag measures new knowledge of the built-in world; user SFT data has none"}
    import shutil

    from minillm import rag_experiments

    t0 = time.perf_counter()
    out = ctx.dir / "rag" / "results"
    shutil.rmtree(out, ignore_errors=True)
    res = rag_experiments.run_chapter(ctx.cfg.runs_dir, quick=True, seed=ctx.cfg.seed, curve_ns=RAG_CURVE_NS,
                          sft_checkpoint=ctx.path("sft"), base_checkpoint=ctx.path("pretrain"), out_dir=out)
    arms = {a: {k: {m: v[k][m] for m in ("exact_match", "format_compliance", "abstain_rate", "prompt_tokens")}
                for k in ("new", "updated", "old", "absent") if k in v}
            for a, v in res["arms"].items() if not a.startswith("_")}
    curve = {n: {k: c[k]["exact_match"] for k in ("new", "updated", "old")} | {"seconds": c["cpt_seconds"] + c["sft_seconds"]}
             for n, c in res["curve"].items()}
    u = res["update"]
    return {"recall_at_1": res["retrieval"]["recall"]["bm25_lucene"]["knowledge"]["1"], "arms": arms,
            "train": res["arms"]["_train"], "curve": curve, "table": res["table"],
            "update": {"rag_seconds": u["rag"]["seconds"], "finetune_seconds": u["finetune"]["seconds"],
                       "finetune_other_capitals_leak": u["finetune"]["other_capitals_answering_new_value"]},
            "steps": rag_experiments.QUICK_STEPS, "seconds": time.perf_counter() - t0}


# ------------------------------------------- issue 14: alignment that works, from one start
# The noisy SFT model (``sft_noisy``: real faults, no "Sure!" habit) is the one start of everything
# below; the clean reward model learns from the pairs of recipe "clean" (tasks.PREFERENCE_RECIPES:
# the preference carries only what the gold judge values), and DPO learns from the same pairs.


def _clean_skip(ctx: Context, stage: str) -> dict | None:
    if not ctx.builtin:
        return {"skipped": f"{stage}: the clean pairs, the noisy SFT start and the gold judge exist only "
                           "for the built-in world"}
    return None


def stage_reward_clean(ctx: Context) -> dict:
    """A Bradley-Terry reward model from the noisy SFT model on the pairs of recipe "clean" (no cue:
    half the rejections are wrong facts, the rest ramble, repeat, are rude or off-format)."""
    if (skip := _clean_skip(ctx, "reward_clean")):
        return skip
    from minillm.train.reward import RewardConfig, reward

    cfg = RewardConfig(sft=str(ctx.path("sft_noisy")), recipe="clean", out_dir=str(ctx.dir / "reward_clean"),
                       max_steps=ctx.steps(250, 6), seed=ctx.cfg.seed, progress=ctx.cfg.progress, cue_prompts=0)
    res = reward(cfg)
    return {"checkpoint": res.checkpoint, "losses": res.losses, "metrics": res.metrics, "seconds": res.seconds}


def child_env() -> dict:
    """This process's environment with this checkout first on PYTHONPATH, for a ``python -m minillm...``
    child (a stage, or one alignment run) that must import the same minillm as its parent."""
    import os

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _alignment_subprocess(method: str, out: Path, **kw) -> dict:
    """``python -m minillm.alignment <method> ...`` in its own process (so its peak resident memory is
    its own), returning the JSON it writes. kw: CLI options (True → a bare flag). Raises
    RuntimeError with the child's last output when it fails."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "minillm.alignment", method, "--out", str(out)]
    for k, v in kw.items():
        if v is True:
            args.append(f"--{k.replace('_', '-')}")
        elif v is not False and v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    p = subprocess.run(args, env=child_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[1:5])} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(out.read_text())


def stage_align_clean(ctx: Context) -> dict:
    """PPO (β = 0.1, the clean reward model) and DPO (β = 0.1, the same clean pairs) from the noisy SFT
    model, each in its own process (``alignment.measure``: one evaluator for both, wall and CPU time,
    peak RSS, models held); the start is evaluated once by the same evaluator; the output diversity
    of the base model and of full SFT (``alignment.checkpoint_diversity``, the same prompts and
    sampling) in ``sft_diversity``: diversity before and after SFT."""
    if (skip := _clean_skip(ctx, "align_clean")):
        return skip
    d = ctx.dir / "align_clean"
    d.mkdir(parents=True, exist_ok=True)
    common = dict(sft=ctx.path("sft_noisy"), reward_model=ctx.path("reward_clean"), seed=ctx.cfg.seed,
                  n_prompts=ctx.steps(200, 8))
    out = {"ppo": _alignment_subprocess("ppo", d / "ppo.json", out_dir=d / "ppo", iterations=ctx.steps(60, 2),
                                        **common),
           "dpo": _alignment_subprocess("dpo", d / "dpo.json", out_dir=d / "dpo", steps=ctx.steps(100, 4),
                                        recipe="clean", evaluate_start=True, **common)}
    out["start"] = out["dpo"].pop("start")
    from minillm.alignment import checkpoint_diversity  # before SFT: the base model, and full SFT beside the start

    out["sft_diversity"] = {"base": checkpoint_diversity(ctx.path("pretrain")), "sft": checkpoint_diversity(ctx.path("sft"))}
    return out


def stage_best_of_n_clean(ctx: Context) -> dict:
    """Best-of-n (n = 1 … 8, T = 0.7) from the noisy SFT model with the clean reward model against the
    analytic KL (``alignment.best_of_n_curve``): the best-of-n half of the over-optimization plot."""
    if (skip := _clean_skip(ctx, "best_of_n_clean")):
        return skip
    from minillm.alignment import best_of_n_curve

    t0 = time.perf_counter()
    out = best_of_n_curve(str(ctx.path("sft_noisy")), str(ctx.path("reward_clean")), n_max=8,
                          n_prompts=ctx.steps(160, 8), seed=ctx.cfg.seed)
    out["seconds"] = time.perf_counter() - t0
    return out


def stage_ppo_clean_beta0(ctx: Context) -> dict:
    """Opt-in: PPO without the KL penalty (β = 0) from the noisy SFT model with the clean reward model,
    the far end of the clean over-optimization curve."""
    if (skip := _clean_skip(ctx, "ppo_clean_beta0")):
        return skip
    return _ppo_stage(ctx, "ppo_clean_beta0", beta=0.0, reward=str(ctx.path("reward_clean")),
                      sft=str(ctx.path("sft_noisy")))


def _refusal_runs(ctx: Context, d: Path, start: str, files: dict, prompts: str | None, dpo: bool = True) -> dict:
    """The over-refusal runs from one start: for each pair file, DPO ("<name>", unless ``dpo`` is False) and, when ``prompts``
    (a PPO prompt pool) is given, a reward model on the pairs + PPO ("ppo_<name>"), each with
    ``alignment.refusal_rates`` before and after (see ``stage_refusal`` and ``stage_refusal_rlhf``)."""
    from minillm.alignment import rm_prefers_refusal
    from minillm.train.reward import RewardConfig, reward

    common = dict(sft=start, seed=ctx.cfg.seed, n_prompts=ctx.steps(50, 8), refusal=True)
    out = {}
    for name, path in files.items():
        if dpo:
            out[name] = _alignment_subprocess("dpo", d / f"{name}.json", out_dir=d / name, data=path,
                                              reward_model=ctx.path("reward_clean"), steps=ctx.steps(100, 4),
                                              **common)
        if prompts is None:
            continue
        rm = reward(RewardConfig(sft=start, data=path, out_dir=str(d / f"reward_{name}"), max_steps=ctx.steps(250, 6),
                                 seed=ctx.cfg.seed, progress=ctx.cfg.progress, cue_prompts=0))
        out[f"ppo_{name}"] = _alignment_subprocess("ppo", d / f"ppo_{name}.json", out_dir=d / f"ppo_{name}",
                                                   reward_model=rm.checkpoint, prompts=prompts,
                                                   iterations=ctx.steps(60, 2), **common)
        out[f"ppo_{name}"]["reward"] = {"test_accuracy": rm.metrics.get("test", {}).get("accuracy"),
                                        "seconds": rm.seconds, "prefers_refusal": rm_prefers_refusal(rm.checkpoint)}
    return out


def stage_refusal(ctx: Context) -> dict:
    """Opt-in: over-refusal with DPO. From the noisy SFT model, DPO on the cautious rater's pairs
    (``alignment.refusal_pair_files``) without and with helpfulness pairs ("cautious",
    "cautious_helpful"), each measured with ``alignment.refusal_rates`` (greedy) before and after.
    Chapter 10's notebook reads it; the reward-model + PPO half is ``stage_refusal_rlhf``."""
    if (skip := _clean_skip(ctx, "refusal")):
        return skip
    from minillm.alignment import refusal_pair_files

    d = ctx.dir / "refusal"
    return _refusal_runs(ctx, d, str(ctx.path("sft_noisy")), refusal_pair_files(d), None)


def stage_refusal_rlhf(ctx: Context) -> dict:
    """Opt-in: over-refusal with a reward model + PPO, the expensive half (≈ 14 min on a loaded 2-core
    machine). On each pair set of ``stage_refusal``: a Bradley-Terry reward model trained on the pairs
    from the start (``alignment.rm_prefers_refusal`` in ``reward``), then PPO with align_clean's settings
    (β = 0.1) on a prompt pool with unanswerable questions mixed in (``alignment.refusal_ppo_prompts``)
    ("ppo_cautious", "ppo_cautious_helpful"), from the noisy SFT model (top level) and, under "demos",
    from a start that sometimes declines — SFT from the base model on the noisy demonstrations plus
    "I do not know." demonstrations (``alignment.refusal_sft_file``; the noisy SFT model never samples
    a refusal, so PPO cannot learn one from it) — with DPO from that start too."""
    if (skip := _clean_skip(ctx, "refusal_rlhf")):
        return skip
    from minillm.alignment import refusal_pair_files, refusal_ppo_prompts, refusal_sft_file
    from minillm.train.sft import sft

    d = ctx.dir / "refusal_rlhf"
    files = refusal_pair_files(d)
    prompts = refusal_ppo_prompts(d)
    out = _refusal_runs(ctx, d, str(ctx.path("sft_noisy")), files, prompts, dpo=False)  # DPO: stage refusal
    demo = sft(_sft_cfg(ctx, "refusal_rlhf/demos/sft", data=refusal_sft_file(d), max_steps=ctx.steps(200, 8)))
    out["demos"] = {"sft": _sft_summary(demo) | {"data": demo.metrics["data"]},
                    **_refusal_runs(ctx, d / "demos", demo.checkpoint, files, prompts)}
    return out
