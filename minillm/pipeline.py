"""The whole fine-tuning spectrum end to end, with one report (chapter 12; ``minillm pipeline``).

Scope
    On the built-in task world by default, the stages run in order, each in
    ``runs/<name>/<stage>/``: pretrain → prompting (base model zero-/few-shot) → SFT (full) →
    SFT (LoRA) → SFT (QLoRA) → SFT with "Sure!" demonstrations (the start of best-of-n and PPO) →
    SFT on noisy demonstrations (DPO's start) → reward model →
    best-of-n (n = 1, 2, 4, 8) → PPO (β > 0) → PPO (β = 0) → PPO with the gold judge as reward
    (the control) → DPO → issue 14's "alignment that works", all from the noisy SFT model: a
    reward model on the clean pairs (``reward_clean``), PPO with it and DPO on the same pairs, each
    in its own process (``align_clean``: gold, KL to the start, wall/CPU time, peak RSS, models
    held, output diversity), best-of-n with it (``best_of_n_clean``) → GRPO (chapter 14: its own
    small model on the verifiable addition task, not the fact world, since GRPO needs a reward a
    program checks). Opt-in, run only when named in ``--stages`` (the expensive sweeps): PPO β = 0
    with the clean reward model (``ppo_clean_beta0``) and over-refusal (``refusal``: DPO on a
    cautious rater's pairs, with and without helpfulness pairs). The report adds the PPO-vs-DPO,
    diversity, over-optimization and over-refusal tables and the over-optimization plot (gold and
    proxy against √KL with Gao et al.'s fitted forms, for every PPO run and both best-of-n curves).
    A stage is done when its
    ``summary.json`` exists (written last, atomically); finished stages are reused and a crashed
    run resumes from the first unfinished stage, its earlier checkpoints intact. ``report.md`` holds one table (method, trainable
    parameters, memory estimate, exact-match, format compliance, gold reward, RM score, KL to
    SFT, wall time) and PNG plots. ``--quick`` runs every stage for a handful of steps (the CI
    smoke test). ``--corpus``, ``--sft-data``, ``--pref-data`` switch stages to user files in any
    format data.py reads; stages that need the world's gold judge are then skipped, and say so.

    ``ensure(stage)`` is the one helper notebooks use to get a stage's output, created on the fly
    and cached when missing.

    The ``rag`` stage (chapter 13, ``stage_rag``) measures prompting vs retrieval vs fine-tuning on new
    knowledge with the pipeline's own ``pretrain`` and ``sft`` models, at the chapter's quick step counts.

Sources
    The stage recipes are the measured ones of docs/task-world.md and docs/rlhf-notes.md (see each
    train/*.py); best-of-n: Nakano et al. 2021 (WebGPT) §3 / Gao et al. 2022 §3.

Deviations
    * Exact-match, format and gold in the table are measured with greedy decoding on the held-out
      facts; the KL column is measured on responses sampled at the PPO temperature.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minillm import threads
from minillm.checkpoint import write_json_atomic

STAGES = ("pretrain", "prompting", "sft", "sft_lora", "sft_qlora", "sft_opener", "sft_noisy", "reward",
          "best_of_n", "ppo", "ppo_beta0", "ppo_gold", "dpo",
          "reward_clean", "align_clean", "best_of_n_clean", "ppo_clean_beta0", "refusal",  # issue 14
          "grpo", "rag")

#: Stages that run only when named in ``--stages`` (``"all"`` skips them): the expensive sweeps.
OPT_IN_STAGES = ("ppo_clean_beta0", "refusal")
#: What ``--stages all`` (the default, ``make demo``) runs, in order.
DEFAULT_STAGES = tuple(s for s in STAGES if s not in OPT_IN_STAGES)


@dataclass
class PipelineConfig:
    """Settings of ``minillm pipeline`` (CLI: ``--quick true``, ``--name demo``)."""

    name: str = ""  # runs/<name>; "" = "default", or "quick" with --quick (never mixed with full runs)
    runs_dir: str = "runs"
    quick: bool = False
    corpus: str = "builtin"
    sft_data: str = "builtin"
    pref_data: str = "builtin"
    stages: str = "all"  # comma-separated subset of STAGES (earlier stages still run if missing)
    seed: int = 0
    eval_prompts: int = 0  # held-out prompts per evaluation; 0 = all (485)
    progress: bool = True
    profile: bool = False  # run each stage that runs under cProfile: <stage>/profile.txt + the top functions


class Context:
    """What stages share: the config, the run directory and the summaries of finished stages."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / (cfg.name or ("quick" if cfg.quick else "default"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summaries: dict[str, dict] = {}

    @property
    def builtin(self) -> bool:
        return self.cfg.sft_data == "builtin"

    def path(self, stage: str, name: str = "checkpoint.safetensors") -> Path:
        return self.dir / stage / name

    def steps(self, full: int, quick: int) -> int:
        return quick if self.cfg.quick else full

    @property
    def eval_prompts(self) -> int:
        return 24 if self.cfg.quick else self.cfg.eval_prompts


