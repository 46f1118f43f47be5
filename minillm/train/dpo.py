"""Direct preference optimization (DPO) and its IPO / cDPO / robust / hinge variants.

Scope
    ``dpo(DPOConfig)`` starts the policy from an SFT checkpoint (full fine-tuning, or LoRA on a
    frozen base), renders every preference pair once (``data.render_preference_pairs``: the same
    prompt ids for both responses, labels −100 on the prompt), computes the **reference**
    log-probabilities once up front with the frozen SFT model (TRL's
    ``precompute_ref_log_probs=True``), then trains on ``dpo_loss`` of summed response
    log-probabilities (``GPT.sequence_logprobs``), plus by default an NLL term on the chosen
    responses (RPO; see Deviations). Dropout is switched off in policy and reference
    (every Dropout p set to 0, as TRL's ``disable_dropout``), so the policy equals the reference at
    step 0: DPO loss ln 2 with a nonzero gradient (docs/bugs.md C20).

    The policy is evaluated before and after on the built-in world (held-out-fact and train-fact
    prompts, greedy and sampled at ``eval_temperature``): gold, exact match, opener rate, the rate
    of each fault the gold judge detects (repetition, too long, rude, malformed, not ended), mean
    length, the KL to the reference on sampled responses (``evaluate.sequence_kl``, summed per
    response, nats) and, with ``reward_model``, the mean RM score. Held-out pairs give the
    implicit-reward accuracy. Writes ``metrics.json`` and ``checkpoint.safetensors`` (LoRA merged).

Sources
    * Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7 (loss) and §5
      (implicit reward r̂ = β log π/π_ref); App. B (β = 0.1).
    * eric-mitchell/direct-preference-optimization ``trainers.py`` ``preference_loss`` (cDPO label
      smoothing, IPO on summed log-probs, rewards and their accuracy), ``_get_batch_logps``
      (summed, average_log_prob=False).
    * IPO: Azar et al. 2023, arXiv 2310.12036, Eq. 17. Robust DPO: Chowdhury et al. 2024,
      arXiv 2403.00409 (TRL ``loss_type="robust"``). Hinge: SLiC, Zhao et al. 2023.
    * TRL ``trl/trainer/dpo_trainer.py`` ``_compute_loss`` and ``dpo_config.py`` (metric names
      rewards/chosen|rejected|margins|accuracies, logps/chosen|rejected; defaults).
    * Defaults for this model: docs/rlhf-notes.md §4 (DPO row: β 0.1, 100 steps, B 32); lr and the SFT term
      chosen here (Deviations).

Deviations
    * ``label_smoothing`` applies to ``"sigmoid"`` (cDPO, as eric-mitchell and TRL ≤ 0.28); TRL
      ≥ 0.29 ignores it there (docs/bugs.md C23). ``label_smoothing=0`` gives plain DPO either way.
    * IPO uses summed log-probs (eric-mitchell); TRL divides each sequence's log-ratio by its
      number of completion tokens: ``ipo_length_normalize=True`` restores TRL's form.
    * The reference log-probs are computed once before training (TRL's opt-in
      ``precompute_ref_log_probs``), not per batch; they are identical because the reference is
      frozen and dropout is off. With LoRA the reference is the policy before training, i.e. the
      adapter-disabled base (B = 0 at init), which is what TRL uses when no ref model is given;
      no second copy of the weights is needed for training (evaluation loads one for the KL).
    * **The default loss adds an SFT term**: ``sft_weight`` α = 1 adds α · (mean NLL per chosen
      completion token) (RPO, Pang et al. 2024, arXiv 2404.19733; TRL ``loss_type=["sigmoid",
      "sft"]``, ``loss_weights=[1, α]``). ``--sft-weight 0`` restores the paper's loss (Eq. 7 alone).
      The reason: on a model this small, plain DPO pushes the rejected log-probs down by tens of
      nats while the chosen ones fall too, and the freed probability mass goes to token salad (the
      KL to the reference explodes and gold falls, even at lower learning rates); the NLL term keeps
      the chosen responses likely. ``minillm dpo --sft-weight 0`` shows the collapse (chapter 10
      explains it).
    * Learning rate 1e-4 with AdamW instead of the paper's 1e-6 RMSprop: a 0.9 M-parameter model
      trained for 100 steps needs a far larger step (``--lr`` to change it).
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
from minillm.data import RenderedPair, collate_preference
from minillm.model import GPT, left_pad
from minillm.nn import disable_dropout
from minillm.optim import AdamW, weight_decay_groups
from minillm.tensor import Tensor, no_grad
from minillm.train.common import (LoRAConfig, OptimConfig, TrainResult, metric_lines, render_pair_splits,
                                  trainer_command, write_metrics)
from minillm.train.loop import index_batches, train_loop
from minillm.train.reward import load_pairs

LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


@dataclass
class DPOConfig(LoRAConfig, OptimConfig):
    """Settings of a DPO run (CLI: ``minillm dpo --beta 0.1 --max-steps 100``): the shared optimizer and
    LoRA fields (``OptimConfig``, ``LoRAConfig``) with DPO's measured defaults, and DPO's own.

    sft: checkpoint of the policy's start and of the reference; data: "builtin" (pairs of
    ``recipe``) or a preference file; beta: β (the strength of the implicit KL constraint);
    loss_type: sigmoid (DPO) | ipo | robust | hinge; label_smoothing: ε of cDPO/robust.
    """

    sft: str = "runs/sft/checkpoint.safetensors"
    data: str = "builtin"
    recipe: str = "e"  # built-in pairs: a | c | e, or "e-nocue" (no opener anywhere: the cue-free control)
    test_data: str = ""
    test_fraction: float = 0.1
    out_dir: str = "runs/dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ipo_length_normalize: bool = False
    sft_weight: float = 1.0  # α of an added NLL on the chosen tokens (RPO; TRL loss_type ["sigmoid", "sft"]); 0 = DPO
    max_steps: int = 100
    lr: float = 1e-4
    max_length: int = 0  # 0 = the model's block_size
    eval: bool = True
    eval_prompts: int = 200  # per fact split (held-out facts, train facts)
    eval_temperature: float = 0.7
    max_new_tokens: int = 12
    reward_model: str = ""  # optional RM checkpoint: mean RM score of the sampled responses
    ref_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.lora_dropout != 0:
            raise ValueError(f"lora_dropout must be 0 for DPO (dropout is off so the policy equals the reference "
                             f"at step 0), got {self.lora_dropout}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be ≥ 0, got {self.sft_weight}")


DPOResult = TrainResult  # history: per-step metric dicts; metrics, checkpoint path, seconds


# ----------------------------------------------------------------------------------------------
# The loss


def _as_input(x, like: Tensor | None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    arr = backend.xp().asarray(x)
    return Tensor(arr.astype(like.dtype if like is not None else np.float32, copy=False))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None) -> tuple[Tensor, dict]:
    """The DPO loss of summed response log-probabilities, mean over the batch.

    With h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)) (nats):

    * ``"sigmoid"`` (DPO, arXiv 2305.18290 Eq. 7; cDPO with ε): −(1−ε)·log σ(βh) − ε·log σ(−βh)
    * ``"robust"`` (arXiv 2403.00409): ((1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))) / (1 − 2ε)
    * ``"ipo"`` (arXiv 2310.12036 Eq. 17): (h − 1/(2β))², on summed log-probs as eric-mitchell;
      given ``chosen_lengths``/``rejected_lengths`` (completion tokens) each log-ratio is divided
      by max(length, 1) first, as TRL does.
    * ``"hinge"`` (SLiC): max(0, 1 − βh)

    log σ is computed as −softplus(−x): finite for any h (docs/bugs.md B16: βh = −1000 gives 1000).
    Example (docs/bugs.md C23): π_c −10, π_r −12, ref −11/−11, β 0.1 -> DPO 0.5981389, cDPO ε 0.1
    0.6181389, robust 0.5731389, IPO 9.0.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,)
            Tensors or arrays (nats). Tensors keep their graph: the loss is differentiable in all
            four (the trainer passes the reference as constant arrays).
        beta: β > 0. loss_type: see above. label_smoothing: ε in [0, 0.5).
    Returns:
        ``(loss, metrics)``: scalar Tensor; metrics (floats) ``loss``, ``rewards/chosen`` (mean
        β(π_c − ref_c)), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
        (strict chosen > rejected reward: a tie counts as wrong), ``logps/chosen``,
        ``logps/rejected`` (means of the policy's summed log-probs).
    Raises:
        ValueError: unknown loss_type, β ≤ 0, ε outside [0, 0.5), shapes that differ.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    like = next((t for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
                 if isinstance(t, Tensor)), None)
    pc, pr, rc, rr = (_as_input(t, like) for t in (policy_chosen_logps, policy_rejected_logps,
                                                   ref_chosen_logps, ref_rejected_logps))
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or len(pc.shape) != 1:
        raise ValueError(f"dpo_loss: the four log-probs must all be (B,), got {pc.shape}, {pr.shape}, "
                         f"{rc.shape}, {rr.shape}")
    chosen_logratios = pc - rc  # log π(y_w)/π_ref(y_w), (B,)
    rejected_logratios = pr - rr
    eps = label_smoothing
    if loss_type == "ipo":
        if chosen_lengths is not None or rejected_lengths is not None:  # TRL's length-normalised IPO
            xp = backend.xp()
            lc = xp.maximum(xp.asarray(chosen_lengths, dtype=pc.dtype), 1)
            lr = xp.maximum(xp.asarray(rejected_lengths, dtype=pc.dtype), 1)
            h = chosen_logratios / lc - rejected_logratios / lr
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1.0 / (2.0 * beta)) ** 2  # Azar et al. Eq. 17
    else:
        z = beta * (chosen_logratios - rejected_logratios)  # β·h, the argument of Eq. 7
        if loss_type == "sigmoid":
            losses = -(1.0 - eps) * F.logsigmoid(z)  # Eq. 7
            if eps:
                losses = losses - eps * F.logsigmoid(-z)  # cDPO: the label is flipped with prob. ε
        elif loss_type == "robust":
            losses = ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)
        else:  # hinge
            losses = F.relu(1.0 - z)
    loss = losses.mean()
    host = lambda t: backend.to_numpy(t.data).astype(np.float64)  # noqa: E731
    cr = beta * host(chosen_logratios)  # implicit rewards (§5), detached
    rj = beta * host(rejected_logratios)
    metrics = {"loss": float(loss.item()), "rewards/chosen": float(cr.mean()), "rewards/rejected": float(rj.mean()),
               "rewards/margins": float((cr - rj).mean()), "rewards/accuracies": float((cr > rj).mean()),
               "logps/chosen": float(host(pc).mean()), "logps/rejected": float(host(pr).mean())}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Log-probabilities


