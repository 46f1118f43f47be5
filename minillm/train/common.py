"""What every training loop shares: config dataclasses on the command line, text reading with
clear errors, batches of token windows, evaluation of the mean loss, and generator state I/O.

Scope
    ``add_dataclass_arguments`` / ``dataclass_from_args`` turn a config dataclass into argparse
    options (``--max-steps``) and back, so the CLI and the notebooks share one config object and a
    typo is an error (no exec-style configuration). ``read_text`` raises errors that name the file
    and the byte offset of bad UTF-8. ``rng_state``/``set_rng_state`` make numpy Generators
    checkpointable as JSON, so a resumed run draws the same batches as an uninterrupted one.

Sources
    nanoGPT ``train.py`` (random windows of the token stream, periodic validation); argparse.

Deviations
    None.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from minillm.checkpoint import write_json_atomic
from minillm.lora import DEFAULT_LORA_ALPHA
from minillm.tensor import no_grad


INF = math.inf

#: The allowed range of every numeric option, by field name ("Class.field" overrides "field"):
#: (low, high, low_inclusive, high_inclusive). A field missing here must be finite (floats) or
#: ≥ 0 (ints). Checked at parse time (``number_in_range``) and shown in ``--help``.
OPTION_RANGES: dict[str, tuple] = {
    "lr": (0.0, 1.0, False, True), "weight_decay": (0.0, 10.0, True, True), "grad_clip": (0.0, INF, True, False),
    "warmup_steps": (0, INF, True, False), "min_lr_ratio": (0.0, 1.0, True, True),
    "beta1": (0.0, 1.0, True, False), "beta2": (0.0, 1.0, True, False), "dropout": (0.0, 1.0, True, False),
    "lora_dropout": (0.0, 1.0, True, False), "val_fraction": (0.0, 0.5, False, False),
    "test_fraction": (0.0, 1.0, True, False), "vocab_size": (261, INF, True, False),
    "block_size": (2, INF, True, False), "n_layer": (1, INF, True, False), "n_head": (1, INF, True, False),
    "n_embd": (1, INF, True, False), "batch_size": (1, INF, True, False), "max_steps": (1, INF, True, False),
    "iterations": (1, INF, True, False), "eval_interval": (1, INF, True, False),
    "checkpoint_interval": (1, INF, True, False), "eval_windows": (1, INF, True, False),
    "lora_r": (1, INF, True, False), "lora_alpha": (0.0, INF, False, False),
    "quant_blocksize": (1, INF, True, False), "max_new_tokens": (1, INF, True, False),
    "eval_batch_size": (1, INF, True, False), "ref_batch_size": (1, INF, True, False),
    "margin": (0.0, INF, True, False), "center_rewards_coefficient": (0.0, INF, True, False),
    "label_smoothing": (0.0, 0.5, True, False), "sft_weight": (0.0, INF, True, False),
    "eval_temperature": (0.0, INF, True, False), "temperature": (0.0, INF, False, False),
    "DPOConfig.beta": (0.0, INF, False, False), "PPOConfig.beta": (0.0, INF, True, False),
    "kl_target": (0.0, INF, False, False), "kl_horizon": (1, INF, True, False),
    "gamma": (0.0, 1.0, True, True), "lam": (0.0, 1.0, True, True), "cliprange": (0.0, INF, False, False),
    "cliprange_value": (0.0, INF, False, False), "vf_coef": (0.0, INF, True, False),
    "ppo_epochs": (1, INF, True, False), "num_mini_batches": (1, INF, True, False),
    "missing_eos_penalty": (0.0, INF, True, False), "repeats": (1, INF, True, False),
}

#: One-line descriptions of options whose config field has no inline comment (``--help``).
OPTION_HELP: dict[str, str] = {
    "corpus": "UTF-8 text file to pretrain on, or 'builtin' for the task world's corpus",
    "out_dir": "folder for the checkpoint and metrics (checked writable before training)",
    "vocab_size": "tokenizer size: 256 bytes + merges + the 5 special tokens",
    "block_size": "context length in tokens", "n_layer": "transformer blocks", "n_head": "attention heads",
    "n_embd": "embedding width", "dropout": "dropout probability", "batch_size": "sequences (or pairs) per step",
    "max_steps": "optimizer steps", "iterations": "PPO iterations (rollout + updates)",
    "lr": "peak learning rate (AdamW)", "warmup_steps": "linear warmup steps",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine decay)",
    "weight_decay": "AdamW decoupled weight decay on ≥2-D weights (never on biases/LayerNorm)",
    "beta1": "AdamW β₁", "beta2": "AdamW β₂", "grad_clip": "clip the gradient norm to this (0 = off)",
    "val_fraction": "fraction of the corpus tokens held out for validation",
    "eval_interval": "steps between validation losses", "eval_windows": "validation windows",
    "sample_tokens": "tokens of the greedy sample printed at each evaluation",
    "checkpoint_interval": "steps between checkpoint saves", "seed": "random seed (data order, init, sampling)",
    "resume": "continue the run in --out-dir from its checkpoint",
    "overwrite": "replace an existing run's checkpoint in --out-dir (without it, pretrain refuses)",
    "continue_training": "with --resume: continue the run in --out-dir on a new corpus and schedule (continued "
                         "pretraining), keeping its weights, optimizer state and step count",
    "progress": "show progress bars", "base": "base model: checkpoint file, run folder or Hugging Face folder",
    "sft": "SFT checkpoint to start from (file, run folder or Hugging Face folder)",
    "data": "'builtin' or a data file (text, Alpaca, chat, prompt-completion, preference, OASST; JSON/JSONL)",
    "test_data": "held-out preference file ('' = split --test-fraction off --data)",
    "test_fraction": "fraction of the pairs held out when --test-data is not given",
    "lora": "train LoRA adapters on a frozen base", "qlora": "LoRA on a 4-bit NF4 base",
    "lora_r": "LoRA rank r (≤ the smaller side of every adapted layer)", "lora_alpha": "LoRA α (scaling α/r)",
    "lora_dropout": "dropout on the LoRA input", "quant_blocksize": "NF4 block size",
    "eval": "evaluate after training", "eval_base": "also evaluate the base model first",
    "k_shot": "shots of the base model's k-shot evaluation (0 = skip)",
    "max_new_tokens": "tokens generated per evaluation / rollout response",
    "margin": "Bradley-Terry margin used when a pair has none",
    "center_rewards_coefficient": "weight of the penalty on the mean reward squared",
    "max_length": "longest sequence in tokens (0 = the model's block_size)",
    "eval_batch_size": "pairs per evaluation batch", "beta": "DPO: inverse temperature β; PPO: KL coefficient",
    "loss_type": "sigmoid (DPO) | ipo | robust | hinge", "label_smoothing": "ε of cDPO/robust DPO",
    "ipo_length_normalize": "IPO: divide log-ratios by the response length",
    "eval_temperature": "sampling temperature of the evaluation (0 = greedy)",
    "ref_batch_size": "pairs per batch when precomputing reference log-probs",
    "reward": "reward-model checkpoint", "value_model": "shared_head or a value-model checkpoint",
    "prompts": "'world' or a file of prompts", "temperature": "rollout sampling temperature (> 0)",
    "adaptive_kl": "adapt β toward --kl-target", "kl_target": "target KL (nats) of the adaptive controller",
    "kl_horizon": "horizon of the adaptive KL controller", "kl_estimator": "k1 or k3",
    "gamma": "discount γ", "lam": "GAE λ", "whiten_advantages": "normalise advantages per batch",
    "cliprange": "PPO ratio clip ε", "cliprange_value": "value clip", "vf_coef": "value-loss weight",
    "ppo_epochs": "passes over each rollout batch", "num_mini_batches": "mini-batches per epoch",
    "missing_eos_penalty": "subtracted from the score of a response without <|eos|>",
    "score_norm_samples": "SFT samples for the score's mean/sd (0 = no normalisation)",
    "eval_prompts": "prompts per evaluation split (0 = all / skip, as documented per command)",
    "runs_dir": "folder of pipeline runs", "quick": "tiny smoke-test settings",
    "sft_data": "SFT data of the pipeline ('builtin' or a file)",
    "pref_data": "preference data of the pipeline ('builtin' or a file)",
}


def option_range(cls, name: str):
    """The (low, high, low_inclusive, high_inclusive) range of ``cls``'s field ``name``, or None."""
    return OPTION_RANGES.get(f"{getattr(cls, '__name__', cls)}.{name}", OPTION_RANGES.get(name))


