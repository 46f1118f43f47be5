"""Supervised fine-tuning (instruction tuning): full, LoRA or QLoRA, with the loss on response tokens.

Scope
    ``sft(SFTConfig)`` loads a base checkpoint, renders every conversation with the chat template
    (``data.render_chat``: the loss mask covers exactly the response tokens and their
    ``<|eos|>``), and trains with AdamW, a cosine schedule and gradient clipping on shuffled
    batches (right padding; padding known from the attention mask). ``loss_on="all"`` trains on
    every real token instead (the comparison the chapter makes). ``lora=True`` freezes the base and
    trains LoRA adapters (``lora.inject_lora``); ``qlora=True`` first replaces the blocks' Linear
    layers by 4-bit NF4 layers (``linear4bit.Linear4bit``) and trains LoRA on them.
    On the built-in world it evaluates the base model zero-shot and k-shot and the tuned model on
    held-out facts, held-out paraphrases and train facts (evaluate.evaluate_world), measures the
    pretraining-corpus loss before and after (forgetting), and writes ``<out_dir>/metrics.json``
    and ``<out_dir>/checkpoint.safetensors`` (LoRA merged into full-precision weights).

Sources
    Ouyang et al. 2022 (InstructGPT) §3.5 SFT; the response-only loss of TRL's
    ``DataCollatorForCompletionOnlyLM`` / ``assistant_only_loss``; LoRA: Hu et al. 2021; QLoRA:
    Dettmers et al. 2023 §3. Defaults: docs/task-world.md §3 (B32, 150 steps, lr 3e-4, wd 0).

Deviations
    * The saved checkpoint of a LoRA/QLoRA run holds the merged full-precision weights (the
      adapter alone is saved beside it as ``adapter.safetensors``, written before merging, loadable
      with ``lora.load_adapter``); for QLoRA the base is dequantized first, so nothing is
      re-quantized (docs/bugs.md B13).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minillm.checkpoint import load_model, save_checkpoint, write_text_atomic
from minillm.data import CollateReport, SFTExample, collate, tokenize_sft
from minillm.loaders import load_dataset
from minillm.model import IGNORE_INDEX, GPT
from minillm.optim import AdamW, weight_decay_groups
from minillm.train.common import (LoRAConfig, OptimConfig, TrainResult, add_dataclass_arguments, dataclass_from_args,
                                  fixed_windows, mean_loss, metric_lines, print_data_summary, write_metrics)
from minillm.train.loop import index_batches, train_loop


@dataclass
class SFTConfig(LoRAConfig, OptimConfig):
    """Settings of an SFT run (CLI: ``minillm sft --lora true --max-steps 150``): the shared optimizer
    and LoRA fields (``OptimConfig``, ``LoRAConfig``) with SFT's measured defaults, and SFT's own."""

    max_steps: int = 150
    base: str = "runs/base/checkpoint.safetensors"
    data: str = "builtin"  # "builtin" (the task world) or a file any loader in data.py reads
    variant: str = "plain"  # built-in SFT data: plain | opener | noisy
    out_dir: str = "runs/sft"
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per step (per-token mean over all)
    loss_on: str = "response"  # response | all
    qlora: bool = False
    quant_blocksize: int = 64
    eval: bool = True
    eval_base: bool = True
    eval_max_prompts: int = 0  # 0 = all held-out prompts
    k_shot: int = 3
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_on not in ("response", "all"):
            raise ValueError(f"loss_on must be 'response' or 'all', got {self.loss_on!r}")
        if self.variant not in ("plain", "opener", "noisy"):
            raise ValueError(f"variant must be plain, opener or noisy, got {self.variant!r}")
        for name in ("batch_size", "max_steps", "lora_r", "max_new_tokens", "gradient_accumulation_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SFTConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.qlora:
            self.lora = True


SFTResult = TrainResult  # losses per step (nats/token), metrics, checkpoint path, seconds


def builtin_sft_records(variant: str = "plain") -> list[dict]:
    """The task world's SFT rows (Alpaca fields + metadata)."""
    from minillm.tasks import default_world

    return default_world().sft_records(variant)