def pair_logps(model: GPT, batch: dict) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (B,) of the chosen and rejected halves of ``collate_preference`` output
    (labels −100 on prompt and padding, so neither leaks in: docs/bugs.md B16). Differentiable."""
    xp = backend.xp()
    out = []
    for half in ("chosen", "rejected"):
        b = batch[half]
        out.append(model.sequence_logprobs(xp.asarray(b["input_ids"]), xp.asarray(b["labels"]),
                                           attention_mask=xp.asarray(b["attention_mask"])))
    return out[0], out[1]


def response_lengths(pairs: Sequence[RenderedPair]) -> tuple[np.ndarray, np.ndarray]:
    """Completion tokens (response + ``<|eos|>``) per pair: (chosen (N,), rejected (N,)) int64."""
    return (np.array([sum(p.chosen_mask) for p in pairs], dtype=np.int64),
            np.array([sum(p.rejected_mask) for p in pairs], dtype=np.int64))


def precompute_ref_logps(model: GPT, pairs: Sequence[RenderedPair], pad_id: int, batch_size: int = 64
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Reference log-probs of every pair, once: (chosen (N,), rejected (N,)) float32, under
    no_grad in eval mode (TRL ``precompute_ref_log_probs``)."""
    was = model.training
    model.eval()
    rc, rr = [], []
    try:
        with no_grad():
            for s in range(0, len(pairs), batch_size):
                c, r = pair_logps(model, collate_preference(pairs[s:s + batch_size], pad_id))
                rc.append(backend.to_numpy(c.data))
                rr.append(backend.to_numpy(r.data))
    finally:
        model.train(was)
    if not rc:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(rc).astype(np.float32), np.concatenate(rr).astype(np.float32)


