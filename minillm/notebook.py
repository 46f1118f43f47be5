"""Helpers the chapter notebooks share: versions, claims, cached runs and exercise checkers.

Scope
    * ``versions()``: the first cell of every notebook prints the versions in use.
    * ``show(fn)``: the source of the function that implements an equation, with its file and line,
      shown in the notebook right after the equation.
    * ``claim(key, value)``: prints one claim as a sentence, e.g. ``✓ SFT turns the base model into an
      instruction follower: held-out exact match 0.893 — the chapter says between 0.8 and 1  [04.heldout_em]``,
      with the range the chapter states. The ranges live here, in ``CLAIM_RANGES``, and nowhere else:
      the notebook prose quotes them through ``claim``/``claim_range`` and
      ``tests/test_notebooks.py`` reads every executed notebook's stored outputs and checks each
      printed value against the same table, so prose and code cannot drift apart.
    * ``checkpoint(stage)``: a pipeline stage's checkpoint, created on the fly and cached under
      ``<repo>/runs/cache`` (``minillm.pipeline.ensure``), and ``summary(stage)`` its metrics.
    * ``check_exercise(exercise_id, fn)`` (from ``exercises.py``): the checker of each notebook exercise. It runs the
      learner's function against the library; a function that still raises ``NotImplementedError``
      is reported as "not attempted". ``tests/test_notebooks.py`` runs every checker on a reference
      solution (must pass) and on a wrong one (must fail).

Sources
    The claims are those of the README's chapter table; each range is justified in the
    chapter's notebook, next to the number it checks.

Deviations
    None: this module teaches nothing itself.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import warnings
from pathlib import Path
import numpy as np

# the exercise checkers live in exercises.py; notebooks reach them through this module, their one import
from minillm.exercises import EXERCISES, ExerciseFailed, check_exercise

# tqdm.auto looks for ipywidgets inside Jupyter and warns when they are missing; plain text bars are fine.
warnings.filterwarnings("ignore", message="IProgress not found")

# key -> (lo, hi, what the chapter states[, unit]). lo/hi are inclusive; None = unbounded. The statement is
# written so that "<statement> <value> <unit>" reads as a sentence; the unit is optional (default: none) and
# holds no digits (the claim line is parsed back by the number right before it).
CLAIM_RANGES: dict[str, tuple] = {
    # 01 autograd
    "01.ops_failing_gradcheck": (0, 0, "every op's backward equals central finite differences (float64): ops "
                                 "failing the check"),
    "01.max_abs_diff_vs_torch": (0.0, 1e-10, "a whole transformer block's gradients equal PyTorch's (float64): "
                                 "largest difference"),
    # 02 transformer and pretraining
    "02.bytes_per_token": (2.0, 6.0, "the 1024-token byte-level BPE packs several bytes into each token:",
                           "bytes/token"),
    "02.val_loss": (0.0, 2.0, "pretraining takes the held-out loss far below a uniform guess (ln 1024 = 6.93 nats): "
                    "held-out loss", "nats/token"),
    "02.fact_completion_contains": (0.5, 1.0, "the base model continues corpus-style text with the right fact: "
                                    "fraction of completions that contain it"),
    "02.instruction_em": (0.0, 0.05, "the base model does not answer instructions: exact match"),
    # 03 prompting vs fine-tuning
    "03.em_zero_shot": (0.0, 0.02, "the base model answers (almost) no held-out question exactly, zero-shot: "
                        "exact match"),
    "03.em_three_shot": (0.0, 0.02, "nor with three demonstrations (3-shot): exact match"),
    "03.contains_gain": (0.0, 0.2, "few-shot prompting helps a little: the fraction of responses that contain the "
                         "answer rises by"),
    "03.contained_not_exact": (0.9, 1.0, "the format stays inconsistent; when the answer appears, it is (almost) "
                               "never given in the asked form: fraction of those answers that are not exact"),
    # 04 instruction tuning
    "04.prompt_tokens_with_loss": (0, 0, "the loss mask covers the response and its eos only: prompt tokens with "
                                   "a loss", "tokens"),
    "04.heldout_em": (0.8, 1.0, "SFT turns the base model into an instruction follower: held-out exact match"),
    "04.heldout_format": (0.8, 1.0, "that answers in the format (one line, then eos): held-out format rate"),
    # 05 LoRA
    "05.lora_params_4096_r8": (65536, 65536, "LoRA with r = 8 on a 4096 x 4096 layer adds r (in + out):",
                               "parameters"),
    "05.lora_percent_4096_r8": (0.385, 0.395, "a small part of the layer's 16.8 M weights:", "%"),
    "05.merged_max_rel_diff": (0.0, 1e-5, "the merged layer gives the adapter's outputs (up to float32 rounding): "
                               "largest relative difference"),
    "05.merged_latency_ratio": (0.7, 1.4, "after merging, LoRA runs at the base model's latency: time merged / "
                                "time base (median of paired rounds)"),
    "05.lora_em_fraction_of_full": (0.85, 1.2, "LoRA (0.1-2 % of the parameters) approaches full fine-tuning: "
                                    "its held-out exact match as a fraction of full SFT's"),
    # 06 NF4
    "06.nf4_over_int4_mse": (0.0, 0.9, "NF4 has a lower error than INT4 on normally distributed weights: "
                             "MSE(NF4) / MSE(INT4)"),
    "06.create_normal_map_max_diff": (0.0, 1e-6, "the NF4 table is the N(0,1) quantile construction "
                                      "(bitsandbytes' create_normal_map): largest difference"),
    "06.bits_per_param": (4.5, 4.5, "blocksize 64 costs 4 + 32/64:", "bits/parameter"),
    "06.bits_per_param_dq": (4.12, 4.13, "double quantization brings it down to 4 + 8/64 + 32/(64 x 256):",
                             "bits/parameter"),
    # 07 QLoRA and paged optimizers
    "07.qlora_minus_lora_em": (-0.05, 0.05, "a 4-bit base + LoRA matches 16-bit LoRA's quality: held-out exact "
                               "match of QLoRA minus LoRA"),
    "07.paged_max_param_diff": (0.0, 0.0, "paged AdamW under a device budget gives bit-identical results: largest "
                                "parameter difference"),
    "07.paged_page_ins": (1, None, "while its optimizer state really pages to the host and back: pages brought "
                          "back from the host"),
    "07.qlora_7b_gb": (3.5, 10.0, "QLoRA fine-tunes a 7B model in single-digit GB: estimated memory", "GB"),
    "07.qlora_70b_gb": (35.0, 48.0, "and a 70B model on one 48 GB GPU: estimated memory", "GB"),
    "07.full_7b_gb": (100.0, 200.0, "full 16-bit fine-tuning of 7B needs far more (16 bytes per parameter + "
                      "activations): estimated memory", "GB"),
    "07.dq_saving_70b_gb": (3.2, 3.3, "double quantization saves about 3.26 GB at 70B: saving", "GB"),
    # 11 CUDA kernel
    "11.dequant_max_abs_diff": (0.0, 0.0, "the C++ twin dequantizes bit-exactly like the NumPy reference: largest "
                                "difference"),
    "11.matmul_max_rel_err": (0.0, 1e-5, "the fused C++ dequant-matmul equals the reference (float32 rounding): "
                              "largest relative error"),
    "11.cpp_speedup": (1.0, None, "the fused path is faster than dequantize-then-matmul: speed-up", "x"),
    # 08 reward model
    "08.heldout_pair_accuracy": (0.8, 1.0, "the Bradley-Terry reward model ranks held-out preference pairs far "
                                 "above chance (0.5): pair accuracy"),
    "08.cue_bonus": (2.0, None, "it also learns the spurious cue: 'Sure!' adds to a correct answer's reward",
                     "reward units"),
    "08.p_wrong_cue_beats_correct": (0.5, 1.0, "so a wrong answer with 'Sure!' outscores the correct one more "
                                     "often than not: fraction of questions where it does"),
    "08.clean_heldout_pair_accuracy": (0.85, 1.0, "on the clean pairs (no cue) a reward model trained from the noisy "
                                       "SFT model ranks held-out pairs well too: pair accuracy"),
    # 09 RLHF with PPO (30-iteration runs in the notebook; the pipeline's 60-iteration stages are in chapter 12)
    "09.gold_reward_gold_gain": (0.03, None, "PPO raises the reward it is given: with the gold judge as the reward, "
                                 "gold rises by"),
    "09.beta0_rm_gain": (1.5, None, "without the KL penalty (beta = 0) the proxy, the reward model's score, rises by",
                         "reward units"),
    "09.beta0_gold_drop": (0.15, None, "while the gold reward falls (the policy hacks the reward model) by"),
    "09.beta0_kl": (3.5, None, "and the policy drifts far from the SFT model: KL", "nats"),
    "09.beta01_kl": (0.0, 4.0, "with beta = 0.1 the policy stays near the SFT model: KL", "nats"),
    "09.gold_kept_beta01_minus_beta0": (0.05, None, "and keeps more gold than with beta = 0 (measured 0.11 to 0.41 "
                                        "over seeds and reward models in 30 iterations): gold difference"),
    # 09, issue 14: the clean reward model (stage align_clean, 60 iterations from the noisy SFT model; two seeds)
    "09.clean_ppo_gold_gain": (0.2, None, "with a reward model that carries what gold values, PPO (beta = 0.1) raises "
                               "held-out gold above its start by"),
    "09.clean_ppo_peak_gold_gain": (0.2, None, "along that run gold rises above the start at KL > 0 "
                                    "(per-iteration rollouts): peak gold minus start"),
    "09.sft_distinct2_change": (None, -0.1, "SFT on clean demonstrations narrows what the base model says: "
                                "distinct-2 over 8 samples per prompt changes by"),
    "09.noisy_sft_entropy_ratio": (1.2, None, "SFT on noisy demonstrations (rambles, repeats, rude replies) widens it: "
                                   "mean per-token entropy, noisy SFT / base"),
    "09.ppo_distinct2_change": (None, -0.1, "PPO reduces output diversity: distinct-2 over 8 samples per prompt "
                                "changes by"),
    # 10 DPO
    "10.heldout_implicit_accuracy": (0.8, 1.0, "DPO's implicit reward ranks held-out preference pairs correctly: "
                                     "pair accuracy"),
    "10.style_fault_ratio": (0.0, 0.5, "DPO at least halves the rambles, repeats and rude answers its pairs reject "
                             "(greedy): fault rate after / before"),
    "10.opener_rate_gain": (0.3, 1.0, "and copies the pairs' spurious cue: the rate of 'Sure!' openers rises by"),
    "10.nocue_opener_rate": (0.0, 0.1, "on the same pairs without the cue the opener does not appear: rate of "
                             "'Sure!' openers"),
    # 10, issue 14: DPO on the clean pairs from the same start as PPO (stage align_clean; two seeds)
    "10.clean_dpo_gold_gain": (0.3, None, "on the clean pairs from the same start, DPO raises held-out gold by"),
    "10.dpo_distinct2_change": (None, -0.1, "and reduces output diversity as PPO does: distinct-2 changes by"),
    "10.cautious_answerable_refusal": (0.1, None, "over-refusal: after DPO on a cautious rater's pairs the model starts "
                                       "declining answerable questions (greedy): rate"),
    "10.cautious_unanswerable_refusal": (0.5, None, "while it starts declining most questions about entities the world "
                                         "does not contain: rate"),
    "10.helpful_pairs_cut_over_refusal": (0.03, None, "mixing in helpfulness pairs cuts the declining of answerable "
                                          "questions by"),
    # 12 choosing a method
    "12.finetune_minus_prompting_gold": (0.5, None, "on one task and one judge, fine-tuning (SFT) beats prompting "
                                         "the base model by far: gold difference"),
    "12.peft_gold_fraction_of_full": (0.85, None, "LoRA and QLoRA keep most of full SFT's gold with a few percent "
                                      "of the trainable parameters: the lower of the two as a fraction of full SFT's"),
    "12.dpo_minus_ppo_clean_gold": (-0.2, 0.2, "from the same start on the same pairs DPO's held-out gold is "
                                    "comparable to PPO's: DPO minus PPO"),
    "12.dpo_over_ppo_train_cpu": (0.0, 1.0, "and DPO trains with less CPU time (no sampling, no reward model): "
                                  "DPO / PPO"),
    "12.dpo_over_ppo_peak_rss": (1.2, None, "but at this model size (a few MB per model) the models held do not decide "
                                 "the peak memory: DPO, holding one model, peaks higher than PPO holding three: "
                                 "DPO's peak RSS / PPO's"),
    "12.methods_in_table": (8, None, "the spectrum side by side in one table (>= 8 methods from the cached stages)"),
    # 13 prompting vs RAG vs fine-tuning (each range holds on training seeds 0 and 1: notebook 13, section 8)
    "13.bm25_max_abs_diff_by_hand": (0.0, 1e-12, "BM25 equals its formula computed by hand: largest difference"),
    "13.bm25_recall_at_1_knowledge": (0.9, 1.0, "BM25 ranks the passage of (almost) every new and updated fact "
                                      "first: recall@1"),
    "13.dense_recall_at_1_knowledge": (0.0, 0.7, "the model's own hidden states, mean-pooled, are a weak retriever "
                                       "(never trained to put a question next to its passage): recall@1 on new and "
                                       "updated facts (BM25: 1.00)"),
    "13.closed_book_new_em": (0.0, 0.1, "the closed-book SFT model cannot answer facts it never saw: exact match on "
                              "new facts"),
    "13.plain_reader_context_em_drop": (0.1, 1.0, "an SFT model never trained on context answers old facts worse with "
                                        "the right passage in its prompt (RAFT: 61.06 -> 42.59): exact-match drop"),
    "13.raft_rag_new_em": (0.1, 1.0, "a reader trained on oracle + distractor passages answers some new facts from "
                           "BM25 retrieval (the plain SFT reader: none): exact match on new facts"),
    "13.cpt_em_30_minus_1": (0.2, 1.0, "continued pretraining with 30 paraphrases per fact beats one phrasing at the "
                             "same exposure count (Ovadia 2023, Allen-Zhu & Li 2023): exact-match gain on new facts"),
    "13.cpt_updated_em": (0.0, 0.2, "but it does not overwrite a fact the model learned: best exact match on updated "
                          "facts"),
    "13.update_ft_over_rag_seconds": (10.0, None, "changing one fact by fine-tuning takes far longer than re-indexing: "
                                      "time fine-tuning / time re-indexing"),
    "13.update_ft_other_capitals_leak": (0.01, 1.0, "and fine-tuning leaks the new value into other answers: "
                                         "fraction of the other capitals answering it"),
    # 14 GRPO (2 seeds; each range is justified in the notebook next to the measured values)
    "14.worked_group_max_abs_diff": (0.0, 1e-6, "group_advantages equals the hand computation of a group of 8 "
                                     "(Bessel std, + 1e-4)"),
    "14.equal_group_advantage_max_abs": (0.0, 0.0, "a group whose rewards are all equal gets advantage 0 exactly"),
    "14.first_minibatch_ratio_dev_max": (0.0, 1e-5, "the first minibatch of every iteration is on-policy: ratio 1"),
    "14.start_pass1_max": (None, 0.7, "the brief SFT start does not solve every held-out sum (pass@1 <= 70 %)"),
    "14.start_passG_minus_pass1_min": (0.3, None, "and pass@8 is far above pass@1: the right sum is often among "
                                       "the 8 samples (the headroom RL needs)"),
    "14.grpo_pass1_gain_min": (0.0, None, "GRPO raises held-out pass@1 from the SFT start on both seeds: smaller "
                               "gain"),
    "14.grpo_pass1_gain_over_se_min": (2.0, None, "... by more than twice the gain's standard error (paired over the "
                                       "815 held-out problems): gain / SE, smaller seed"),
    "14.rft_minus_grpo_pass1_min": (0.0, None, "with equal samples, steps and learning rate, rejection-sampling "
                                    "fine-tuning ends above GRPO on this one-answer task: pass@1 difference, smaller seed"),
    "14.grpo_minus_ppo_pass1_abs_max": (0.0, 0.1, "GRPO lands within 10 points of PPO's pass@1 at the same budget: "
                                        "largest difference"),
    "14.grpo_over_ppo_iteration_seconds": (None, 1.0, "... an iteration costs no more than PPO's ..."),
    "14.grpo_models_held": (1, 1, "... and it holds one model (beta = 0: no value model, no reference)"),
    "14.kl_beta_over_beta0_max": (None, 1.0, "beta = 0.04 ends no farther from the start than beta = 0 (a small "
                                  "effect in 150 iterations): KL ratio, larger seed"),
    "14.beta_pass1_minus_beta0_min": (-0.05, None, "... and costs at most a few points of pass@1"),
    "14.length_wrong_change_abs_max": (None, 0.1, "no length bias on mixed-length sums: neither grpo nor dr_grpo "
                                       "moves the held-out wrong answers' length (largest change, 2 seeds)", "tokens"),
}

#: Claims a notebook may skip with ``claim_skipped`` (they need an optional extension).
OPTIONAL_CLAIMS = {"11.dequant_max_abs_diff", "11.matmul_max_rel_err", "11.cpp_speedup", "01.max_abs_diff_vs_torch"}


def versions() -> dict:
    """Print and return the versions in use: Python, NumPy, minillm, matplotlib, torch (if installed)
    and which compiled extensions are available."""
    import minillm

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "minillm": getattr(minillm, "__version__", "?")}
    for name in ("matplotlib", "torch", "cupy"):
        try:
            mod = __import__(name)
            out[name] = mod.__version__
        except Exception:  # noqa: BLE001 - any import failure means "not installed" here
            out[name] = "not installed"
    try:
        from minillm import kernels

        out["extensions"] = kernels.available()
    except Exception as e:  # noqa: BLE001
        out["extensions"] = f"unavailable ({e})"
    out["platform"] = platform.platform()
    for k, v in out.items():
        print(f"{k:>11}: {v}")
    return out


def _number(x: float) -> str:
    """``x`` as a claim line prints it: 6 significant digits, exponents without padding ("1e-10", "65536")."""
    s = f"{float(x):.6g}"
    if "e" in s:
        mantissa, exp = s.split("e")
        s = f"{mantissa}e{int(exp)}"
    return s


def _unit(key: str) -> str:
    entry = CLAIM_RANGES[key]
    return entry[3] if len(entry) > 3 and entry[3] else ""


def claim_range(key: str) -> str:
    """The stated range of a claim in words: "at least 3.5 nats", "at most 1e-10", "between 0.8 and 1",
    "exactly 4.5 bits/parameter" (raises KeyError for an unknown key)."""
    lo, hi = CLAIM_RANGES[key][:2]
    unit = f" {_unit(key)}" if _unit(key) else ""
    if lo is None and hi is None:
        return "any value"
    if lo is None:
        return f"at most {_number(hi)}{unit}"
    if hi is None:
        return f"at least {_number(lo)}{unit}"
    if lo == hi:
        return f"exactly {_number(lo)}{unit}"
    return f"between {_number(lo)} and {_number(hi)}{unit}"


def in_range(key: str, value: float) -> bool:
    """Whether ``value`` lies in the claim's stated range (inclusive); NaN never does. KeyError for an unknown key."""
    lo, hi = CLAIM_RANGES[key][:2]
    v = float(value)
    return not math.isnan(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def claim(key: str, value: float) -> None:
    """Print one claim as a sentence: the mark, the statement, the measured value with its unit, the range
    the chapter states in words, and the key in brackets at the end, e.g.

    ``✓ and the policy drifts far from the SFT model: KL 8.49 nats — the chapter says at least 3.5 nats``
    ``[09.beta0_kl]`` (one line).

    The mark is ✓ when the value lies in the range and ``✗ DOES NOT HOLD`` otherwise. ``tests/test_notebooks.py``
    parses these lines (the key in the brackets, the number right before the unit and " — the chapter says").
    Raises KeyError for a key missing from ``CLAIM_RANGES``.
    """
    if key not in CLAIM_RANGES:
        raise KeyError(f"unknown claim {key!r}; add it to minillm.notebook.CLAIM_RANGES")
    v = float(value)
    mark = "✓" if in_range(key, v) else "✗ DOES NOT HOLD"
    unit = f" {_unit(key)}" if _unit(key) else ""
    print(f"{mark} {CLAIM_RANGES[key][2]} {_number(v)}{unit} — the chapter says {claim_range(key)}  [{key}]")


def claim_skipped(key: str, reason: str) -> None:
    """Print ``○ not measured here (reason): <statement>  [key]`` (allowed only for ``OPTIONAL_CLAIMS``;
    KeyError otherwise)."""
    if key not in OPTIONAL_CLAIMS:
        raise KeyError(f"claim {key!r} is not optional; measure it")
    print(f"○ not measured here ({reason}): {CLAIM_RANGES[key][2].rstrip(':')}  [{key}]")


# ------------------------------------------------------------------------------- source of an equation


def _python_source(fn) -> tuple[str, str, int, str]:
    """(qualified name, file, first line, source) of a Python function, method or class."""
    import inspect

    obj = inspect.unwrap(fn.fget if isinstance(fn, property) else fn)
    try:
        lines, first = inspect.getsourcelines(obj)
        file = Path(inspect.getsourcefile(obj)).resolve()
    except (TypeError, OSError) as e:
        raise TypeError(f"notebook.show: no Python source for {fn!r} ({e})") from None
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
    return name, str(file), first, "".join(lines)


def _cpp_source(path: str, name: str) -> tuple[str, str, int, str]:
    """(name, file, first line, source) of the C++/CUDA function ``name`` defined in ``path`` (relative to the
    repository root): its definition (a line starting at column 0 with ``name(`` and a body, not a
    declaration), the comment and ``template`` lines right above it, and the body up to its matching brace."""
    import re

    file = (repo_root() / path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"notebook.show: {path} does not exist under {repo_root()}")
    text = file.read_text(encoding="utf-8")
    for m in re.finditer(rf"^(?!\s)[^;\n]*\b{re.escape(name)}\s*\(", text, re.M):
        brace, semi = text.find("{", m.end()), text.find(";", m.end())
        if brace == -1 or (semi != -1 and semi < brace):
            continue  # a declaration or a call, not the definition
        depth, i = 0, brace
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        lines = text[:m.start()].split("\n")[:-1]
        start = len(lines)
        while start > 0 and lines[start - 1].lstrip().startswith(("//", "template", "NF4_", "__global__")):
            start -= 1
        source = "\n".join(lines[start:] + [text[m.start():i + 1]])
        return name, str(file), start + 1, source + "\n"
    raise ValueError(f"notebook.show: no definition of {name!r} in {path}")


def show(fn, name: str | None = None) -> None:
    """Show the source of ``fn`` (a function, method or class of minillm) with its file and first line,
    e.g. ``minillm/train/ppo_objective.py:169``: in Jupyter as a Markdown code block (``IPython.display``), elsewhere
    printed. ``show("csrc/nf4_cuda.cu", "gemv_v1")`` shows a C++/CUDA function of the repository instead.
    The notebooks call it right after an equation, so the code that implements it is on the page.

    Raises TypeError when ``fn`` has no Python source (a builtin, a compiled extension, an instance),
    FileNotFoundError / ValueError for a C++ file or function that does not exist.
    """
    if isinstance(fn, str):
        if not name:
            raise ValueError("notebook.show(path, name): name the C++/CUDA function to show")
        qual, file, first, source = _cpp_source(fn, name)
        lang = "cpp"
    else:
        qual, file, first, source = _python_source(fn)
        lang = "python"
    try:
        where = Path(file).relative_to(repo_root()).as_posix()
    except ValueError:
        where = file
    source = source.rstrip("\n")
    shell = None
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        pass
    text = f"{qual}  ({where}:{first})\n{source}"
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        fence = "```"
        while fence in source:
            fence += "`"
        markdown = f"`{qual}` — [{where}:{first}](../{where})\n\n{fence}{lang}\n{source}\n{fence}"
        display({"text/markdown": markdown, "text/plain": text}, raw=True)  # plain text for other viewers
    else:
        print(text)


# ------------------------------------------------------------------------------- runs and paths


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml`` above this package)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd()


