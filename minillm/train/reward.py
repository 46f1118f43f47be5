"""Reward model: a Bradley-Terry scalar head on the SFT transformer, trained on preference pairs.

Scope
    ``reward(RewardConfig)`` loads an SFT checkpoint with a fresh scalar head (``GPTConfig(
    scalar_head=True)``: ``score`` = Linear(C, 1), N(0, 0.02) weight, zero bias), renders every pair
    once (``data.render_preference_pairs``: the same prompt ids for both responses, ``<|eos|>`` after a
    response that ends), and trains the whole network on
    ``L = mean(−log σ(r_c − r_r − margin)) + c·mean((r_c + r_r)²)`` (Bradley-Terry, computed as
    ``−logsigmoid``, finite for any reward difference; the second term is TRL's optional reward
    centering). A sequence's reward is the scalar head at its **last real token**, found from the
    attention mask (``model.last_token_index``), so left or right padding and ``pad == eos`` all
    read the final ``<|eos|>`` (docs/bugs.md B15). A forward pass scores a batch's responses
    once per half (chosen (B, T_c), rejected (B, T_r)), each padded to its own longest row.

    Metrics (``metrics.json``): pairwise accuracy (strict ``r_c > r_r``: a tie counts as wrong) and
    mean margin on train and held-out pairs, held-out accuracy per rejected kind and per cue
    pattern, and on the built-in world the spurious-cue diagnostics of docs/task-world.md §5: the cue
    bonus ``r("Sure! {answer}.") − r("{answer}.")`` and ``P(r("Sure! {wrong}.") > r("{answer}."))``,
    plus ``P(r(correct) > r(wrong))`` without the cue, on held-out-fact and train-fact prompts.

    For PPO: ``load_reward_model(path) -> (model, tokenizer)`` and
    ``reward_scores(model, input_ids, attention_mask) -> (B,) float32`` (no_grad, eval mode).

Sources
    * Bradley & Terry 1952; InstructGPT (Ouyang et al. 2022, arXiv 2203.02155) §3.5, Eq. 1.
    * TRL ``trl/trainer/reward_trainer.py`` ``compute_loss``: ``−logsigmoid(r_c − r_r − margin)``,
      ``center_rewards_coefficient · mean((r_c + r_r)²)`` (Eisenstein et al. 2023, arXiv 2312.09244
      Eq. 2), accuracy ``mean(r_c > r_r)``; the pooled token of Hugging Face
      ``*ForSequenceClassification`` (rightmost real token).
    * Defaults: docs/task-world.md §5/§7.7 and docs/rlhf-notes.md §2 (B = 32 pairs, warmup 10, cosine, init from
      SFT; built-in pairs ``preferences.PREFERENCE_RECIPES`` recipe "e"), except steps and lr (below).

Deviations
    * The last real token is found from the attention mask, never from the pad id (Hugging Face
      pools the rightmost token whose id ≠ pad_token_id, which skips a real final EOS when
      pad == eos). There is no option to restore that: it is the bug of docs/bugs.md B15.
    * The score head has a bias (Hugging Face: ``bias=False``); Bradley-Terry is invariant to it,
      the centering term is not. ``--center-rewards-coefficient`` fixes the offset if needed.
    * Pairs that do not fit the context are cut from the left of the prompt (as SFT), not dropped
      (TRL filters them); skipped pairs (response too long, chosen == rejected) are counted.
    * 250 steps at lr 5e-4 instead of the prototype's 150 at 2e-4: the longer, faster run was the
      one that took held-out pair accuracy past the 90 % the later chapters need (notebook 08
      prints the accuracy it reaches). ``--max-steps 150 --lr 2e-4`` restores the prototype's recipe.
    * With ``margin`` the per-pair margin comes from the data's ``margin`` field when present
      (TRL), else from ``RewardConfig.margin`` (a constant; 0 = the plain loss).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from minillm import backend
from minillm import functional as F
from minillm.checkpoint import load_model, save_checkpoint
from minillm.data import RenderedPair, collate, collate_preference, render_chat
from minillm.loaders import load_dataset
from minillm.model import GPT, last_token_index
from minillm.optim import AdamW, weight_decay_groups
from minillm.tensor import Tensor, no_grad
from minillm.train.common import (OptimConfig, TrainResult, metric_lines, render_pair_splits, trainer_command,
                                  write_metrics)
from minillm.train.loop import index_batches, train_loop


@dataclass
class RewardConfig(OptimConfig):
    """Settings of a reward-model run (CLI: ``minillm reward --max-steps 150``): the shared optimizer
    fields (``OptimConfig``) with the reward model's measured defaults, and its own.

    sft: the SFT checkpoint the RM starts from; data: "builtin" (the task world's pairs of
    ``recipe``) or a preference file (any shape ``loaders.load_preference`` reads); test_data: a
    held-out preference file (default: ``test_fraction`` of ``data``, or the world's test pairs);
    margin: constant margin (used when a pair has no ``margin`` field); center_rewards_coefficient:
    c of the centering term (0 = off; TRL's default None, suggested 0.01).
    """

    sft: str = "runs/sft/checkpoint.safetensors"
    data: str = "builtin"
    recipe: str = "e"  # built-in pair recipe: a | c | e (preferences.PREFERENCE_RECIPES), or e.g. "e-nocue"
    test_data: str = ""
    test_fraction: float = 0.1
    out_dir: str = "runs/reward"
    batch_size: int = 32  # pairs per step (2B sequences per step)
    max_steps: int = 250
    lr: float = 5e-4
    margin: float = 0.0
    center_rewards_coefficient: float = 0.0
    max_length: int = 0  # 0 = the model's block_size
    eval: bool = True
    eval_batch_size: int = 64
    cue_prompts: int = 200  # prompts per fact split for the cue diagnostics (built-in world)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.center_rewards_coefficient is None:
            self.center_rewards_coefficient = 0.0
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be ≥ 0, got {self.center_rewards_coefficient}")


RewardResult = TrainResult  # losses per step (nats), metrics, checkpoint path, seconds


# ----------------------------------------------------------------------------------------------
# Loss and pooling


def reward_loss(rewards_chosen: Tensor, rewards_rejected: Tensor, margin=None,
                center_rewards_coefficient: float | None = None) -> tuple[Tensor, dict]:
    """Bradley-Terry loss of reward pairs, as TRL's ``RewardTrainer.compute_loss``.

    ``L = mean_b(−log σ(r_c − r_r − m_b)) + c · mean_b((r_c + r_r)²)`` (InstructGPT Eq. 1; centering:
    arXiv 2312.09244 Eq. 2), with −log σ computed as softplus (finite for any difference,
    docs/bugs.md B16). Example (docs/bugs.md C25): r_c 2.0, r_r 0.5 -> 0.2014133; margin 1.0 -> 0.4740770;
    c 0.01 -> 0.2639133.

    Args:
        rewards_chosen, rewards_rejected: (B,) Tensors (differentiable), nats of preference logit.
        margin: None, a number, or a (B,) array of per-pair margins.
        center_rewards_coefficient: c ≥ 0 or None (off).
    Returns:
        ``(loss, metrics)``: scalar Tensor; floats ``accuracy`` (strict r_c > r_r: ties are wrong),
        ``margin`` (mean r_c − r_r, without the margin term), ``reward_chosen``, ``reward_rejected``.
    Raises:
        ValueError: shapes differ or are not (B,).
    """
    if rewards_chosen.shape != rewards_rejected.shape or len(rewards_chosen.shape) != 1:
        raise ValueError(f"rewards must both be (B,), got {rewards_chosen.shape} and {rewards_rejected.shape}")
    diff = rewards_chosen - rewards_rejected  # (B,)
    logits = diff
    if margin is not None:
        logits = diff - backend.get_array_module(diff.data).asarray(margin, dtype=diff.dtype)  # (B,)
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    rc = backend.to_numpy(rewards_chosen.data)
    rr = backend.to_numpy(rewards_rejected.data)
    return loss, pair_metrics(rc, rr)


def pair_metrics(rewards_chosen: np.ndarray, rewards_rejected: np.ndarray) -> dict:
    """accuracy (strict >), margin (mean r_c − r_r), mean rewards, n: from (N,) host arrays."""
    rc = np.asarray(rewards_chosen, dtype=np.float64)
    rr = np.asarray(rewards_rejected, dtype=np.float64)
    if len(rc) == 0:
        return {"accuracy": float("nan"), "margin": float("nan"), "reward_chosen": float("nan"),
                "reward_rejected": float("nan"), "n": 0}
    return {"accuracy": float(np.mean(rc > rr)), "margin": float(np.mean(rc - rr)),
            "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()), "n": int(len(rc))}


def pool_last(scores: Tensor, attention_mask) -> Tensor:
    """The per-position scores (B, T) read at each row's last real token: (B,), differentiable.

    The index comes from the attention mask (``last_token_index``), never from token ids, so
    right padding, left padding and pad == eos all read the final real token (docs/bugs.md B15:
    right-padded mask [1,1,1,1,1,1,0,0] -> position 5; left-padded [0,0,1,1,1,1] -> 5).
    Raises ValueError for a row without a real token.
    """
    mask = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
    xp = backend.get_array_module(scores.data)
    idx = xp.asarray(last_token_index(xp.asarray(mask)))  # (B,)
    rows = xp.arange(scores.shape[0])
    return F.index(scores, (rows, idx))  # (B,)


def sequence_rewards(model: GPT, input_ids, attention_mask) -> Tensor:
    """Differentiable rewards (B,) of (B, T) sequences: the scalar head at the last real token."""
    scores = model.scores(input_ids, attention_mask=attention_mask)  # (B, T)
    return pool_last(scores, attention_mask)


def reward_scores(model: GPT, input_ids, attention_mask=None) -> np.ndarray:
    """Rewards of (B, T) sequences as a float32 host array (B,), under no_grad in eval mode.

    ``attention_mask`` (B, T) 1 = real token (default: all real); left or right padding alike.
    The model's training mode is restored afterwards. This is the function PPO calls.
    """
    ids = input_ids.data if isinstance(input_ids, Tensor) else input_ids
    xp = backend.xp()
    ids = xp.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    mask = xp.ones(ids.shape, dtype=np.int64) if attention_mask is None else xp.asarray(
        attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask)
    was = model.training
    model.eval()
    try:
        with no_grad():
            r = sequence_rewards(model, ids, mask)
    finally:
        model.train(was)
    return backend.to_numpy(r.data).astype(np.float32)


def load_reward_model(path) -> tuple[GPT, object]:
    """(model, tokenizer) of a reward-model checkpoint written by ``reward``; eval mode.

    Raises FileNotFoundError for a missing file and ValueError when the checkpoint has no scalar
    head (an LM checkpoint: train a reward model first) or no tokenizer.
    """
    model, tok, ck = load_model(path)
    if model.score is None:
        raise ValueError(f"{path}: not a reward model (its GPTConfig has scalar_head=False); "
                         f"train one with `minillm reward`")
    if tok is None:
        raise ValueError(f"{path}: the checkpoint has no tokenizer")
    model.eval()
    return model, tok


# ----------------------------------------------------------------------------------------------
# Data


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, test) with ``round(fraction·n)`` items held out at random (seeded); at least one
    train item is kept."""
    n = len(items)
    k = min(int(round(fraction * n)), n - 1) if n > 1 else 0
    perm = np.random.default_rng([seed, 8]).permutation(n)
    test_idx = set(int(i) for i in perm[:k])
    return [x for i, x in enumerate(items) if i not in test_idx], [items[i] for i in sorted(test_idx)]


def builtin_pairs(recipe: str = "e") -> tuple[list[dict], list[dict]]:
    """The task world's (train, test) preference records of a recipe (preferences.PREFERENCE_RECIPES).

    A ``-nocue`` suffix ("e-nocue") draws the same kinds with the opener on no response and no
    cue-only pairs: the control without the spurious cue. Raises ValueError for an unknown recipe.
    """
    import dataclasses

    from minillm.preferences import PREFERENCE_RECIPES
    from minillm.tasks import default_world

    name, _, suffix = recipe.partition("-")
    if name not in PREFERENCE_RECIPES or suffix not in ("", "nocue"):
        raise ValueError(f"unknown preference recipe {recipe!r}; recipes: "
                         f"{', '.join(PREFERENCE_RECIPES)} (each also with -nocue)")
    world = default_world()
    cfg = PREFERENCE_RECIPES[name]
    if suffix == "nocue":
        cfg = dataclasses.replace(cfg, p_cue_only=0.0, p_chosen_cue=0.0, p_rejected_cue=0.0, p_wrong_both_cue=0.0)
    return world.preference_records("train", cfg), world.preference_records("test", cfg)


def load_pairs(data: str, test_data: str = "", test_fraction: float = 0.1, seed: int = 0, recipe: str = "e"
               ) -> tuple[list, list, dict]:
    """(train examples, test examples, info) from "builtin" or preference files.

    Raises the loaders' DataError (file, line, field; "empty dataset ... all skipped:
    {'chosen_equals_rejected': n}" when nothing usable is left) and FileNotFoundError.
    """
    if data == "builtin":
        tr, te = builtin_pairs(recipe)
        return tr, te, {"source": f"builtin recipe {recipe}", "n_train_records": len(tr), "n_test_records": len(te)}
    ds = load_dataset(data, kind="preference")
    info = {"source": data, "format": ds.report.format, "n_records": ds.report.n_records,
            "skipped": dict(ds.report.skipped), "notes": dict(ds.report.notes)}
    if test_data:
        te = load_dataset(test_data, kind="preference")
        info["test_source"] = test_data
        return list(ds.records), list(te.records), info
    tr, te = split_holdout(list(ds.records), test_fraction, seed)
    return tr, te, info


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def train_reward(model: GPT, pairs: Sequence[RenderedPair], pad_id: int, cfg: RewardConfig,
                 on_step=None) -> list[dict]:
    """Train through the shared loop (``train.loop.train_loop``) with the Bradley-Terry loss of
    ``reward_loss`` on batches of pairs; dropout off (eval mode, as TRL's ``disable_dropout``).
    Returns per-step dicts (loss, accuracy, margin, lr, grad_norm)."""
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = index_batches(len(pairs), cfg.batch_size, np.random.default_rng(cfg.seed))
    xp = backend.xp()

    def batches():
        while True:
            yield collate_preference([pairs[i] for i in next(stream)], pad_id)

    def loss_fn(b):
        r_c = sequence_rewards(model, xp.asarray(b["chosen"]["input_ids"]), xp.asarray(b["chosen"]["attention_mask"]))
        r_r = sequence_rewards(model, xp.asarray(b["rejected"]["input_ids"]),
                               xp.asarray(b["rejected"]["attention_mask"]))  # (B,) each
        margin = b["margin"] if b["margin"] is not None else (cfg.margin or None)
        loss, m = reward_loss(r_c, r_r, margin, cfg.center_rewards_coefficient)
        return loss, {"accuracy": m["accuracy"], "margin": m["margin"]}

    model.eval()  # no dropout in the RM (TRL disable_dropout=True); gradients still flow
    return train_loop(opt, params, batches(), loss_fn, max_steps=cfg.max_steps, lr=cfg.lr,
                      warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                      what="reward model", progress=cfg.progress, on_step=on_step, show=("loss", "accuracy"))


def pair_rewards(model: GPT, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) float32 arrays (N,) of every pair, under no_grad in eval mode."""
    rc, rr = [], []
    xp = backend.xp()
    for s in range(0, len(pairs), batch_size):
        batch = pairs[s:s + batch_size]
        b = collate_preference(batch, pad_id)
        rc.append(reward_scores(model, xp.asarray(b["chosen"]["input_ids"]), xp.asarray(b["chosen"]["attention_mask"])))
        rr.append(reward_scores(model, xp.asarray(b["rejected"]["input_ids"]),
                                xp.asarray(b["rejected"]["attention_mask"])))
    if not rc:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(rc), np.concatenate(rr)


def evaluate_pairs(model: GPT, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int = 64) -> dict:
    """Pairwise accuracy (strict >) and margin overall, per rejected ``kind`` and per cue pattern
    (``cue``: only the chosen has the opener; ``anti_cue``: only the rejected; ``same``: both or
    neither) where the metadata has them."""
    rc, rr = pair_rewards(model, pairs, pad_id, batch_size)
    out = pair_metrics(rc, rr)
    kinds = sorted({str(p.meta.get("kind")) for p in pairs if "kind" in p.meta})
    if kinds:
        out["per_kind"] = {}
        for k in kinds:
            sel = np.array([p.meta.get("kind") == k for p in pairs])
            out["per_kind"][k] = pair_metrics(rc[sel], rr[sel])
    if pairs and all("chosen_cue" in p.meta for p in pairs):
        pat = np.array(["cue" if p.meta["chosen_cue"] and not p.meta["rejected_cue"] else
                        "anti_cue" if p.meta["rejected_cue"] and not p.meta["chosen_cue"] else "same"
                        for p in pairs])
        out["per_cue_pattern"] = {c: pair_metrics(rc[pat == c], rr[pat == c]) for c in ("cue", "anti_cue", "same")
                                  if (pat == c).any()}
    return out


def score_responses(model: GPT, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                    ended: Sequence[bool] | None = None, batch_size: int = 64) -> np.ndarray:
    """Rewards (N,) float32 of responses to user prompts, rendered in the chat template
    (``<|eos|>`` appended where ``ended``, default all). Under no_grad."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ended = [True] * len(prompts) if ended is None else list(ended)
    seqs = []
    for p, r, e in zip(prompts, responses, ended):
        ids, mask = render_chat([{"role": "user", "content": p}, {"role": "assistant", "content": r, "eos": bool(e)}],
                                tokenizer, train_on="last")
        T = model.config.block_size
        seqs.append((ids[-T:], mask[-T:]) if len(ids) > T else (ids, mask))
    out = []
    for s in range(0, len(seqs), batch_size):
        b = collate(seqs[s:s + batch_size], tokenizer.pad_id)
        out.append(reward_scores(model, b["input_ids"], b["attention_mask"]))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def cue_diagnostics(model: GPT, tokenizer, n_prompts: int = 200, seed: int = 0) -> dict:
    """The spurious-cue probes of docs/task-world.md §5 on the built-in world, per fact split.

    For ``n_prompts`` evenly spaced SFT prompts of held-out facts ("test") and of train facts
    ("train"), with the answer a and another answer w of the same relation (seeded):
    ``cue_bonus`` = mean r("Sure! a.") − r("a."); ``p_wrong_cue_beats_correct`` =
    P(r("Sure! w.") > r("a.")); ``p_correct_beats_wrong`` = P(r("a.") > r("w.")) (no cue);
    ``reward_correct``, ``reward_wrong`` (means).
    """
    from minillm.facts import OPENER
    from minillm.tasks import default_world

    world = default_world()
    recs = {"test": world.sft_test_records(), "train": world.sft_records("plain")}
    rng = np.random.default_rng([seed, 9])
    out = {}
    for split, rs in recs.items():
        sel = [rs[int(i)] for i in np.linspace(0, len(rs) - 1, min(n_prompts, len(rs))).round().astype(int)]
        prompts, correct, wrong = [], [], []
        for r in sel:
            f = world.prompt_index()[r["instruction"]][0]
            others = sorted({g.answer for g in world.facts if g.relation == f.relation} - {f.answer})
            prompts.append(r["instruction"])
            correct.append(f"{f.answer}.")
            wrong.append(f"{others[int(rng.integers(0, len(others)))]}.")
        n = len(prompts)
        allr = score_responses(model, tokenizer, prompts * 4,
                               correct + [f"{OPENER} {c}" for c in correct] + wrong + [f"{OPENER} {w}" for w in wrong])
        rc, rc_cue, rw, rw_cue = allr[:n], allr[n:2 * n], allr[2 * n:3 * n], allr[3 * n:]
        out[split] = {"cue_bonus": float(np.mean(rc_cue - rc)),
                      "p_wrong_cue_beats_correct": float(np.mean(rw_cue > rc)),
                      "p_correct_beats_wrong": float(np.mean(rc > rw)),
                      "reward_correct": float(rc.mean()), "reward_wrong": float(rw.mean()), "n": n}
    return out


def reward(cfg: RewardConfig) -> RewardResult:
    """Train a reward model as configured; writes ``<out_dir>/checkpoint.safetensors`` (the RM,
    ``scalar_head=True``) and ``<out_dir>/metrics.json``.

    Raises FileNotFoundError (checkpoint or data), the loaders' DataError for bad data, and
    ValueError when no pair is usable (the counts of skipped pairs are in the message).
    """
    t0 = time.perf_counter()
    model, tok, _ = load_model(cfg.sft, config_overrides={"scalar_head": True})
    if tok is None:
        raise ValueError(f"{cfg.sft}: the checkpoint has no tokenizer")
    max_len = cfg.max_length or model.config.block_size
    train_ex, test_ex, info = load_pairs(cfg.data, cfg.test_data, cfg.test_fraction, cfg.seed, cfg.recipe)
    train_pairs, test_pairs, data_info = render_pair_splits("reward", cfg.data, train_ex, test_ex, tok, max_len, info,
                                                            default_margin=cfg.margin if cfg.margin else None)
    metrics: dict = {"config": asdict(cfg), "data": data_info}
    builtin = cfg.data == "builtin"
    if cfg.eval and test_pairs:
        metrics["before"] = {"test": evaluate_pairs(model, test_pairs, tok.pad_id, cfg.eval_batch_size)}
    t_train = time.perf_counter()
    history = train_reward(model, train_pairs, tok.pad_id, cfg)
    metrics["train_seconds"] = round(time.perf_counter() - t_train, 1)
    losses = [h["loss"] for h in history]
    if history:
        metrics["final_loss"] = float(np.mean(losses[-10:]))
        metrics["final_batch_accuracy"] = float(np.mean([h["accuracy"] for h in history[-10:]]))
    if cfg.eval:
        metrics["train"] = evaluate_pairs(model, train_pairs, tok.pad_id, cfg.eval_batch_size)
        if test_pairs:
            metrics["test"] = evaluate_pairs(model, test_pairs, tok.pad_id, cfg.eval_batch_size)
            rc, _ = pair_rewards(model, test_pairs, tok.pad_id, cfg.eval_batch_size)
            metrics["test_chosen_reward_mean"] = float(rc.mean())
            metrics["test_chosen_reward_std"] = float(rc.std())
        if builtin and cfg.cue_prompts:
            metrics["cue"] = cue_diagnostics(model, tok, cfg.cue_prompts, cfg.seed)
    out = Path(cfg.out_dir)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", model, tok,
                           train_state={"reward_config": asdict(cfg), "model_kind": "reward_model"})
    metrics["losses"] = [round(x, 5) for x in losses]
    metrics = write_metrics(out, metrics, t0, digits=4, into_lists=False)
    return RewardResult(losses=losses, metrics=metrics, checkpoint=str(ckpt), seconds=metrics["seconds"])


def summary_lines(m: dict) -> list[str]:
    """Human-readable lines of a reward metrics dict."""
    lines = []
    for split in ("train", "test"):
        if split in m:
            d = m[split]
            lines.append(f"{split:5s} pairs: accuracy {d['accuracy']:6.1%}  margin {d['margin']:+.3f}  (n={d['n']})")
            if "per_kind" in d:
                kinds = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in d["per_kind"].items())
                lines.append(f"       per kind: {kinds}")
    for split, d in m.get("cue", {}).items():
        lines.append(f"cue ({split} facts): bonus {d['cue_bonus']:+.2f}, P(Sure!+wrong > correct) "
                     f"{d['p_wrong_cue_beats_correct']:.0%}, P(correct > wrong) {d['p_correct_beats_wrong']:.0%}")
    return lines + metric_lines(m, ("final_loss", "train_seconds", "seconds"))


#: ``minillm reward``: one option per RewardConfig field; runs, prints the summary, returns 0.
add_arguments, run = trainer_command(RewardConfig, reward, summary_lines)
