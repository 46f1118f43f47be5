"""Verifiable tasks for RL (chapter 14): arithmetic whose answers a program checks, with held-out problems.

Scope
    Tasks beside the fact world of ``minillm.tasks``: the answer of "What is 47 + 38?" is computed,
    not looked up, so a program verifies any response (the rule-based accuracy reward of
    DeepSeek-R1, arXiv 2501.12948 §2.2.2) and held-out problems test a skill, not a memorised fact.

    * ``AdditionTask`` -- both operands have exactly ``n_digits`` digits (2: "47 + 38"), every
      problem enumerated; the answers are 2 or 3 digits, so a completion's length hardly varies.
    * ``MixedAdditionTask`` -- each operand has 1 to ``max_digits`` digits (uniform), sampled; the
      sums have 1 to ``max_digits`` + 1 digits, so completions vary in length (4 to 6 tokens for
      2 digits, 4 to 9 for 5): the task on which the length bias of ``loss_type="grpo"`` (Liu et
      al. 2025) can show at all. Measured: the 1,000-step start solves the 2-digit version
      sometimes (pass@1 0.09, pass@8 0.5), the 3- and 5-digit versions almost never (pass@1 0.007,
      0.003), which leaves GRPO no signal.
    * ``addition_accuracy_reward`` / ``addition_format_reward`` -- TRL-signature reward functions
      for both tasks (the same question form); ``addition_digit_reward`` -- per-digit partial
      credit (an option, not the default: from the 1,200-step starts, 150 iterations × 16 prompts,
      it gained less than the exact-answer reward; held-out pass@1 gains on 815 problems, seeds 0 / 1,
      digit vs exact: −0.003 ± 0.008 / +0.067 ± 0.007 vs +0.021 ± 0.007 / +0.060 ± 0.008 at lr 1e-4,
      +0.018 ± 0.006 / +0.049 ± 0.006 vs +0.029 ± 0.006 / +0.063 ± 0.007 at lr 5e-5);
      ``weighted_rewards`` sums several with weights and checks what they return; ``pass_at_k``
      scores G samples of a problem. ``make_task`` builds a task by name; ``sft_start`` trains the
      brief SFT start GRPO begins from.

    A tiny GPT instruction-tuned briefly on the train problems solves the held-out ones sometimes
    but not always: the headroom GRPO needs (a policy that never succeeds gets no signal from a 0/1
    reward).

Sources
    DeepSeek-R1 (arXiv 2501.12948) §2.2.2 (accuracy and format rewards); TRL 1.16 reward-function
    signature (``prompts``, ``completions``, extra columns as keyword arguments); Chen et al. 2021
    (Codex, arXiv 2107.03374) Eq. 1 (unbiased pass@k); Liu et al. 2025,
    Dr. GRPO (arXiv 2503.20783) §3.1 (why answer lengths must vary to see the length bias).

Deviations
    ``addition_digit_reward`` (per-digit partial credit) is this project's, not DeepSeek-R1's
    exact-answer reward; the tasks themselves are this project's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minillm.facts import strip_response

TASKS = ("addition", "mixed_addition")
ADDITION_QUESTION = "What is {a} + {b}?"
_ADDITION_RE = re.compile(r"^\s*What is (\d+) \+ (\d+)\?\s*$")
_ADDITION_FORMAT_RE = re.compile(r"^\d+\.$")


class _ArithmeticTask:
    """Shared views of a train/test split of (a, b) problems held in ``self._split``."""

    _split: dict[str, list[tuple[int, int]]]

    def problems(self, split: str = "train") -> list[tuple[int, int]]:
        """The (a, b) operand pairs of ``split`` ("train" or "test"), in a fixed seeded order."""
        if split not in self._split:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return list(self._split[split])

    def prompts(self, split: str = "train") -> list[str]:
        """The questions of ``split``: ``"What is {a} + {b}?"``."""
        return [ADDITION_QUESTION.format(a=a, b=b) for a, b in self.problems(split)]

    def sft_records(self, split: str = "train") -> list[dict]:
        """Alpaca rows for SFT (output ``"{a + b}."``)."""
        return [{"instruction": ADDITION_QUESTION.format(a=a, b=b), "input": "", "output": f"{a + b}.",
                 "task": "addition", "answer": str(a + b), "fact_split": split} for a, b in self.problems(split)]

    def tokenizer_text(self) -> str:
        """Every train question with its answer, one per line (what a tokenizer for the task is trained on)."""
        return "\n".join(f"{q} {r['output']}" for q, r in
                         zip(self.prompts("train"), self.sft_records("train")))


def _seeded_order(items: list, seed: int, stream: int) -> list:
    perm = np.random.default_rng([seed, stream]).permutation(len(items))
    return [items[j] for j in perm]


@dataclass(frozen=True)
class AdditionConfig:
    """The addition task: both operands have exactly ``n_digits`` digits (10..99 for 2).

    test_fraction: share of the *unordered* operand pairs held out (a + b and b + a go to the same
    split, so commutativity cannot leak a test problem into training). seed: the split's seed.
    Raises ValueError for n_digits outside 1..6 or test_fraction outside (0, 1).
    """

    n_digits: int = 2
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= int(self.n_digits) <= 6:
            raise ValueError(f"AdditionConfig.n_digits must be in 1..6, got {self.n_digits}")
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ValueError(f"AdditionConfig.test_fraction must be in (0, 1), got {self.test_fraction}")


class AdditionTask(_ArithmeticTask):
    """Problems ``a + b`` with ``n_digits``-digit operands, split into train and held-out test.

    ``problems(split)`` -> list of (a, b) in a seeded order; ``prompts(split)`` -> the questions
    ("What is 47 + 38?"); ``sft_records(split)`` -> Alpaca rows (``instruction``, ``input`` = "",
    ``output`` = "85.", plus ``task`` = "addition", ``answer``, ``fact_split``), the same record
    shape as ``TaskWorld.sft_records``; ``tokenizer_text()`` -> text to train a tokenizer on.
    Sizes for the default config: 8,100 ordered problems, 4,095 unordered pairs, 410 of them held
    out (815 test problems: a pair a + a counts once; 7,285 train).
    """

    def __init__(self, config: AdditionConfig | None = None):
        self.config = config or AdditionConfig()
        n = self.config.n_digits
        lo, hi = (10 ** (n - 1) if n > 1 else 0), 10 ** n
        pairs = [(a, b) for a in range(lo, hi) for b in range(a, hi)]  # unordered, a ≤ b
        rng = np.random.default_rng([self.config.seed, 41])
        order = rng.permutation(len(pairs))
        n_test = max(1, int(round(self.config.test_fraction * len(pairs))))
        test_pairs = {pairs[i] for i in order[:n_test]}
        self._split = {"train": [], "test": []}
        for a in range(lo, hi):
            for b in range(lo, hi):
                key = (min(a, b), max(a, b))
                self._split["test" if key in test_pairs else "train"].append((a, b))
        for i, name in enumerate(("train", "test")):
            self._split[name] = _seeded_order(self._split[name], self.config.seed, 42 + i)


@dataclass(frozen=True)
class MixedAdditionConfig:
    """The mixed-length addition task: each operand has 1..``max_digits`` digits, the digit count
    drawn uniformly and the operand uniformly among the numbers of that many digits (0..9 for one).

    n_train: train problems; n_test: held-out problems, whose unordered pairs {a, b} never occur in
    train. seed: the draw's seed. Raises ValueError for max_digits outside 1..6 or n_test / n_train < 1.
    """

    max_digits: int = 2
    n_train: int = 20000
    n_test: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= int(self.max_digits) <= 6:
            raise ValueError(f"MixedAdditionConfig.max_digits must be in 1..6, got {self.max_digits}")
        if int(self.n_train) < 1 or int(self.n_test) < 1:
            raise ValueError(f"MixedAdditionConfig: n_train and n_test must be ≥ 1, got {self.n_train}, {self.n_test}")


class MixedAdditionTask(_ArithmeticTask):
    """Problems ``a + b`` with operands of 1..``max_digits`` digits: answers of varying length.

    The same views as ``AdditionTask`` (``problems``, ``prompts``, ``sft_records``,
    ``tokenizer_text``). Problems are drawn with replacement from the seeded stream; the first
    ``n_test`` distinct unordered pairs form the test split, and train takes the next ``n_train``
    draws whose pair is not a test pair (so a train problem may repeat, a test pair never leaks).
    With 5 digits the sum has 1 to 6 digits and a completion " 123456." + ``<|eos|>`` 4 to 9 tokens.
    Raises ValueError when the number space is too small for ``n_test`` distinct pairs.
    """

    def __init__(self, config: MixedAdditionConfig | None = None):
        self.config = cfg = config or MixedAdditionConfig()
        span = 10 ** cfg.max_digits
        if cfg.n_test > (span * (span + 1)) // 4:
            raise ValueError(f"n_test {cfg.n_test} is too many distinct problems for max_digits {cfg.max_digits}")
        rng = np.random.default_rng([cfg.seed, 43])

        def draw(n):
            d = rng.integers(1, cfg.max_digits + 1, size=(n, 2))
            lo = np.where(d == 1, 0, 10 ** (d - 1))
            return (lo + np.floor(rng.random((n, 2)) * (10 ** d - lo)).astype(np.int64)).tolist()

        test: dict[tuple[int, int], tuple[int, int]] = {}
        while len(test) < cfg.n_test:
            for a, b in draw(cfg.n_test):
                if len(test) < cfg.n_test:
                    test.setdefault((min(a, b), max(a, b)), (a, b))
        train: list[tuple[int, int]] = []
        while len(train) < cfg.n_train:
            train += [(a, b) for a, b in draw(cfg.n_train) if (min(a, b), max(a, b)) not in test]
        self._split = {"train": train[:cfg.n_train], "test": list(test.values())}


def make_task(name: str = "addition", n_digits: int = 2, seed: int = 0) -> _ArithmeticTask:
    """The task called ``name``: "addition" (``AdditionTask``, operands of exactly ``n_digits``
    digits) or "mixed_addition" (``MixedAdditionTask``, operands of 1..``n_digits`` digits); the
    split's seed ``seed``. Raises ValueError for another name."""
    if name == "addition":
        return AdditionTask(AdditionConfig(n_digits=n_digits, seed=seed))
    if name == "mixed_addition":
        return MixedAdditionTask(MixedAdditionConfig(max_digits=n_digits, seed=seed))
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def addition_operands(prompt: str) -> tuple[int, int]:
    """(a, b) of an addition question; the chat template's text around it is not accepted.

    Raises ValueError naming the prompt when it is not ``"What is {a} + {b}?"``.
    """
    m = _ADDITION_RE.match(prompt) if isinstance(prompt, str) else None
    if m is None:
        raise ValueError(f"not an addition question ('What is A + B?'): {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def addition_accuracy_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """The verifiable reward: 1.0 when the completion, after ``strip_response`` (whitespace, one
    "Sure!" opener and one final "." removed), is exactly the decimal sum, else 0.0.

    The signature of a TRL reward function (``prompts``, ``completions``, extra columns as keyword
    arguments). Raises ValueError for a prompt that is not an addition question or lists of
    different lengths. Example: "What is 47 + 38?" / " 85." -> 1.0; "85" -> 1.0; "86." -> 0.0.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    out = []
    for p, c in zip(prompts, completions):
        a, b = addition_operands(p)
        out.append(1.0 if strip_response(c) == str(a + b) else 0.0)
    return out


def addition_digit_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """A denser verifiable reward: the share of the sum's digits that are right, aligned from the
    right (ones with ones, tens with tens), over max(len(answer), len(sum)) positions.

    The completion is read as ``addition_accuracy_reward`` reads it (``strip_response``); a
    response that is not all digits gets 0.0; the exact sum gets 1.0, so the reward is a partial-credit
    extension of the accuracy reward and is still computed by a program. Example, "What is 47 + 38?"
    (sum 85): "85." -> 1.0, "86." -> 0.5 (tens right), "75." -> 0.5, "185." -> 2/3 (three positions,
    two right), "5." -> 0.5, "8 5." -> 0.0. Same signature and errors as ``addition_accuracy_reward``.
    Deviation (stated): DeepSeek-R1's rule-based reward is exact-answer only; per-digit partial credit
    is this project's, to give a group whose answers are all wrong a nonzero spread.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    out = []
    for p, c in zip(prompts, completions):
        a, b = addition_operands(p)
        want, got = str(a + b), strip_response(c)
        if not (got.isascii() and got.isdigit()):
            out.append(0.0)
            continue
        n = max(len(want), len(got))
        out.append(sum(1 for i in range(min(len(want), len(got))) if got[-1 - i] == want[-1 - i]) / n)
    return out


def addition_format_reward(prompts: Sequence[str], completions: Sequence[str], ended: Sequence[bool] | None = None,
                           **kwargs) -> list[float]:
    """The format reward: 1.0 when the completion is one number followed by "." (``"85."`` after
    stripping whitespace) and, if ``ended`` is given, the model stopped with ``<|eos|>``; else 0.0.
    Whether the number is right does not matter (DeepSeek-R1's format reward, in this task's format).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    ended = [True] * len(completions) if ended is None else list(ended)
    return [1.0 if _ADDITION_FORMAT_RE.match(c.strip()) and bool(e) else 0.0 for c, e in zip(completions, ended)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k)
    (Chen et al. 2021, Eq. 1). Example: n 8, c 2: pass@1 0.25, pass@8 1.0, pass@4 0.7857143.
    Raises ValueError unless 0 ≤ c ≤ n and 1 ≤ k ≤ n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def func_name(f) -> str:
    """The name a reward function is logged under (``rewards/<name>/mean``): its ``__name__``, else its class's."""
    return getattr(f, "__name__", type(f).__name__)


def weighted_rewards(reward_funcs: Sequence, reward_weights: Sequence[float], prompts: Sequence[str],
                     completions: Sequence[str], ended: Sequence[bool]):
    """r = Σ_k w_k · reward_k(prompts, completions, ended) (TRL ``reward_funcs``, ``reward_weights``).

    Each function is called as ``f(prompts=..., completions=..., ended=...)`` and must return one
    finite number per completion. Returns (total (B,) float64, per-function dict name -> (B,)
    float64). Raises RuntimeError naming a reward function that raises, ValueError for a wrong
    count or a non-numeric result, FloatingPointError for NaN/inf (naming the completion).
    """
    B = len(completions)
    total = np.zeros(B, dtype=np.float64)
    per = {}
    for f, w in zip(reward_funcs, reward_weights):
        name = func_name(f)
        try:
            vals = f(prompts=list(prompts), completions=list(completions), ended=list(ended))
        except Exception as e:  # noqa: BLE001 - re-raised with the function named
            raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        try:
            v = np.asarray(vals, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"reward function {name!r} returned {type(vals).__name__}, "
                             "not a sequence of numbers") from e
        if v.size != B:
            raise ValueError(f"reward function {name!r} returned {v.size} values for {B} completions")
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            i = int(bad[0])
            raise FloatingPointError(f"reward function {name!r} returned {v[i]} for completion {i} "
                                     f"(prompt {prompts[i]!r}, completion {completions[i]!r}); "
                                     f"{bad.size} of {B} values are not finite")
        per[name] = v
        total += w * v
    return total, per


def sft_start(path: str, task: str = "addition", n_digits: int = 2, steps: int = 1200, seed: int = 0,
              n_layer: int = 2, n_embd: int = 48, lr: float = 3e-3, batch_size: int = 32) -> str:
    """Train a fresh tiny GPT on a verifiable task's train problems (SFT) and save it with its
    tokenizer at ``path``; returns the path.

    task, n_digits: as ``make_task`` (the split's seed is 0, the same for every start). The
    tokenizer is byte-level BPE trained on the task's train text with one merge (digits stay single
    tokens); the GPT has ``n_layer`` layers of width ``n_embd``, block_size 40, init seed ``seed``.
    The training is deliberately brief (default 1,200 steps): the start must solve the held-out
    problems sometimes but not always, so that a group of G samples holds both correct and wrong
    answers (the headroom RL needs; its pass@1 and pass@G are measured in notebooks/14_grpo.ipynb).
    The model learns the sum abruptly, the ones digit last, and when depends on the seed (held-out
    pass@1 at T = 1, 815 problems, seeds 0 / 1: 0.10 / 0.17 after 1,000 steps, with the ones digit
    about a guess; 0.66 / 0.33 after 1,200; seed 1 0.96 after 1,400; after 1,200 seed 2 is at 0.90, seed 3 at 0.15).
    Uses ``sft.train_sft`` (the chapter-04 loop). Raises ValueError for steps < 1 or an unknown task.
    """
    from minillm.checkpoint import save_checkpoint
    from minillm.data import tokenize_sft
    from minillm.model import GPT, GPTConfig
    from minillm.tokenizer import Tokenizer
    from minillm.train.sft import SFTConfig, records_to_messages, train_sft

    if steps < 1:
        raise ValueError(f"sft_start: steps must be ≥ 1, got {steps}")
    t = make_task(task, n_digits)
    tok = Tokenizer.train(t.tokenizer_text(), 262)
    examples = tokenize_sft(records_to_messages(t.sft_records("train")), tok, train_on="all")
    model = GPT(GPTConfig(vocab_size=len(tok), block_size=40, n_layer=n_layer, n_head=2, n_embd=n_embd,
                          dropout=0.0), seed=seed)
    train_sft(model, tok, examples, SFTConfig(batch_size=batch_size, max_steps=steps, lr=lr, warmup_steps=10,
                                              seed=seed, progress=False))
    save_checkpoint(path, model, tok, train_state={"sft_start": {"task": task, "n_digits": n_digits, "steps": steps,
                                                                  "seed": seed}})
    return str(path)