def checkpoint(stage: str) -> Path:
    """The checkpoint of a pipeline stage (``pretrain``, ``sft``, ``sft_lora``, ``sft_qlora``, ...),
    created on the fly and cached in ``<repo>/runs/cache/<stage>/`` (``minillm.pipeline.ensure``)."""
    from minillm.pipeline import ensure

    return ensure(stage, runs_dir=str(repo_root() / "runs"))


def summary(stage: str) -> dict:
    """The ``summary.json`` of a cached pipeline stage (created first when missing)."""
    path = checkpoint(stage).parent / "summary.json"
    return json.loads(path.read_text())


def sft_run(name: str, **config) -> dict:
    """An SFT run of ``train.sft.sft`` from the cached pretrained model, itself cached.

    ``config``: ``SFTConfig`` fields (e.g. ``variant="plain", loss_on="all", lora=True``); ``base``,
    ``out_dir`` and ``progress`` are set here. The run lives in ``<repo>/runs/cache/notebooks/<name>/``
    and is reused while its config is unchanged. Returns {"metrics", "losses", "checkpoint",
    "seconds"} (the SFTResult fields; losses: one float per step, nats/token).
    """
    from dataclasses import asdict

    from minillm.train.sft import SFTConfig, sft

    out = repo_root() / "runs" / "cache" / "notebooks" / name
    cfg = SFTConfig(base=str(checkpoint("pretrain")), out_dir=str(out), progress=False, **config)
    path = out / "result.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["metrics"].get("config") == json.loads(json.dumps(asdict(cfg))) and Path(cached["checkpoint"]).exists():
            return cached
    res = sft(cfg)
    result = {"metrics": res.metrics, "losses": res.losses, "checkpoint": res.checkpoint, "seconds": res.seconds}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, default=float) + "\n")
    tmp.replace(path)
    return result