def _range_text(r) -> str:
    lo, hi, lo_in, hi_in = r
    if hi == INF:
        return f"{'≥' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def number_in_range(typ, name: str, r=None):
    """An argparse ``type=`` function: parse ``typ`` (int or float), refuse NaN/inf and values
    outside ``r`` (see OPTION_RANGES; default: ints ≥ 0, any finite float) with an error naming
    the option, the value and the allowed range."""
    if r is None and typ is int:
        r = (0, INF, True, False)

    def parse(text: str):
        try:
            v = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if typ is int else 'a number'}, "
                                             f"got {text!r}") from None
        if typ is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if r is not None:
            lo, hi, lo_in, hi_in = r
            if not ((v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)):
                raise argparse.ArgumentTypeError(f"{v!r} is out of range: must be {_range_text(r)}")
        return v

    parse.__name__ = f"{typ.__name__}"  # argparse names the type in "invalid <type> value" messages
    return parse


def _inline_comments(cls) -> dict[str, str]:
    """``field: type = default  # comment`` comments of a dataclass's source (its one description)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", src, re.M)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple = (), only: tuple | None = None
                            ) -> None:
    """One ``--field-name`` option per dataclass field (bools take true/false), each with a
    description (the field's inline comment, else ``OPTION_HELP``), its default and, for numbers,
    the allowed range, checked at parse time (``number_in_range``: NaN, inf and out-of-range values
    are usage errors naming the option). ``skip``: fields left out; ``only``: just these fields."""
    comments = _inline_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        typ = f.type if isinstance(f.type, type) else eval(f.type, {}, {})  # noqa: S307 - type names only
        desc = comments.get(f.name) or OPTION_HELP.get(f.name, "")
        desc = (desc + " " if desc else "").replace("%", "%%")
        if typ is bool or default is True or default is False:
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL",
                                help=f"{desc}(true/false; default: {default})")
        elif typ in (int, float):
            r = option_range(cls, f.name)
            allowed = _range_text(r) if r else ("≥ 0" if typ is int else "finite")
            parser.add_argument(flag, type=number_in_range(typ, f.name, r), default=default,
                                metavar="INT" if typ is int else "X",
                                help=f"{desc}({typ.__name__} {allowed}; default: {default})")
        elif typ is str:
            parser.add_argument(flag, type=str, default=default, help=f"{desc}(default: {default!r})")
        else:  # Optional[...] and friends: take a string, let the config validate it
            parser.add_argument(flag, type=_auto, default=default, help=f"{desc}(default: {default})")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _auto(s: str):
    for conv in (int, float):
        try:
            v = conv(s)
        except ValueError:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        return v
    return None if s.lower() == "none" else s


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the parsed options of ``add_dataclass_arguments``."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


def read_text(path) -> str:
    """The UTF-8 text of ``path``.

    Raises FileNotFoundError naming the file, ValueError naming the file, line and byte offset of
    the first invalid UTF-8 byte, and ValueError for an empty (or whitespace-only) file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start} (line {line}): {e.reason}") from None
    if not text.strip():
        raise ValueError(f"{path}: the corpus is empty")
    return text