# ------------------------------------------------------------------------------------- stages


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

    reward = kw.pop("reward", str(ctx.path("reward")))
    if reward == "gold" and not ctx.builtin:
        return {"skipped": f"{out}: the gold judge exists only for the built-in world"}
    quick = dict(batch_size=8, eval_prompts=8, score_norm_samples=16, ppo_epochs=1) if ctx.cfg.quick else {}
    sft = kw.pop("sft", str(ctx.path("sft_opener" if ctx.builtin else "sft")))
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
    is small on purpose (1,000 SFT steps, 60 iterations of 16 prompts × G = 8, 200 held-out
    problems): it shows the method in the table, the notebook measures it. Skipped with user SFT or
    preference data: GRPO needs a reward a program checks, which those files do not carry."""
    if not ctx.builtin:
        return {"skipped": "grpo trains on the built-in addition task, whose answers a program checks; "
                           "user SFT/preference data has no such checker"}
    from minillm.train.grpo import GRPOConfig, grpo

    steps = ctx.steps(1000, 20)
    cfg = GRPOConfig(sft=str(ctx.dir / "grpo" / f"sft-seed{ctx.cfg.seed}-steps{steps}.safetensors"),
                     sft_steps=steps, out_dir=str(ctx.dir / "grpo"), iterations=ctx.steps(60, 2),
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


#: Report label of each chapter-13 arm (``rag_rows``), in the order of ``rag_experiments.ARMS``.
RAG_ROW_LABELS = {"closed_book": "ch13 closed book (SFT model)", "rag_plain": "ch13 RAG, plain SFT reader",
                  "qa_full": "ch13 QA fine-tuning (full)", "qa_lora": "ch13 QA fine-tuning (LoRA)",
                  "rag_raft": "ch13 RAG, RAFT-style reader", "qa_full+rag": "ch13 QA fine-tuning + RAG"}


def rag_rows(summaries: dict) -> list[dict]:
    """Report rows of the ``rag`` stage: per arm, exact match and format on the *new* facts (held-out
    phrasings), the notes naming updated / old exact match, "I don't know." on absent entities and prompt
    tokens; one row for continued pretraining (most paraphrases) and one for the retriever."""
    s = summaries.get("rag", {})
    if "arms" not in s:
        return []
    rows = []
    for arm, label in RAG_ROW_LABELS.items():
        a = s["arms"].get(arm)
        if not a:
            continue
        t = s["train"].get({"rag_raft": "raft", "qa_full+rag": "qa_full"}.get(arm, arm), {})
        rows.append({"method": label, "trainable": t.get("trainable", 0), "exact_match": a["new"]["exact_match"],
                     "format": a["new"]["format_compliance"], "seconds": t.get("seconds"),
                     "notes": f"new facts; updated EM {a['updated']['exact_match']:.1%}, old EM "
                              f"{a['old']['exact_match']:.1%}, absent \"I don't know.\" "
                              f"{a['absent']['abstain_rate']:.0%}, prompt {a['new']['prompt_tokens']:.0f} tokens"})
    if s.get("curve"):
        n = max(s["curve"], key=int)
        c = s["curve"][n]
        rows.append({"method": f"ch13 continued pretraining ({n} paraphrases) + SFT", "exact_match": c["new"],
                     "seconds": c["seconds"], "notes": f"new facts; updated EM {c['updated']:.1%}, old EM {c['old']:.1%}"})
    u = s["update"]
    rows.append({"method": "ch13 BM25 retriever", "trainable": 0,
                 "notes": f"recall@1 {s['recall_at_1']:.1%} on new and updated facts; changing one fact: "
                          f"re-index {u['rag_seconds'] * 1e3:.1f} ms vs fine-tuning {u['finetune_seconds']:.2f} s; "
                          f"the ch13 rows train for rag_experiments.QUICK_STEPS {s['steps']} (notebook 13 has the chapter's sizes)"})
    return rows


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


def _alignment_subprocess(method: str, out: Path, **kw) -> dict:
    """``python -m minillm.alignment <method> ...`` in its own process (so its peak resident memory is
    its own), returning the JSON it writes. kw: CLI options (True → a bare flag). Raises
    RuntimeError with the child's last output when it fails."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "minillm.alignment", method, "--out", str(out)]
    for k, v in kw.items():
        if v is True:
            args.append(f"--{k.replace('_', '-')}")
        elif v is not False and v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[1:5])} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(out.read_text())


def stage_align_clean(ctx: Context) -> dict:
    """PPO (β = 0.1, the clean reward model) and DPO (β = 0.1, the same clean pairs) from the noisy SFT
    model, each in its own process (``alignment.measure``: one evaluator for both, wall and CPU time,
    peak RSS, models held); the start is evaluated once by the same evaluator."""
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


