"""The one training loop: every trainer (pretraining, SFT, the reward model, DPO) calls it with its
own batches and its own loss; PPO and GRPO call its optimizer step inside their rollout loops.

Scope
    ``train_loop`` runs ``max_steps`` optimizer steps: learning rate from the warmup + cosine
    schedule → next batch → the trainer's ``loss_fn`` → finite check → zero_grad → backward →
    gradient clipping → AdamW step → one logged record → progress bar → the trainer's ``on_step``
    callback (evaluation, checkpoints). With ``weight_fn`` each step's batch is a list of
    micro-batches whose gradients are accumulated as the per-token mean over all of them
    (``accumulate_gradients``), so accumulation equals one big batch (docs/bugs.md B05).
    ``optimizer_step`` is the part after the loss, shared by the loops that are not a plain
    sequence of batches (PPO's and GRPO's epochs over a rollout).

Sources
    nanoGPT ``train.py`` (schedule, clipping, the order of the step); PyTorch's
    ``zero_grad → backward → clip_grad_norm_ → step``; transformers ``Trainer``
    (gradient accumulation: the loss of each micro-batch scaled so the sum is the batch's mean;
    ``num_items_in_batch`` weighting by tokens).

Deviations
    None: the loop holds no method-specific logic; each trainer's loss states its own.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from minillm.optim import clip_grad_norm_, cosine_lr, set_lr
from minillm.train.common import check_finite

#: loss_fn(batch) -> (loss: scalar Tensor, metrics: dict of floats logged with the step)
LossFn = Callable[[object], tuple]


def index_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless stream of index batches: a fresh permutation per epoch (no example repeats within one;
    an epoch's tail is completed from the next permutation)."""
    perm: list[int] = []
    while True:
        while len(perm) < batch_size:
            perm += [int(i) for i in rng.permutation(n)]
        yield perm[:batch_size]
        perm = perm[batch_size:]


def accumulate_gradients(micro_batches: list, loss_sum_fn: Callable[[object], object],
                         n_tokens_fn: Callable[[object], int]) -> tuple[float, int]:
    """Backward over micro-batches so the gradient equals that of one big batch (docs/bugs.md B05).

    ``loss_sum_fn(mb)`` returns the *summed* loss of a micro-batch (a scalar Tensor, nats);
    ``n_tokens_fn(mb)`` its number of supervised tokens. Every micro-batch loss is divided by the
    total count N of the whole step before its backward, so the gradients add up to ∇(Σ loss / N):
    the mean over *all* targets, not a mean of micro-batch means. Gradients are added to what the
    parameters hold (the caller zeroes them first). Returns (mean loss per token, N). A step with
    no supervised token returns (0.0, 0) and leaves the gradients untouched (no NaN).
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


def optimizer_step(opt, params: list, grad_clip: float) -> float:
    """Clip the gradient norm of ``params`` to ``grad_clip`` (0: no clipping) and take one step.
    Returns the norm before clipping (NaN when not clipped)."""
    grad_norm = clip_grad_norm_(params, grad_clip) if grad_clip > 0 else math.nan
    opt.step()
    return float(grad_norm)


def train_loop(opt, params: list, batches: Iterator, loss_fn: LossFn, *, max_steps: int, lr: float,
               warmup_steps: int = 0, min_lr_ratio: float = 0.1, grad_clip: float = 1.0,
               weight_fn: Callable[[object], int] | None = None, start_step: int = 0, what: str = "train",
               progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
               show: tuple = ("loss",)) -> list[dict]:
    """Run steps ``start_step .. max_steps - 1`` and return one record per step.

    Args:
        opt: the optimizer (``optim.AdamW`` or ``PagedAdamW``) over ``params``.
        params: the trainable parameters (clipped together).
        batches: yields one batch per step (a list of micro-batches when ``weight_fn`` is given).
        loss_fn: ``batch -> (loss, metrics)``: a scalar Tensor (mean over the batch's targets) and a
            dict of floats logged with the step.
        max_steps, lr, warmup_steps, min_lr_ratio: the schedule (``optim.cosine_lr``).
        grad_clip: max global gradient norm (0: off).
        weight_fn: ``micro_batch -> number of targets``; turns on gradient accumulation.
        start_step: first step (a resumed run); the schedule continues from it.
        what: the trainer's name, for the progress bar and error messages.
        on_step: called after every step with (step, record).
        show: record keys shown on the progress bar.
    Returns:
        ``[{"step", "loss", **metrics, "lr", "grad_norm"}, ...]`` (floats; loss in nats).
    Raises:
        FloatingPointError naming ``what`` and the step when a loss is NaN or infinite.
    """
    history = []
    bar = tqdm(range(start_step, max_steps), desc=what, disable=not progress, initial=start_step, total=max_steps)
    for step in bar:
        lr_now = cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio)
        set_lr(opt, lr_now)
        batch = next(batches)
        opt.zero_grad()
        if weight_fn is None:
            loss, metrics = loss_fn(batch)
            check_finite(loss, step, what)
            loss.backward()
            value = float(loss.item())
        else:  # loss_fn gives each micro-batch's mean; times its targets, the sum the accumulation needs
            metrics = {}

            def loss_sum(b):
                loss, metrics_b = loss_fn(b)
                check_finite(loss, step, what)
                metrics.update(metrics_b)
                return loss * weight_fn(b)

            value, _ = accumulate_gradients(batch, loss_sum, weight_fn)
        grad_norm = optimizer_step(opt, params, grad_clip)
        record = {"step": step, "loss": value, **metrics, "lr": lr_now, "grad_norm": grad_norm}
        history.append(record)
        bar.set_postfix({k: f"{record[k]:.3f}" for k in show if k in record})
        if on_step is not None:
            on_step(step, record)
    return history