@dataclass
class OptimConfig:
    """The optimizer and schedule fields every loop-based trainer shares (``train.loop.train_loop``):
    AdamW (decoupled weight decay on ≥ 2-D weights only, ``optim.weight_decay_groups``), linear warmup
    then cosine decay to ``min_lr_ratio``·``lr`` (``optim.cosine_lr``), gradient-norm clipping.
    Each trainer's config inherits these fields and overrides the defaults it was measured with.

    batch_size: examples (or pairs) per step; max_steps: optimizer steps (≥ 0); lr: peak learning rate;
    warmup_steps; min_lr_ratio; weight_decay; grad_clip (0 = off); seed; progress (bars).
    Raises ValueError for batch_size < 1 or max_steps < 0.
    """

    batch_size: int = 32
    max_steps: int = 100
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_steps < 0:
            raise ValueError(f"batch_size must be ≥ 1 and max_steps ≥ 0, got {self.batch_size}, {self.max_steps}")


@dataclass
class LoRAConfig:
    """The LoRA fields of the trainers that can train adapters (SFT, DPO, PPO): ``lora`` switches it on;
    ``lora_r``, ``lora_alpha`` (one default, ``lora.DEFAULT_LORA_ALPHA``), ``lora_dropout``;
    ``lora_targets`` as ``lora.parse_target_modules`` reads it ("" = q_proj,v_proj, or all-linear for QLoRA)."""

    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = DEFAULT_LORA_ALPHA
    lora_dropout: float = 0.0
    lora_targets: str = ""