def records_to_messages(records) -> list[list[dict]]:
    """Alpaca-style dicts (instruction, input, output) or SFTExamples -> message lists."""
    out = []
    for r in records:
        if isinstance(r, SFTExample):
            out.append(r.messages)
        else:
            user = r["instruction"] if not r.get("input") else f"{r['instruction']}\n\n{r['input']}"
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return out


def apply_peft(model: GPT, cfg: SFTConfig) -> dict:
    """Freeze the base and add LoRA (and, for QLoRA, quantize the blocks' Linear layers to NF4 first).
    Returns {trainable, total, percent} from ``lora.count_parameters``."""
    from minillm.lora import count_parameters, inject_lora, parse_target_modules

    targets = parse_target_modules(cfg.lora_targets, qlora=cfg.qlora)
    if cfg.qlora:
        from minillm.linear4bit import quantize_model

        quantize_model(model, blocksize=cfg.quant_blocksize)
    inject_lora(model, targets, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                seed=cfg.seed)
    return count_parameters(model)


def memory_estimate(model: GPT, cfg: SFTConfig) -> dict:
    """Training memory of this run by component (bytes, float32, memory.estimate): weights, quantization
    constants, LoRA weights, gradients, AdamW states, activations of one batch."""
    from minillm import memory
    from minillm.lora import parse_target_modules

    shape = memory.ModelShape.from_gpt_config(model.config)
    method = "qlora" if cfg.qlora else "lora" if cfg.lora else "full"
    targets = parse_target_modules(cfg.lora_targets, qlora=cfg.qlora)
    try:
        est = memory.estimate(shape, method=method, dtype="fp32", batch=cfg.batch_size,
                              seq_len=model.config.block_size, lora_r=cfg.lora_r, lora_targets=targets)
    except ValueError as e:  # a target name the calculator does not know: say so, do not fail the run
        return {"error": str(e)}
    return {k: int(v) for k, v in est.items() if isinstance(v, (int, float))}


def merge_for_saving(model: GPT) -> GPT:
    """A plain float32 GPT: every 4-bit base dequantized (no re-quantization), then every LoRA merged
    (W ← W + scaling·B·A), then the wrappers removed. All parameters trainable again."""
    from minillm.lora import merge_and_unload
    from minillm.linear4bit import dequantize_model

    dequantize_model(model)
    model = merge_and_unload(model)
    model.requires_grad_(True)
    return model