def stage_refusal(ctx: Context) -> dict:
    """Opt-in: over-refusal. DPO from the noisy SFT model on the cautious rater's pairs
    (``alignment.refusal_pair_files``), without and with helpfulness pairs, each measured with
    ``alignment.refusal_rates`` (greedy) before and after."""
    if (skip := _clean_skip(ctx, "refusal")):
        return skip
    from minillm.alignment import refusal_pair_files

    d = ctx.dir / "refusal"
    files = refusal_pair_files(d)
    out = {}
    for name, path in files.items():
        out[name] = _alignment_subprocess("dpo", d / f"{name}.json", out_dir=d / name, data=path, refusal=True,
                                          sft=ctx.path("sft_noisy"), reward_model=ctx.path("reward_clean"),
                                          seed=ctx.cfg.seed, steps=ctx.steps(100, 4), n_prompts=ctx.steps(50, 8))
    return out


def overoptimization_curves(S: dict) -> tuple[dict, dict]:
    """(curves, fits) for the over-optimization plot from the stage summaries ``S``: PPO runs (RL form,
    points per iteration, relative to the first iteration) and best-of-n (bon form, relative to n = 1).
    Curves: name -> {"d", "gold", "proxy"} lists; fits: name -> {"gold": fit, "proxy": fit}."""
    from minillm.overoptimization import best_of_n_kl, curve_from_history, fit_overoptimization

    curves, fits = {}, {}
    runs = (("PPO β=0.1, flawed RM", S.get("ppo", {}).get("history")),
            ("PPO β=0, flawed RM", S.get("ppo_beta0", {}).get("history")),
            ("PPO β=0.1, clean RM", S.get("align_clean", {}).get("ppo", {}).get("history")),
            ("PPO β=0, clean RM", S.get("ppo_clean_beta0", {}).get("history")))
    for name, hist in runs:
        hist = [h for h in (hist or []) if h.get("gold") is not None and h.get("rm_score") is not None]
        if len(hist) >= 2:
            c = curve_from_history(hist)
            curves[name] = {k: [float(x) for x in c[k]] for k in ("d", "gold", "proxy")}
    b = S.get("best_of_n", {}).get("n", {})
    if len(b) >= 2:
        ns = sorted(b, key=int)
        g0, p0 = b[ns[0]]["gold"], b[ns[0]]["rm_score"]
        curves["best-of-n, flawed RM"] = {"d": [float(np.sqrt(best_of_n_kl(int(n)))) for n in ns],
                                          "gold": [b[n]["gold"] - g0 for n in ns],
                                          "proxy": [b[n]["rm_score"] - p0 for n in ns]}
    c = S.get("best_of_n_clean", {})
    if len(c.get("n", [])) >= 2:
        curves["best-of-n, clean RM"] = {"d": c["d"], "gold": [g - c["gold"][0] for g in c["gold"]],
                                         "proxy": [p - c["proxy"][0] for p in c["proxy"]]}
    for name, c in curves.items():
        form = "bon" if name.startswith("best-of-n") else "rl"
        fits[name] = {k: fit_overoptimization(c["d"], c[k], form) for k in ("gold", "proxy")}
    return curves, fits


def clean_alignment_rows(S: dict) -> list[dict]:
    """Main-table rows of the issue-14 stages: the noisy SFT start, PPO and DPO with the clean RM / pairs
    (one sample per held-out-fact prompt at T = 0.7: correctness as exact-match, gold, RM, KL to the start)."""
    a = S.get("align_clean", {})
    if "start" not in a:
        return []
    s = a["start"]["test"]
    rows = [{"method": "noisy SFT (start of the clean PPO / DPO), T = 0.7", "trainable": None, "gold": s["gold"],
             "exact_match": s.get("exact_match"), "rm_score": s.get("rm_score"), "kl": 0.0,
             "notes": "RM score from the clean reward model"}]
    for m, label in (("ppo", "PPO (β = 0.1), clean RM, from noisy SFT"),
                     ("dpo", "DPO (β = 0.1), clean pairs, from noisy SFT")):
        if m in a:
            e = a[m]["end"]["test"]
            rows.append({"method": label, "trainable": a[m].get("trainable_parameters"), "gold": e["gold"],
                         "exact_match": e.get("exact_match"), "rm_score": e.get("rm_score"), "kl": e.get("kl"),
                         "seconds": a[m].get("train_seconds"),
                         "notes": f"gold {s['gold']:+.3f} → {e['gold']:+.3f} (T = 0.7); see the PPO-vs-DPO table"})
    return rows