def round_floats(d, digits: int, into_lists: bool = True):
    """``d`` (nested dicts, and lists when ``into_lists``) with every float rounded to ``digits``, for a
    readable ``metrics.json``; other values unchanged."""
    if isinstance(d, dict):
        return {k: round_floats(v, digits, into_lists) for k, v in d.items()}
    if into_lists and isinstance(d, (list, tuple)):
        return [round_floats(v, digits, into_lists) for v in d]
    if isinstance(d, float):
        return round(d, digits)
    return d


def write_metrics(out_dir, metrics: dict, t0: float, digits: int | None = None, into_lists: bool = True) -> dict:
    """The end of every trainer's run: stamp ``metrics["seconds"]`` (wall time since ``t0``, a
    ``time.perf_counter()`` reading, one decimal), round its floats to ``digits`` (``round_floats``;
    None keeps them) and write ``<out_dir>/metrics.json`` atomically. Returns the dict as written."""
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    if digits is not None:
        metrics = round_floats(metrics, digits, into_lists)
    write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics


def trend_line(history: list[dict], keys, label: str, first: int = 5, last: int = 10) -> str:
    """One console line of how logged values moved: the mean of each of ``keys`` over the first
    ``first`` and the last ``last`` rows of ``history`` (rows missing a key, or holding None, are
    left out of its mean; nan when none hold it)."""
    def avg(rows, k):
        vals = [r[k] for r in rows if r.get(k) is not None]
        return float(np.mean(vals)) if vals else float("nan")
    head, tail = history[:first], history[-last:]
    return label + ": " + "  ".join(f"{k} {avg(head, k):.2f} → {avg(tail, k):.2f}" for k in keys)


def metric_lines(m: dict, keys) -> list[str]:
    """``"key: value"`` console lines for those of ``keys`` that ``m`` holds, in that order (timings,
    final losses: the tail of every trainer's summary)."""
    return [f"{k}: {m[k]}" for k in keys if k in m]


def print_run(res, out_dir, summary_lines: Callable[[dict], list]) -> int:
    """What every trainer's CLI prints after a run: its summary lines, the checkpoint (when the run has
    one) and where ``metrics.json`` is. Returns 0 (the command's exit status)."""
    for line in summary_lines(res.metrics):
        print(line)
    if getattr(res, "checkpoint", ""):
        print(f"checkpoint: {res.checkpoint}")
    print(f"metrics: {Path(out_dir) / 'metrics.json'}")
    return 0