def train_sft(model: GPT, tok, examples: list, cfg: SFTConfig, on_step=None) -> list[float]:
    """SFT through the shared loop (``train.loop.train_loop``): ``examples`` are (ids, loss_mask) pairs;
    the loss is the mean next-token cross-entropy over the response tokens (``loss_on="response"``)
    or every real token (``"all"``). With ``gradient_accumulation_steps`` > 1 each step accumulates
    that many micro-batches of ``batch_size`` as one per-token mean. Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    stream = index_batches(len(examples), cfg.batch_size, np.random.default_rng(cfg.seed))
    accumulation = cfg.gradient_accumulation_steps

    def next_batch():
        while True:
            micro = [collate([examples[i] for i in next(stream)], tok.pad_id) for _ in range(accumulation)]
            yield micro if accumulation > 1 else micro[0]

    def labels_of(b):
        if cfg.loss_on == "all":  # every real token after the first is a target
            return np.where(b["attention_mask"] == 1, b["input_ids"], IGNORE_INDEX)
        return b["labels"]

    def loss_fn(b):
        _, loss = model(b["input_ids"], attention_mask=b["attention_mask"], labels=labels_of(b))
        return loss, {}

    def n_targets(b):  # targets of the shifted loss: labels[:, 1:]
        return int((labels_of(b)[:, 1:] != IGNORE_INDEX).sum())

    model.train()
    history = train_loop(opt, params, next_batch(), loss_fn, max_steps=cfg.max_steps, lr=cfg.lr,
                         warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                         weight_fn=n_targets if accumulation > 1 else None, what="sft" + (
                             " (qlora)" if cfg.qlora else " (lora)" if cfg.lora else ""),
                         progress=cfg.progress,
                         on_step=None if on_step is None else (lambda step, rec: on_step(step, rec["loss"])))
    model.eval()
    return [h["loss"] for h in history]


def corpus_loss(model: GPT, tok, n_windows: int = 64) -> float:
    """Mean next-token loss (nats/token) on the held-out tail of the built-in pretraining corpus."""
    from minillm.train.pretrain import builtin_texts, encode_corpus

    data = encode_corpus(builtin_texts()[0], tok)
    tail = data[-max(int(len(data) * 0.1), model.config.block_size + 1):]  # pretrain's validation split
    T = model.config.block_size
    return mean_loss(model, np.array_split(fixed_windows(tail, n_windows, T), max(1, n_windows // 16)))


def world_eval(model: GPT, tok, cfg: SFTConfig, k_shot: int = 0, splits=("test", "paraphrase", "train")) -> dict:
    """Evaluate on the built-in world's held-out facts (and paraphrases / train facts)."""
    from minillm.evaluate import evaluate_world
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world

    world = default_world()
    judge = GoldJudge(world)
    recs = {"test": world.sft_test_records(),
            "paraphrase": [r for r in world.sft_paraphrase_records() if r["fact_split"] == "test"],
            "train": world.sft_records("plain")}
    out = {}
    for s in splits:
        mp = cfg.eval_max_prompts or None
        if s == "train":
            mp = min(mp or 200, 200)
        res = evaluate_world(model, tok, recs[s], judge, k_shot=k_shot, max_new_tokens=cfg.max_new_tokens,
                             max_prompts=mp)
        out[s] = {**{k: round(v, 4) for k, v in res.metrics.items()},
                  "per_task": {t: {m: round(v, 4) for m, v in d.items()} for t, d in res.per_task.items()},
                  "samples": res.samples[:3]}
    return out


def sft(cfg: SFTConfig) -> SFTResult:
    """Run SFT as configured; returns an SFTResult and writes metrics.json and the checkpoint.

    Raises FileNotFoundError for a missing base checkpoint, the loaders' errors (file and line) for
    bad data, and ValueError when no example fits the model's context.
    """
    t0 = time.perf_counter()
    model, tok, _ = load_model(cfg.base)
    if tok is None:
        raise ValueError(f"{cfg.base}: the checkpoint has no tokenizer")
    if cfg.lora:  # a --lora-r larger than a targeted layer fails now, before the data and the evaluations
        from minillm.lora import lora_target_layers, parse_target_modules

        lora_target_layers(model, parse_target_modules(cfg.lora_targets, qlora=cfg.qlora), cfg.lora_r)
    builtin = cfg.data == "builtin"
    ds = None if builtin else load_dataset(cfg.data, kind="sft")
    records = builtin_sft_records(cfg.variant) if builtin else ds.records
    report = CollateReport()
    examples = tokenize_sft(records_to_messages(records), tok, max_length=model.config.block_size, report=report)
    print_data_summary("sft", report, ds.report if ds is not None else None, max_length=model.config.block_size)
    if not examples:
        raise ValueError(f"SFT data {cfg.data!r}: no example fits block_size={model.config.block_size} "
                         f"(skipped: {report.skipped})")
    metrics: dict = {"config": asdict(cfg), "data": {"n_examples": report.n_examples, "n_kept": report.n_kept,
                                                     "n_truncated": report.n_truncated, "skipped": report.skipped,
                                                     "skipped_while_reading": ds.report.skipped if ds else {}}}
    if builtin and cfg.eval and cfg.eval_base:
        metrics["base_zero_shot"] = world_eval(model, tok, cfg, 0, splits=("test",))["test"]
        if cfg.k_shot:
            metrics[f"base_{cfg.k_shot}_shot"] = world_eval(model, tok, cfg, cfg.k_shot, splits=("test",))["test"]
        metrics["corpus_loss_before"] = round(corpus_loss(model, tok), 4)
    if cfg.lora:
        metrics["parameters"] = apply_peft(model, cfg)
    else:
        n = model.num_parameters()
        metrics["parameters"] = {"trainable": n, "total": n, "percent": 100.0}
    metrics["memory_estimate"] = memory_estimate(model, cfg)
    t_train = time.perf_counter()
    losses = train_sft(model, tok, examples, cfg)
    metrics["train_seconds"] = round(time.perf_counter() - t_train, 1)
    metrics["final_loss"] = round(float(np.mean(losses[-10:])), 4)
    out = Path(cfg.out_dir)
    if cfg.lora:
        from minillm.lora import save_adapter

        save_adapter(model, str(out / "adapter.safetensors"),  # the LoRA tensors alone, before merging
                     base_model_name_or_path=cfg.base)
        metrics["adapter"] = str(out / "adapter.safetensors")
        model = merge_for_saving(model)
    if builtin and cfg.eval:
        metrics.update({f"sft_{k}": v for k, v in world_eval(model, tok, cfg).items()})
        metrics["corpus_loss_after"] = round(corpus_loss(model, tok), 4)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", model, tok, train_state={"sft_config": asdict(cfg)})
    metrics = write_metrics(out, metrics, t0)
    return SFTResult(losses=losses, metrics=metrics, checkpoint=str(ckpt), seconds=metrics["seconds"])