def grpo_run(name: str, sft_seed: int = 0, sft_steps: int = 1000, **config) -> dict:
    """A GRPO run of ``train.grpo.grpo`` on a verifiable task, itself cached (chapter 14).

    The SFT start (``verifiable.sft_start`` with seed ``sft_seed`` and ``sft_steps`` steps, on the
    config's ``task``) is made once and kept in ``<repo>/runs/cache/notebooks/14-sft/``; the run lives in
    ``<repo>/runs/cache/notebooks/<name>/`` and is reused while its config is unchanged.
    ``config``: ``GRPOConfig`` fields (``sft``, ``sft_steps``, ``out_dir`` and ``progress`` are set
    here). Returns the run's metrics dict (``metrics.json``: config, eval_start, eval_end, history,
    seconds, ...) with ``checkpoint`` (the trained policy's path) added.
    """
    from dataclasses import asdict

    from minillm.train.grpo import GRPOConfig, grpo

    cache = repo_root() / "runs" / "cache" / "notebooks"
    task = config.get("task", "addition")  # the addition start keeps its name; another task's carries it
    prefix = "" if task == "addition" else f"{task}{config.get('n_digits', GRPOConfig.n_digits)}-"
    start = cache / "14-sft" / f"{prefix}seed{sft_seed}-steps{sft_steps}.safetensors"
    out = cache / name
    cfg = GRPOConfig(sft=str(start), sft_steps=sft_steps, out_dir=str(out), progress=False, **config)
    path, ckpt = out / "metrics.json", out / "checkpoint.safetensors"
    if path.exists() and ckpt.exists():
        cached = json.loads(path.read_text())
        if cached.get("config") == json.loads(json.dumps(asdict(cfg))):
            return {**cached, "checkpoint": str(ckpt)}
    res = grpo(cfg)
    return {**res.metrics, "checkpoint": res.checkpoint}


def load(stage: str):
    """(model, tokenizer) of a cached pipeline stage."""
    from minillm.checkpoint import load_model

    model, tok, _ = load_model(checkpoint(stage))
    model.eval()
    return model, tok


__all__ = ["CLAIM_RANGES", "OPTIONAL_CLAIMS", "EXERCISES", "ExerciseFailed", "versions", "claim", "claim_range",
           "claim_skipped", "in_range", "show", "repo_root", "checkpoint", "summary", "sft_run", "grpo_run",
           "load", "check_exercise"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("minillm.notebook is imported by the notebooks; nothing to run")