def ppo_vs_dpo_table(a: dict) -> list[str]:
    """The PPO-vs-DPO table (same start, same pairs), Markdown lines, from the ``align_clean`` summary ``a``."""
    out = ["## PPO vs DPO from the same start (noisy SFT) on the same clean pairs", "",
           "| method | gold (held-out), start → end | gold (train facts) | KL to start (nats) | train wall (s) "
           "| train CPU (s) | peak RSS (MB) | models in memory |", "|---|---|---|---|---|---|---|---|"]
    g0, t0 = a["start"]["test"]["gold"], a["start"]["train"]["gold"]
    for m in ("ppo", "dpo"):
        if m not in a:
            continue
        r, e = a[m], a[m]["end"]
        out.append(f"| {m.upper()} (β = {r['beta']:g}) | {g0:+.3f} → {e['test']['gold']:+.3f} | {t0:+.3f} → "
                   f"{e['train']['gold']:+.3f} | {e['test']['kl']:.2f} | {r['train_seconds']:.0f} | "
                   f"{r['train_cpu_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['models_in_memory']} |")
    return out


def diversity_table(a: dict) -> list[str]:
    """The output-diversity table of the start, PPO and DPO, Markdown lines, from the ``align_clean`` summary ``a``."""
    out = ["## Output diversity (8 samples per prompt at T = 0.7 on 32 held-out-fact prompts)", "",
           "| model | distinct-1 | distinct-2 | mean token entropy (nats) | all 8 identical |", "|---|---|---|---|---|"]
    for label, e in (("noisy SFT (start)", a["start"]), ("PPO, clean RM", a.get("ppo", {}).get("end")),
                     ("DPO, clean pairs", a.get("dpo", {}).get("end"))):
        if e and "diversity" in e:
            v = e["diversity"]
            out.append(f"| {label} | {v['distinct_1']:.3f} | {v['distinct_2']:.3f} | {v['entropy']:.3f} | "
                       f"{v['all_identical']:.1%} |")
    return out


def clean_alignment_sections(S: dict) -> list[str]:
    """The PPO-vs-DPO and diversity sections (Markdown); [] without the ``align_clean`` stage."""
    a = S.get("align_clean", {})
    if "start" not in a:
        return []
    return ["\n".join(ppo_vs_dpo_table(a)), "\n".join(diversity_table(a))]