def trainer_command(config_cls, train: Callable, summary_lines: Callable[[dict], list],
                    extra_arguments: Callable | None = None) -> tuple[Callable, Callable]:
    """The ``add_arguments(parser)`` and ``run(args) -> int`` of a trainer's CLI command (what
    ``cli.py`` calls): one option per ``config_cls`` field (``add_dataclass_arguments``, then
    ``extra_arguments(parser)`` for any other), and a run that builds the config
    (``dataclass_from_args``), calls ``train(config)`` and prints its summary (``print_run``)."""
    def add_arguments(parser) -> None:
        add_dataclass_arguments(parser, config_cls)
        if extra_arguments is not None:
            extra_arguments(parser)

    def run(args) -> int:
        cfg = dataclass_from_args(config_cls, args)
        return print_run(train(cfg), cfg.out_dir, summary_lines)

    return add_arguments, run


@dataclass
class TrainResult:
    """What a training run returns (SFT, reward model, DPO, PPO, GRPO): loss per step (nats; the
    loop-based trainers), history (one dict of logged values per step or iteration; DPO, PPO, GRPO),
    metrics (JSON-able dict, as written to ``metrics.json``), checkpoint path, wall time in seconds."""

    losses: list = field(default_factory=list)
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    checkpoint: str = ""
    seconds: float = 0.0


#: Why an example was dropped, for the console summary (reason -> explanation).
SKIP_REASONS = {
    "response_too_long": "the response alone is longer than the context",
    "no_target": "no response token to train on",
    "chosen_equals_rejected": "chosen and rejected are the same",
    "no_assistant_turn": "a conversation with no assistant turn",
    "empty_output": "empty output", "empty_response": "empty response", "empty_instruction": "empty instruction",
    "roles_not_alternating": "user/assistant turns out of order", "prompt_mismatch": "chosen and rejected prompts differ",
}


def data_summary(stage: str, report, load_report=None, max_length: int | None = None,
                 length_option: str = "a base model with a longer context (block_size)") -> str:
    """One console line saying how much data a stage kept, cut and dropped, and why.

    Args:
        stage: the stage name ("sft", "reward", "dpo", ...).
        report: the stage's ``data.CollateReport`` (every truncation and skip is counted there).
        load_report: the loader's ``loaders.LoadReport`` (records skipped while reading), or its
            ``skipped`` dict ``{reason: count}``, or None.
        max_length: the token limit the data was fitted to (named in the line).
        length_option: what would keep the cut/dropped examples (e.g. ``--max-length``).
    Returns:
        e.g. ``"sft data: 1319 examples read; kept 16 (3 cut: 41 prompt tokens removed to fit 64
        tokens); dropped 1303: response_too_long 1303 (the response alone is longer than the
        context); to keep them: a base model with a longer context (block_size)"``.
    """
    from_file = load_report is not None and hasattr(load_report, "n_records")
    parts = [f"{stage} data: {report.n_examples} examples"
             + (f" from {load_report.n_records} records of {load_report.path}" if from_file else "")]
    kept = f"kept {report.n_kept}"
    if report.n_truncated:
        kept += (f" ({report.n_truncated} cut: {report.n_tokens_cut} prompt tokens removed from the left"
                 + (f" to fit {max_length} tokens" if max_length else "") + ")")
    parts.append(kept)
    dropped = dict(report.skipped)
    if load_report is not None:
        for k, v in (load_report.skipped if from_file else dict(load_report)).items():
            dropped[f"{k} (while reading)"] = v
    if dropped:
        parts.append(f"dropped {sum(dropped.values())}: " + ", ".join(
            f"{k} {v}" + (f" ({SKIP_REASONS[k]})" if k in SKIP_REASONS else "") for k, v in dropped.items()))
    if report.n_truncated or report.skipped.get("response_too_long"):
        parts.append(f"to keep them whole: {length_option}")
    return "; ".join(parts)


def print_data_summary(stage: str, report, load_report=None, max_length: int | None = None,
                       length_option: str = "a base model with a longer context (block_size)", file=None) -> str:
    """Print ``data_summary(...)`` on the console (stdout, or ``file``) and return it: the one place
    every trainer reports its kept / cut / dropped data."""
    line = data_summary(stage, report, load_report, max_length, length_option)
    print(line, file=file if file is not None else sys.stdout, flush=True)
    return line