def summary_lines(m: dict) -> list[str]:
    """Human-readable lines of an SFT metrics dict."""
    lines = []
    for key in ("base_zero_shot", "base_3_shot", "sft_test", "sft_paraphrase", "sft_train"):
        if key in m:
            d = m[key]
            tasks = ", ".join(f"{t} {v['exact_match']:.0%}" for t, v in d.get("per_task", {}).items())
            lines.append(f"{key:15s} EM {d['exact_match']:6.1%}  contains {d['contains']:6.1%}  "
                         f"format {d['format_compliance']:6.1%}  gold {d['gold']:+.3f}  [{tasks}]")
    lines += metric_lines(m, ("corpus_loss_before", "corpus_loss_after", "final_loss", "train_seconds", "parameters"))
    if "total" in m.get("memory_estimate", {}):
        lines.append(f"memory estimate: {m['memory_estimate']['total'] / 1e6:.1f} MB in all (weights "
                     f"{m['memory_estimate']['weights'] / 1e6:.1f} MB, optimizer states "
                     f"{m['memory_estimate']['optimizer_states'] / 1e6:.1f} MB)")
    return lines


def add_arguments(parser) -> None:
    add_dataclass_arguments(parser, SFTConfig)
    parser.add_argument("--compare-loss-on", action="store_true",
                        help="also train with the loss on all tokens (same budget) and report both")


def run(args) -> int:
    cfg = dataclass_from_args(SFTConfig, args)
    res = sft(cfg)
    report = {"response_only": res.metrics}
    for line in summary_lines(res.metrics):
        print(line)
    if getattr(args, "compare_loss_on", False):
        other = dataclass_from_args(SFTConfig, args, loss_on="all" if cfg.loss_on == "response" else "response",
                                    out_dir=cfg.out_dir + "-all-tokens", eval_base=False)
        res2 = sft(other)
        report["all_tokens"] = res2.metrics
        print(f"--- loss on {other.loss_on} tokens (same budget) ---")
        for line in summary_lines(res2.metrics):
            print(line)
        write_text_atomic(Path(cfg.out_dir, "comparison.json"), json.dumps(
            {k: {kk: v.get(kk) for kk in ("sft_test", "final_loss", "corpus_loss_after")} for k, v in report.items()},
            indent=2) + "\n")
    print(f"metrics: {Path(cfg.out_dir) / 'metrics.json'}")
    return 0