def evaluate_pairs(model: GPT, pairs: Sequence[RenderedPair], ref_c: np.ndarray, ref_r: np.ndarray, pad_id: int,
                   cfg: DPOConfig) -> dict:
    """DPO metrics (loss, rewards/*, logps/*) over all ``pairs`` with precomputed reference logps."""
    pc, pr = precompute_ref_logps(model, pairs, pad_id, cfg.ref_batch_size)
    lens = response_lengths(pairs) if cfg.ipo_length_normalize and cfg.loss_type == "ipo" else (None, None)
    with no_grad():
        _, m = dpo_loss(pc, pr, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing, *lens)
    return m


# ----------------------------------------------------------------------------------------------
# Training


def train_dpo(model: GPT, pairs: Sequence[RenderedPair], ref_c: np.ndarray, ref_r: np.ndarray, pad_id: int,
              cfg: DPOConfig, on_step=None) -> list[dict]:
    """Train through the shared loop (``train.loop.train_loop``) with ``dpo_loss`` (+ the RPO term);
    returns per-step metric dicts with ``loss_dpo`` (the preference loss), ``nll`` (the RPO term, when
    ``sft_weight`` > 0), ``loss`` (the total that is minimised), TRL's ``rewards/*`` and ``logps/*``,
    ``lr`` and ``grad_norm``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    stream = index_batches(len(pairs), cfg.batch_size, np.random.default_rng(cfg.seed))
    lens_c, lens_r = response_lengths(pairs)
    use_lens = cfg.loss_type == "ipo" and cfg.ipo_length_normalize

    def batches():
        while True:
            idx = next(stream)
            yield idx, collate_preference([pairs[i] for i in idx], pad_id)

    def loss_fn(item):
        idx, b = item
        pc, pr = pair_logps(model, b)  # (B,), (B,)
        loss, m = dpo_loss(pc, pr, ref_c[idx], ref_r[idx], cfg.beta, cfg.loss_type, cfg.label_smoothing,
                           lens_c[idx] if use_lens else None, lens_r[idx] if use_lens else None)
        m["loss_dpo"] = m.pop("loss")  # the preference loss alone, comparable with the held-out pairs'
        if cfg.sft_weight:  # RPO: + α · mean NLL per chosen token (TRL loss_type "sft", arXiv 2404.19733 Eq. 2)
            nll = -pc.sum() / max(int(lens_c[idx].sum()), 1)
            loss = loss + cfg.sft_weight * nll
            m["nll"] = float(nll.item())
        return loss, m  # the loop logs ``loss``: loss_dpo (+ sft_weight · nll)

    model.train()  # dropout is already p = 0 (disable_dropout); train mode changes nothing else
    history = train_loop(opt, params, batches(), loss_fn, max_steps=cfg.max_steps, lr=cfg.lr,
                         warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                         what="DPO" + (" (lora)" if cfg.lora else ""), progress=cfg.progress, on_step=on_step,
                         show=("loss", "rewards/accuracies"))
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Evaluation on the built-in world


def policy_eval(model: GPT, tokenizer, records: Sequence[dict], judge, temperature: float = 0.0, seed: int = 0,
                max_new_tokens: int = 12, reference: GPT | None = None, reward_model: GPT | None = None,
                batch_size: int = 64, n_samples: int = 4) -> dict:
    """Generate one response per record's instruction and score it with the gold judge.

    Returns fractions ``exact_match``, ``opener_rate``, the fault rates ``repetition``,
    ``too_long`` (1 − concise), ``rude`` (1 − polite), ``malformed`` (1 − well_formed),
    ``not_ended``; means ``gold`` and ``mean_length`` (tokens); with ``reference`` and
    temperature > 0 the mean ``kl`` (Σ_t log π/π_ref over the response, nats); with
    ``reward_model`` the mean ``rm_score``; a few ``samples``.
    """
    from minillm.evaluate import prompt_ids_for, sequence_kl
    from minillm.train.reward import score_responses

    limit = model.config.block_size - max_new_tokens
    prompts = [prompt_ids_for(tokenizer, r["instruction"], (), limit)[0] for r in records]
    rng = np.random.default_rng([seed, 10]) if temperature > 0 else None
    texts, ended, lengths, kls = [], [], [], []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], tokenizer.pad_id)
        g = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rng=rng)
        for row in range(len(ids)):
            n = int(g.response_mask[row].sum())
            toks = [int(t) for t in g.new_tokens[row, :n]]
            fin = bool(g.finished[row])
            texts.append(tokenizer.decode(toks[:-1] if fin else toks))
            ended.append(fin)
            lengths.append(n)
        if reference is not None and temperature > 0:
            attn = np.concatenate([g.prompt_mask, g.response_mask], axis=1)
            kls.append(sequence_kl(model, reference, g.sequences, attn, g.response_mask, temperature))
    js = [judge.score(r["instruction"], t, ended=e) for r, t, e in zip(records, texts, ended)]
    n = max(len(js), 1)
    out = {"exact_match": sum(j.correct for j in js) / n, "gold": sum(j.total for j in js) / n,
           "opener_rate": sum(j.opener for j in js) / n, "repetition": sum(j.repetition for j in js) / n,
           "too_long": sum(1 - j.concise for j in js) / n, "rude": sum(1 - j.polite for j in js) / n,
           "malformed": sum(1 - j.well_formed for j in js) / n, "not_ended": sum(not e for e in ended) / n,
           "mean_length": float(np.mean(lengths)) if lengths else 0.0, "n": len(js)}
    if kls:
        out["kl"] = float(np.concatenate(kls).mean())
    if reward_model is not None:
        out["rm_score"] = float(score_responses(reward_model, tokenizer, [r["instruction"] for r in records], texts,
                                                ended).mean())
    out["samples"] = [(r["instruction"], t) for r, t in zip(records[:n_samples], texts[:n_samples])]
    return out


def world_eval(model: GPT, tokenizer, cfg: DPOConfig, reference: GPT | None = None,
               reward_model: GPT | None = None) -> dict:
    """``policy_eval`` on ``cfg.eval_prompts`` evenly spaced held-out-fact ("test") and train-fact
    ("train") prompts of the built-in world, greedy and sampled at ``cfg.eval_temperature``."""
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world

    world = default_world()
    judge = GoldJudge(world)
    out = {}
    for split, recs in (("test", world.sft_test_records()), ("train", world.sft_records("plain"))):
        k = min(cfg.eval_prompts, len(recs))
        sel = [recs[int(i)] for i in np.linspace(0, len(recs) - 1, k).round().astype(int)]
        out[split] = {"greedy": policy_eval(model, tokenizer, sel, judge, 0.0, cfg.seed, cfg.max_new_tokens,
                                            reward_model=reward_model)}
        if cfg.eval_temperature > 0:
            out[split][f"T{cfg.eval_temperature:g}"] = policy_eval(
                model, tokenizer, sel, judge, cfg.eval_temperature, cfg.seed, cfg.max_new_tokens,
                reference=reference, reward_model=reward_model)
    return out


def dpo(cfg: DPOConfig) -> DPOResult:
    """Run DPO as configured; writes ``<out_dir>/checkpoint.safetensors`` and ``metrics.json``.

    Raises FileNotFoundError (checkpoint or data), the loaders' DataError for bad data, and
    ValueError when no pair is usable (the skip counts are in the message).
    """
    t0 = time.perf_counter()
    model, tok, _ = load_model(cfg.sft)
    if tok is None:
        raise ValueError(f"{cfg.sft}: the checkpoint has no tokenizer")
    disable_dropout(model)
    model.eval()
    max_len = cfg.max_length or model.config.block_size
    train_ex, test_ex, info = load_pairs(cfg.data, cfg.test_data, cfg.test_fraction, cfg.seed, cfg.recipe)
    train_pairs, test_pairs, data_info = render_pair_splits("dpo", cfg.data, train_ex, test_ex, tok, max_len, info,
                                                            trainer="DPO")
    metrics: dict = {"config": asdict(cfg), "data": data_info}
    t_ref = time.perf_counter()
    ref_c, ref_r = precompute_ref_logps(model, train_pairs, tok.pad_id, cfg.ref_batch_size)
    test_ref = precompute_ref_logps(model, test_pairs, tok.pad_id, cfg.ref_batch_size)
    metrics["ref_seconds"] = round(time.perf_counter() - t_ref, 1)
    builtin = cfg.data == "builtin"
    rm = None
    if cfg.reward_model:
        from minillm.train.reward import load_reward_model

        rm, _ = load_reward_model(cfg.reward_model)
    if cfg.eval and builtin:
        metrics["before"] = world_eval(model, tok, cfg, reference=None, reward_model=rm)
        for split in metrics["before"].values():  # the policy is the reference: KL 0 exactly
            for mode, d in split.items():
                if mode != "greedy":
                    d["kl"] = 0.0
    if cfg.lora:
        from minillm.lora import count_parameters, inject_lora, parse_target_modules

        inject_lora(model, parse_target_modules(cfg.lora_targets), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                    lora_dropout=0.0, seed=cfg.seed)
        metrics["parameters"] = count_parameters(model)
    else:
        n = model.num_parameters()
        metrics["parameters"] = {"trainable": n, "total": n, "percent": 100.0}
    t_train = time.perf_counter()
    history = train_dpo(model, train_pairs, ref_c, ref_r, tok.pad_id, cfg)
    metrics["train_seconds"] = round(time.perf_counter() - t_train, 1)
    if history:
        last = history[-10:]
        metrics["final"] = {k: float(np.mean([h[k] for h in last])) for k in last[0] if k not in ("step", "lr")}
    if cfg.lora:
        from minillm.lora import merge_and_unload

        model = merge_and_unload(model)
        model.requires_grad_(True)
    if cfg.eval:
        if test_pairs:
            metrics["test_pairs"] = evaluate_pairs(model, test_pairs, test_ref[0], test_ref[1], tok.pad_id, cfg)
        if builtin:
            reference, _, _ = load_model(cfg.sft)
            disable_dropout(reference)
            reference.eval()
            metrics["after"] = world_eval(model, tok, cfg, reference=reference, reward_model=rm)
    out = Path(cfg.out_dir)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", model, tok,
                           train_state={"dpo_config": asdict(cfg), "model_kind": "policy"})
    metrics["history"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history]
    metrics = write_metrics(out, metrics, t0, digits=4, into_lists=False)
    return DPOResult(history=history, metrics=metrics, checkpoint=str(ckpt), seconds=metrics["seconds"])


_SHOW = ("gold", "exact_match", "opener_rate", "repetition", "too_long", "rude", "malformed", "not_ended",
         "mean_length", "kl", "rm_score")


def summary_lines(m: dict) -> list[str]:
    """Human-readable lines of a DPO metrics dict: before -> after per split and decoding."""
    lines = []
    if "final" in m:
        f = m["final"]
        total = f"  (+ NLL {f['nll']:.4f}: total {f['loss']:.4f})" if "nll" in f else ""
        lines.append(f"final train: DPO loss {f['loss_dpo']:.4f}{total}  reward acc {f['rewards/accuracies']:.1%}  "
                     f"margin {f['rewards/margins']:+.3f}")
    if "test_pairs" in m:
        t = m["test_pairs"]
        lines.append(f"held-out pairs: DPO loss {t['loss']:.4f}  reward acc {t['rewards/accuracies']:.1%}  "
                     f"margin {t['rewards/margins']:+.3f}")
    for split, modes in m.get("after", {}).items():
        for mode, a in modes.items():
            b = m.get("before", {}).get(split, {}).get(mode, {})
            parts = [f"{k} {b[k]:.3f}->{a[k]:.3f}" if k in b else f"{k} {a[k]:.3f}" for k in _SHOW if k in a]
            lines.append(f"{split}/{mode}: " + ", ".join(parts))
    return lines + metric_lines(m, ("ref_seconds", "train_seconds", "seconds"))


def _base_alias(parser) -> None:
    import argparse

    parser.add_argument("--base", dest="sft", default=argparse.SUPPRESS,
                        help="alias of --sft: the starting model (checkpoint, run or Hugging Face GPT-2 directory)")


#: ``minillm dpo``: one option per DPOConfig field and ``--base`` (= ``--sft``); runs, prints the summary.
add_arguments, run = trainer_command(DPOConfig, dpo, summary_lines, extra_arguments=_base_alias)
