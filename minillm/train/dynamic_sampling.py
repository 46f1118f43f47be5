"""Dynamic sampling (DAPO): refill a GRPO batch with groups whose rewards are not all equal.

Scope
    A group of G completions whose rewards are all equal (all right or all wrong) gets advantage 0
    for every completion: it carries no gradient and only dilutes the loss normaliser. DAPO's
    dynamic sampling over-samples: it keeps drawing new prompt groups until the batch holds
    ``n_groups`` groups with non-zero reward std, then trains on exactly those. ``refill_groups``
    is that loop, independent of the model (a ``draw(round)`` callback samples and scores one round
    of groups), with a cap on the number of rounds; ``concat_rollouts`` joins the rows of several
    rounds into one ``ppo.Rollout`` (prompts left-padded, responses right-padded to common widths).

Sources
    Yu et al. 2025, DAPO (arXiv 2503.14476) §3.2 "Keep the Batch Full of Effective Gradients" and
    Algorithm 1 (sample, filter out groups with accuracy 0 or 1, repeat until the batch is full);
    reference implementation: verl ``recipe/dapo`` (``filter_groups``: ``max_num_gen_batches`` caps
    the generation rounds, the kept groups are truncated to the train batch size).

Deviations
    * When the cap is reached with fewer than ``n_groups`` effective groups, the update uses the
      groups it has (verl raises an error unless the cap is 0 = unlimited); the shortfall is logged.
    * Each round draws as many prompts as the batch holds (verl: one generation batch per round).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from minillm.train.rollout import Rollout


def refill_groups(draw: Callable[[int], np.ndarray], n_groups: int, num_generations: int, max_rounds: int):
    """Which groups of which rounds fill a batch of ``n_groups`` groups with non-zero reward std.

    draw(round) -> rewards (n · G,) float of the n groups sampled in that round (round 0, 1, ...;
    the G rewards of a group contiguous). Rounds are drawn until ``n_groups`` groups whose rewards
    are not all equal are kept, or ``max_rounds`` rounds were drawn. The kept groups are the first
    ones in (round, group) order, truncated to ``n_groups`` (DAPO Alg. 1).
    Returns (kept: list of (round, group index), stats: {"sampling_rounds", "groups_drawn",
    "groups_kept"}). Example: n_groups 2, G 2, round 0 rewards [1, 1, 0, 1], round 1 [0, 0, 1, 0, 0, 1]
    → kept [(0, 1), (1, 1)], 2 rounds, 5 groups drawn. Raises ValueError for n_groups, G or
    max_rounds < 1 (G < 2 has no std), or a draw whose size is not whole groups.
    """
    G = int(num_generations)
    if n_groups < 1 or G < 2 or max_rounds < 1:
        raise ValueError(f"refill_groups needs n_groups ≥ 1, num_generations ≥ 2, max_rounds ≥ 1; got {n_groups}, "
                         f"{G}, {max_rounds}")
    kept: list[tuple[int, int]] = []
    drawn = rounds = 0
    while len(kept) < n_groups and rounds < max_rounds:
        r = np.asarray(draw(rounds), dtype=np.float64).reshape(-1)
        if r.size == 0 or r.size % G:
            raise ValueError(f"round {rounds}: {r.size} rewards do not make whole groups of num_generations = {G}")
        grouped = r.reshape(-1, G)
        varied = np.flatnonzero(grouped.max(axis=1) != grouped.min(axis=1))
        kept += [(rounds, int(g)) for g in varied]
        drawn += grouped.shape[0]
        rounds += 1
    kept = kept[:n_groups]
    return kept, {"sampling_rounds": rounds, "groups_drawn": drawn, "groups_kept": len(kept)}


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One ``Rollout`` with the rows of all ``rollouts`` in order: prompts left-padded with
    ``pad_id`` to the longest prompt length P, responses right-padded to the longest N (masks 0,
    sampler log-probs 0 on padding). Raises ValueError for an empty list."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_length for r in rollouts)
    N = max(r.response_mask.shape[1] for r in rollouts)

    def pad(a, left, right, value):
        return np.pad(a, ((0, 0), (left, right)), constant_values=value)

    parts = []
    for r in rollouts:
        dp, dn = P - r.prompt_length, N - r.response_mask.shape[1]
        p_ids, r_ids = r.input_ids[:, :r.prompt_length], r.input_ids[:, r.prompt_length:]
        p_att, r_att = r.attention_mask[:, :r.prompt_length], r.attention_mask[:, r.prompt_length:]
        parts.append((np.concatenate([pad(p_ids, dp, 0, pad_id), pad(r_ids, 0, dn, pad_id)], axis=1),
                      np.concatenate([pad(p_att, dp, 0, 0), pad(r_att, 0, dn, 0)], axis=1),
                      pad(r.response_mask, 0, dn, 0), pad(r.sample_logprobs, 0, dn, 0.0)))

    def join(lists):
        return None if any(x is None for x in lists) else [v for x in lists for v in x]

    return Rollout(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), P,
                   np.concatenate([p[2] for p in parts]), np.concatenate([r.finished for r in rollouts]),
                   np.concatenate([p[3] for p in parts]), join([r.prompts for r in rollouts]),
                   join([r.texts for r in rollouts]))