def render_pair_splits(stage: str, data: str, train_ex, test_ex, tokenizer, max_length: int, info: dict,
                       default_margin: float | None = None, trainer: str | None = None) -> tuple[list, list, dict]:
    """The reward model's and DPO's data step: render the train and test preference pairs once
    (``data.render_preference_pairs``), print what was kept, cut and dropped (``print_data_summary``),
    and return ``(train_pairs, test_pairs, data metrics)`` (``info`` plus pair counts, skip reasons
    and the number of truncated pairs). Raises ValueError naming ``data`` (and ``trainer``, default
    ``stage``) when no train pair is usable."""
    from minillm.data import CollateReport, render_preference_pairs

    rep_tr, rep_te = CollateReport(), CollateReport()
    train_pairs = render_preference_pairs(train_ex, tokenizer, max_length, report=rep_tr, default_margin=default_margin)
    test_pairs = render_preference_pairs(test_ex, tokenizer, max_length, report=rep_te, default_margin=default_margin)
    length_option = "--max-length up to the model's block_size, or a base model with a longer context"
    print_data_summary(f"{stage} train", rep_tr, info.get("skipped"), max_length, length_option)
    if test_ex:
        print_data_summary(f"{stage} test", rep_te, None, max_length, length_option)
    if not train_pairs:
        raise ValueError(f"{trainer or stage} data {data!r}: no usable preference pair "
                         f"(skipped: {rep_tr.skipped}; pairs read: {rep_tr.n_examples})")
    return train_pairs, test_pairs, {**info, "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs),
                                     "skipped_train": rep_tr.skipped, "skipped_test": rep_te.skipped,
                                     "n_truncated": rep_tr.n_truncated + rep_te.n_truncated}


def check_finite(loss, step: int, what: str) -> None:
    """Raise FloatingPointError naming the stage and step when a loss is NaN or infinite, so a
    diverged run stops instead of training on (and saving) garbage."""
    value = float(loss.item())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what}: the loss became {value} at step {step}")


def rng_state(rng: np.random.Generator) -> dict:
    """A JSON-able snapshot of a numpy Generator (its bit generator state)."""
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    """Restore a snapshot taken by ``rng_state``."""
    rng.bit_generator.state = state


def random_windows(data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """(batch_size, block_size) int64 windows at uniform random offsets of a 1-D token array.

    Raises ValueError when the data is shorter than one window.
    """
    n = len(data) - block_size
    if n < 1:
        raise ValueError(f"need more than block_size={block_size} tokens, got {len(data)}")
    starts = rng.integers(0, n + 1, size=batch_size)
    return np.stack([data[s:s + block_size] for s in starts]).astype(np.int64)


def fixed_windows(data: np.ndarray, n_windows: int, block_size: int) -> np.ndarray:
    """Evenly spaced (n_windows, block_size) windows: a deterministic evaluation set."""
    n = len(data) - block_size
    if n < 0:
        raise ValueError(f"need at least block_size={block_size} tokens, got {len(data)}")
    starts = np.linspace(0, n, num=max(1, n_windows)).astype(np.int64)
    return np.stack([data[s:s + block_size] for s in starts]).astype(np.int64)


def mean_loss(model, batches, loss_fn: Callable | None = None) -> float:
    """Mean of ``loss_fn(model, batch)`` (default: next-token loss on ids as labels) under no_grad, eval
    mode, weighted by each batch's number of rows, so unequal batches of equal-length windows give the
    per-token mean (nats/token)."""
    was = model.training
    model.eval()
    try:
        with no_grad():
            losses, weights = [], []
            for b in batches:
                if loss_fn is None:
                    _, loss = model(b, labels=b)
                else:
                    loss = loss_fn(model, b)
                losses.append(float(loss.item()))
                weights.append(len(b))
    finally:
        model.train(was)
    return float(np.average(losses, weights=weights)) if losses else math.nan