def overoptimization_section(curves: dict, fits: dict) -> list[str]:
    """The fitted forms and measured peaks of the over-optimization curves, Markdown lines."""
    out = ["## Over-optimization: gold and proxy against d = √KL (Gao et al. 2022 forms)", "",
           "| curve | points | measured peak gold − start (at d) | gold falls below start at d | gold fit α, β "
           "(RMSE) | proxy fit α, β |", "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        g = np.asarray(c["gold"])
        i = int(np.argmax(g))
        below = [c["d"][j] for j in range(i, len(g)) if g[j] < 0]
        fg, fp = fits[name]["gold"], fits[name]["proxy"]
        out.append(f"| {name} | {len(g)} | {g[i]:+.3f} (d {c['d'][i]:.2f}) | "
                   f"{f'{below[0]:.2f}' if below else 'no'} | {fg['alpha']:.3f}, {fg['beta']:.3f} ({fg['rmse']:.3f}) | "
                   f"{fp['alpha']:.3f}, {fp['beta']:.3f} |")
    out += ["", "PPO points are per-iteration rollouts (64 samples each, noisy); best-of-n KL = log n − (n−1)/n."]
    return out


def refusal_section(S: dict) -> str:
    """The over-refusal table (Markdown) from the ``refusal`` stage, or "" when it did not run."""
    r = S.get("refusal", {})
    if not any(k in r for k in ("cautious", "cautious_helpful")):
        return ""
    lines = ["## Over-refusal (DPO from noisy SFT on a cautious rater's pairs; greedy)", "",
             "| pairs | refusal on answerable, before → after | on unanswerable (held-out entities), before → after "
             "| gold on answerable, before → after |", "|---|---|---|---|"]
    for name, label in (("cautious", "cautious rater"), ("cautious_helpful", "cautious rater + helpfulness pairs")):
        if name not in r:
            continue
        a, e = r[name]["refusal_start"], r[name]["refusal_end"]
        lines.append(f"| {label} | {a['answerable']['refusal_attempt_rate']:.1%} → {e['answerable']['refusal_attempt_rate']:.1%} "
                     f"| {a['unanswerable']['refusal_attempt_rate']:.1%} → {e['unanswerable']['refusal_attempt_rate']:.1%} "
                     f"| {a['answerable']['gold']:+.3f} → {e['answerable']['gold']:+.3f} |")
    lines += ["", "Rates count responses that start declining (\"I don…\", \"I do not…\")."]
    return "\n".join(lines)


STAGE_FUNCTIONS = {  # the stages in the order they run; each builds on the ones before it
    "pretrain": stage_pretrain,
    "prompting": stage_prompting,
    "sft": stage_sft,
    "sft_lora": stage_sft_lora,
    "sft_qlora": stage_sft_qlora,
    "sft_opener": stage_sft_opener,
    "sft_noisy": stage_sft_noisy,
    "reward": stage_reward,
    "best_of_n": stage_best_of_n,
    "ppo": stage_ppo,
    "ppo_beta0": stage_ppo_beta0,
    "ppo_gold": stage_ppo_gold,
    "dpo": stage_dpo,
    # issue 14: alignment that works, from one start (the noisy SFT model); see the block above
    "reward_clean": stage_reward_clean,
    "align_clean": stage_align_clean,
    "best_of_n_clean": stage_best_of_n_clean,
    "ppo_clean_beta0": stage_ppo_clean_beta0,
    "refusal": stage_refusal,
    "grpo": stage_grpo,
    "rag": stage_rag,
}


# ----------------------------------------------------------------------------------- driver


#: Bump when a stage's recipe changes, so cached stages made by an older recipe are rebuilt.
RECIPE_VERSION = 2


def content_sha256(path: str) -> str:
    """SHA-256 (hex) of a data file's bytes, or ``"builtin"`` for the built-in data, so a stage is
    keyed on what the data *is*, not on where it lies (an edited file at the same path rebuilds).
    Raises FileNotFoundError naming the option's file, before any stage runs."""
    if path == "builtin":
        return "builtin"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_fingerprint(ctx: Context) -> dict:
    """What a cached stage must have been made with to be reused: the recipe version and every
    pipeline setting that changes results (not the run name, folder or progress bars), with each
    data file's content hash (``content_sha256``) next to its path."""
    c = ctx.cfg
    if not hasattr(ctx, "_data_hashes"):
        ctx._data_hashes = {k: content_sha256(getattr(c, k)) for k in ("corpus", "sft_data", "pref_data")}
    return {"recipe_version": RECIPE_VERSION, "quick": c.quick, "seed": c.seed, "corpus": c.corpus,
            "sft_data": c.sft_data, "pref_data": c.pref_data, "eval_prompts": c.eval_prompts,
            "data_sha256": ctx._data_hashes}


def run_stage(ctx: Context, stage: str) -> dict:
    """Run one stage unless its summary exists and was made with the same settings (stage_fingerprint);
    returns the summary (cached or new). A stage rebuilt for new settings makes every later stage
    rebuild too, since they share the fingerprint.

    Before a stage runs, ``<stage>/fingerprint.json`` records the settings it runs with. A stage
    that crashed resumes from its checkpoint only when that record equals the current fingerprint;
    otherwise (other corpus, seed, data content or recipe, or no record) the stage's old checkpoint
    is deleted first, so a rebuild always retrains and never continues another run's weights."""
    fp = stage_fingerprint(ctx)
    path = ctx.dir / stage / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("fingerprint") == fp:
            ctx.summaries[stage] = summary
            return summary
        path.unlink()  # made by another recipe or settings: rebuild
    marker = ctx.dir / stage / "fingerprint.json"
    started = json.loads(marker.read_text()) if marker.is_file() else None
    if started != fp:  # not a crash of this very run: nothing of the old stage may be reused
        for old in (ctx.path(stage), ctx.dir / stage / "metrics.json"):
            if old.exists():
                old.unlink()
        write_json_atomic(marker, fp)
    t0 = time.perf_counter()
    with threads.phase("train") as n_threads:  # chosen per stage: the machine's load may have changed
        if ctx.cfg.profile:
            summary = profile_stage(ctx, stage)
        else:
            summary = STAGE_FUNCTIONS[stage](ctx)
    summary.setdefault("seconds", time.perf_counter() - t0)
    summary.setdefault("threads", n_threads)
    summary["fingerprint"] = stage_fingerprint(ctx)
    write_json_atomic(path, summary)
    ctx.summaries[stage] = summary
    return summary


def profile_stage(ctx: Context, stage: str) -> dict:
    """Run one stage under cProfile (``--profile true``): where its time went.

    Writes ``<stage>/profile.txt`` — the functions sorted by cumulative time (which phase: generation,
    evaluation, the training loop) and by self time (which op) — and adds ``profile_top`` (the 10
    functions with the most self time, ``bench.profile_rows``) to the stage's summary. cProfile's
    own overhead makes the profiled stage slower (most in Python-heavy generation); the shares, not
    the absolute seconds, are the answer. A stage reused from an earlier run is not profiled: use a
    new ``--name``."""
    import cProfile
    import io
    import pstats

    from minillm.bench import profile_rows

    prof = cProfile.Profile()
    prof.enable()
    try:
        summary = STAGE_FUNCTIONS[stage](ctx)
    finally:
        prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    for key in ("cumulative", "tottime"):
        text.write(f"=== {stage}: sorted by {key} ===\n")
        stats.sort_stats(key).print_stats(30)
    (ctx.dir / stage).mkdir(parents=True, exist_ok=True)
    (ctx.dir / stage / "profile.txt").write_text(text.getvalue(), encoding="utf-8")
    summary["profile_top"] = profile_rows(prof, n=10)
    return summary


def one_line(stage: str, s: dict) -> str:
    """The terminal summary of one finished stage."""
    if "skipped" in s:
        return f"[{stage}] skipped: {s['skipped']}"
    m = s.get("metrics", {})
    bits = [f"{s.get('seconds', 0):.0f}s"]
    if stage == "pretrain":
        bits.append(f"val loss {s['val_losses'][-1][1]:.3f}")
    elif stage == "prompting":
        bits.append(f"EM 0-shot {s['zero_shot']['exact_match']:.1%}, 3-shot {s['three_shot']['exact_match']:.1%}; "
                    f"contains {s['zero_shot']['contains']:.1%} -> {s['three_shot']['contains']:.1%}")
    elif "sft_test" in m:
        bits.append(f"held-out EM {m['sft_test']['exact_match']:.1%}, format {m['sft_test']['format_compliance']:.1%}, "
                    f"gold {m['sft_test']['gold']:+.3f}")
    elif stage == "best_of_n":
        bits.append(", ".join(f"n={n}: RM {v['rm_score']:+.2f} gold {v['gold']:+.3f}" for n, v in s["n"].items()))
    elif stage == "reward" and "test" in m:
        bits.append(f"held-out pair accuracy {m['test']['accuracy']:.1%}")
    elif stage.startswith("ppo") and "eval_end" in m:
        a, e = m["eval_start"]["test"], m["eval_end"]["test"]
        bits.append(f"RM {a['rm_score']:+.2f} -> {e['rm_score']:+.2f}, gold {a['gold']:+.3f} -> {e['gold']:+.3f}, "
                    f"KL {e['kl']:.2f}")
    elif stage == "dpo" and "after" in m:
        a, e = m["before"]["test"]["greedy"], m["after"]["test"]["greedy"]
        bits.append(f"gold {a['gold']:+.3f} -> {e['gold']:+.3f}, rude {a['rude']:.0%} -> {e['rude']:.0%}, "
                    f"too long {a['too_long']:.0%} -> {e['too_long']:.0%}")
    elif stage == "grpo" and "eval_end" in m:
        a, e = m["eval_start"], m["eval_end"]
        bits.append(f"addition, held-out pass@1 {a['pass@1']:.3f} -> {e['pass@1']:.3f}, "
                    f"pass@{e['G']} {a['pass@G']:.3f} -> {e['pass@G']:.3f}, greedy {a['greedy']:.1%} -> {e['greedy']:.1%}")
    elif stage == "rag" and "arms" in s:
        a = s["arms"]
        bits.append(f"new-fact EM closed book {a['closed_book']['new']['exact_match']:.1%}, QA FT "
                    f"{a['qa_full']['new']['exact_match']:.1%}, RAG+RAFT reader {a['rag_raft']['new']['exact_match']:.1%}; "
                    f"BM25 recall@1 {s['recall_at_1']:.1%} (quick step counts)")
    elif stage == "reward_clean" and "test" in m:
        bits.append(f"clean pairs, held-out pair accuracy {m['test']['accuracy']:.1%}")
    elif stage == "align_clean" and "start" in s:
        bits.append(", ".join(f"{k.upper()} gold {s['start']['test']['gold']:+.3f} -> {s[k]['end']['test']['gold']:+.3f} "
                              f"(KL {s[k]['end']['test']['kl']:.2f}, {s[k]['train_seconds']:.0f}s)" for k in ("ppo", "dpo")))
    elif stage == "best_of_n_clean" and "n" in s:
        bits.append(", ".join(f"n={n}: gold {g:+.3f}" for n, g in zip(s["n"], s["gold"])))
    elif stage == "refusal":
        bits.append(", ".join(f"{k}: refusal on answerable {v['refusal_start']['answerable']['refusal_attempt_rate']:.0%}"
                              f" -> {v['refusal_end']['answerable']['refusal_attempt_rate']:.0%}, unanswerable "
                              f"{v['refusal_start']['unanswerable']['refusal_attempt_rate']:.0%} -> "
                              f"{v['refusal_end']['unanswerable']['refusal_attempt_rate']:.0%}" for k, v in s.items()
                              if isinstance(v, dict) and "refusal_end" in v))
    if "profile_top" in s:
        bits.append("most self time: " + ", ".join(f"{r['function']} {r['share']:.0%}" for r in s["profile_top"][:3]))
    return f"[{stage}] " + "; ".join(bits)


def _memory_mb(model_cfg: dict, method: str, targets) -> float:
    from minillm import memory
    from minillm.model import GPTConfig

    shape = memory.ModelShape.from_gpt_config(GPTConfig.from_dict(model_cfg))
    est = memory.estimate(shape, method=method, dtype="fp32", batch=32, seq_len=model_cfg["block_size"],
                          lora_r=8, lora_targets=targets)
    return est["total"] / 1e6


def build_rows(ctx: Context) -> list[dict]:
    """The report table, one row per method, from the stage summaries."""
    S = ctx.summaries
    rows: list[dict] = []
    model_cfg = None
    try:
        from minillm.checkpoint import load_checkpoint

        model_cfg = load_checkpoint(ctx.path("pretrain")).config
    except (FileNotFoundError, ValueError):
        pass
    p = S.get("prompting", {})
    for key, label in (("zero_shot", "base model, zero-shot"), ("three_shot", "base model, 3-shot")):
        if key in p:
            rows.append({"method": label, "trainable": 0, "exact_match": p[key]["exact_match"],
                         "format": p[key]["format_compliance"], "gold": p[key]["gold"],
                         "notes": f"answer contained {p[key]['contains']:.1%}"})
    for stage, label, method, targets in (("sft", "SFT (full)", "full", "all-linear"),
                                          ("sft_lora", "SFT (LoRA r=8, q,v)", "lora", ["q_proj", "v_proj"]),
                                          ("sft_qlora", "SFT (QLoRA NF4+DQ, r=8 all linear)", "qlora", "all-linear"),
                                          ("sft_opener", "SFT (full, 25 % \"Sure!\" demos; PPO start)", "full", "all-linear"),
                                          ("sft_noisy", "SFT (full, 20 % noisy demos; DPO start)", "full", "all-linear")):
        s = S.get(stage, {})
        if "metrics" not in s:
            continue
        m = s["metrics"]
        t = m.get("sft_test", {})
        rows.append({"method": label, "trainable": m["parameters"]["trainable"],
                     "memory_mb": _memory_mb(model_cfg, method, targets) if model_cfg else None,
                     "exact_match": t.get("exact_match"), "format": t.get("format_compliance"),
                     "gold": t.get("gold"), "seconds": s.get("seconds"),
                     "notes": f"corpus loss {m.get('corpus_loss_after', float('nan')):.3f}; "
                              f"paraphrase EM {m.get('sft_paraphrase', {}).get('exact_match', float('nan')):.1%}"})
    r = S.get("reward", {})
    if "metrics" in r:
        m = r["metrics"]
        cue = m.get("cue", {}).get("test", {})
        rows.append({"method": "reward model (Bradley-Terry)", "trainable": m.get("parameters", {}).get("trainable"),
                     "seconds": r.get("seconds"),
                     "notes": f"held-out pair accuracy {m.get('test', {}).get('accuracy', float('nan')):.1%}; "
                              f"cue bonus {cue.get('cue_bonus', float('nan')):+.2f}"})
    b = S.get("best_of_n", {})
    for n, v in b.get("n", {}).items():
        rows.append({"method": f"best-of-{n} (T = 0.7)", "trainable": 0, "exact_match": v["exact_match"],
                     "format": v["format_compliance"], "gold": v["gold"], "rm_score": v["rm_score"],
                     "notes": f"opener rate {v['opener_rate']:.1%}"})
    n_full = None
    if model_cfg:  # PPO and DPO fine-tune every weight
        from minillm import memory
        from minillm.model import GPTConfig

        n_full = memory.ModelShape.from_gpt_config(GPTConfig.from_dict(model_cfg)).n_params()
    for stage, label in (("ppo", "PPO (β = 0.1), T = 0.7"), ("ppo_beta0", "PPO (β = 0), T = 0.7"),
                         ("ppo_gold", "PPO, gold judge as reward (control)")):
        s = S.get(stage, {})
        if "metrics" not in s:
            continue
        a = s["metrics"].get("eval_start", {}).get("test", {})
        e = s["metrics"].get("eval_end", {}).get("test", {})
        rows.append({"method": label, "trainable": n_full, "exact_match": e.get("correct"),
                     "gold": e.get("gold"), "rm_score": e.get("rm_score") if stage != "ppo_gold" else None,
                     "kl": e.get("kl"), "seconds": s.get("seconds"),
                     "notes": f"gold {a.get('gold', float('nan')):+.3f} → {e.get('gold', float('nan')):+.3f}; "
                              f"opener {a.get('opener_rate', float('nan')):.0%} → {e.get('opener_rate', float('nan')):.0%}"})
    d = S.get("dpo", {})
    if "metrics" in d:
        m = d["metrics"]
        g0, g1 = m.get("before", {}).get("test", {}).get("greedy", {}), m.get("after", {}).get("test", {}).get("greedy", {})
        t1 = m.get("after", {}).get("test", {}).get("T0.7", {})
        faults = ", ".join(f"{k} {g0.get(k, float('nan')):.0%} → {g1.get(k, float('nan')):.0%}"
                           for k in ("rude", "too_long", "repetition", "opener_rate"))
        rows.append({"method": "DPO (β = 0.1) from noisy SFT", "trainable": m.get("parameters", {}).get("trainable"),
                     "exact_match": g1.get("exact_match"), "format": 1 - g1["malformed"] if "malformed" in g1 else None,
                     "gold": g1.get("gold"), "rm_score": t1.get("rm_score"), "kl": t1.get("kl"),
                     "seconds": d.get("seconds"), "notes": f"gold {g0.get('gold', float('nan')):+.3f} → "
                                                          f"{g1.get('gold', float('nan')):+.3f}; {faults}"})
    g = S.get("grpo", {})
    if "metrics" in g and "eval_end" in g["metrics"]:
        m = g["metrics"]
        c, a, e = m["config"], m["eval_start"], m["eval_end"]
        rows.append({"method": f"GRPO ({c['loss_type']}, β = {c['beta']:g}, G = {c['num_generations']}), addition task",
                     "trainable": m.get("parameters", {}).get("trainable"), "exact_match": e["greedy"],
                     "seconds": g.get("seconds"),
                     "notes": f"own {m.get('parameters', {}).get('total', 0):,}-parameter model and task (not the "
                              f"world): held-out greedy {a['greedy']:.1%} → {e['greedy']:.1%}, pass@1 "
                              f"{a['pass@1']:.3f} → {e['pass@1']:.3f}, pass@{e['G']} {a['pass@G']:.3f} → "
                              f"{e['pass@G']:.3f}; time incl. its SFT start"})
    rows += rag_rows(S)
    rows += clean_alignment_rows(S)
    return rows


def write(ctx: Context) -> Path:
    """Write report.md and its plots from the finished stages."""
    from minillm import report

    plots = []
    curves = {k: v.get("losses") for k, v in ctx.summaries.items() if v.get("losses")}
    if curves:
        plots.append(str(report.plot_losses(curves, ctx.dir / "losses.png")))
    ppo = {k: v["history"] for k, v in ctx.summaries.items() if k.startswith("ppo") and v.get("history")}
    if ppo:
        plots.append(str(report.plot_ppo(ppo, ctx.dir / "ppo.png")))
    if ctx.summaries.get("dpo", {}).get("history"):
        plots.append(str(report.plot_dpo(ctx.summaries["dpo"]["history"], ctx.dir / "dpo.png")))
    curves, fits = overoptimization_curves(ctx.summaries)
    if curves:
        plots.append(str(report.plot_overoptimization(curves, ctx.dir / "overoptimization.png", fits)))
    stages = "\n".join(["## Stages", ""] + [f"- {one_line(k, v)}" for k, v in ctx.summaries.items()])
    note = ("Times are wall-clock seconds on this machine. Exact-match, format and gold are measured on held-out "
            "facts (never in SFT data) and judged by judge.GoldJudge: greedy answers for the SFT rows and DPO, "
            "one sample at T = 0.7 per prompt for best-of-n and PPO (their KL is the summed log-ratio to the "
            "SFT model on those samples). The GRPO row is another task: 2-digit addition, its exact-match the "
            "greedy accuracy on held-out problems, pass@k from G samples at T = 1.")
    sections = [stages, note]
    sections += clean_alignment_sections(ctx.summaries)
    sections += ["\n".join(overoptimization_section(curves, fits))] if curves else []
    sections += [refusal_section(ctx.summaries)] if refusal_section(ctx.summaries) else []
    return report.write_report(ctx.dir, build_rows(ctx), sections, plots)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage in order (reusing finished ones) and write the report; returns its path."""
    wanted = DEFAULT_STAGES if cfg.stages == "all" else tuple(s.strip() for s in cfg.stages.split(","))
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    ctx = Context(cfg)
    stage_fingerprint(ctx)  # reads (hashes) --corpus/--sft-data/--pref-data now: a missing file fails first
    from minillm.loaders import load_dataset

    for path, kind in ((cfg.sft_data, "sft"), (cfg.pref_data, "preference")):
        if path != "builtin":  # parse now, so bad data fails before the earlier stages spend their time
            load_dataset(path, kind=kind)
    last = max(STAGES.index(s) for s in wanted)
    for stage in STAGES[:last + 1]:
        if stage in OPT_IN_STAGES and stage not in wanted:
            continue
        summary = run_stage(ctx, stage)
        print(one_line(stage, summary), flush=True)
    return write(ctx)


def ensure(stage: str, quick: bool = False, runs_dir: str = "runs") -> Path:
    """The checkpoint of ``stage`` (creating it and every stage it needs when missing, then cached).

    The one helper notebooks use: ``ensure("sft")`` returns ``runs/cache[-quick]/sft/checkpoint.safetensors``.
    """
    cfg = PipelineConfig(name="cache-quick" if quick else "cache", runs_dir=runs_dir, quick=quick,
                         stages=stage, progress=False)
    ctx = Context(cfg)
    for s in STAGES[:STAGES.index(stage) + 1]:
        if s in OPT_IN_STAGES and s != stage:
            continue
        run_stage(ctx, s)
    return ctx.path(stage)


def add_arguments(parser) -> None:
    from minillm.train.common import add_dataclass_arguments

    add_dataclass_arguments(parser, PipelineConfig)


def run(args) -> int:
    from minillm.train.common import dataclass_from_args

    cfg = dataclass_from_args(PipelineConfig, args)
    path = run_pipeline(cfg)
    print(f"report: {path}")
    return 0
