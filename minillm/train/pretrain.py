"""Pretraining: train the byte-level BPE tokenizer and a GPT base model on a text corpus.

Scope
    ``pretrain(PretrainConfig)`` reads a UTF-8 corpus, trains the tokenizer (or reuses the one in
    the checkpoint when resuming), encodes the text, holds out the last ``val_fraction`` of the
    tokens for validation, and trains with AdamW (no decay on biases/LayerNorm), a cosine schedule
    with warmup and gradient clipping on random windows of ``block_size`` tokens. It reports the
    training loss every step (tqdm), the validation loss every ``eval_interval`` steps with a
    greedy sample, and writes ``<out_dir>/checkpoint.safetensors`` atomically with the config,
    tokenizer, optimizer state and the data generator's state — so ``resume=True`` continues and
    reproduces the losses of an uninterrupted run exactly. ``minillm pretrain --corpus FILE``.
    An existing checkpoint in ``out_dir`` is never silently replaced: without ``resume`` (or
    ``overwrite``) the run refuses to start; with ``resume`` the checkpoint must have been made from
    the same corpus (SHA-256 of its tokens' text) and the same settings (the differing fields are
    named), so a resumed run never trains on from another run's weights.

Sources
    Radford et al. 2019 (GPT-2) language-model pretraining; nanoGPT ``train.py`` (random windows,
    AdamW β₂ = 0.95, weight decay 0.1 on 2-D weights, cosine decay to 10 %, clip 1.0).
    Defaults are the measured recipe of docs/task-world.md §3.

Deviations
    * A window of T tokens trains T − 1 next-token predictions (labels = the window itself, shifted
      inside the loss) rather than nanoGPT's T + 1-token windows; set block_size one larger to
      restore T predictions.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from minillm.checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW, weight_decay_groups
from minillm.tokenizer import Tokenizer
from minillm.train.common import (OptimConfig, TrainResult, add_dataclass_arguments, dataclass_from_args, fixed_windows,
                                  mean_loss, random_windows, read_text, rng_state, set_rng_state)
from minillm.train.loop import train_loop

CHECKPOINT_NAME = "checkpoint.safetensors"


#: The GPTConfig fields a pretraining run sets, each a command-line flag (``--n-layer 4``) and a
#: keyword of ``PretrainConfig`` (``PretrainConfig(n_layer=4)`` sets ``model.n_layer``).
MODEL_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")


@dataclass
class PretrainConfig(OptimConfig):
    """Settings of a pretraining run (CLI: ``--max-steps 1200`` etc.): the shared optimizer fields
    (``OptimConfig``) with pretraining's measured defaults, the model's shape ``model`` (a
    ``GPTConfig``; its ``vocab_size`` is the tokenizer's target size) and the run's own.

    The model's fields are also keywords (``PretrainConfig(n_layer=2)`` = ``model.n_layer = 2``;
    ``MODEL_FIELDS``) and read back flat (``cfg.n_layer`` is ``cfg.model.n_layer``), so the CLI
    flags and configs stored flat by earlier versions (a checkpoint's ``pretrain_config``) still
    work; ``model`` may also be given as a dict (the stored form, ``asdict``). Raises ValueError
    for an invalid model shape (``GPTConfig``) or run setting.
    """

    corpus: str = "builtin"  # a UTF-8 text file, or "builtin" for the task world's corpus
    out_dir: str = "runs/base"
    model: GPTConfig = field(default_factory=GPTConfig)
    vocab_size: InitVar[int | None] = None
    block_size: InitVar[int | None] = None
    n_layer: InitVar[int | None] = None
    n_head: InitVar[int | None] = None
    n_embd: InitVar[int | None] = None
    dropout: InitVar[float | None] = None
    batch_size: int = 16
    max_steps: int = 1200
    lr: float = 4e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    val_fraction: float = 0.1
    eval_interval: int = 200
    eval_windows: int = 32
    sample_tokens: int = 32
    checkpoint_interval: int = 200
    resume: bool = False  # continue the run in out_dir (same corpus and settings, checked)
    overwrite: bool = False  # replace an existing run's checkpoint in out_dir (else: refuse)
    continue_training: bool = False  # with resume: continued pretraining (new corpus and schedule allowed)

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The GPTConfig this run trains (``vocab_size``: the trained tokenizer's, default the model's)."""
        return replace(self.model, vocab_size=vocab_size or self.model.vocab_size)

    def __post_init__(self, vocab_size, block_size, n_layer, n_head, n_embd, dropout) -> None:
        super().__post_init__()
        if isinstance(self.model, Mapping):  # the stored (asdict) form
            self.model = GPTConfig.from_dict(self.model)
        flat = zip(MODEL_FIELDS, (vocab_size, block_size, n_layer, n_head, n_embd, dropout))
        self.model = replace(self.model, **{k: v for k, v in flat if v is not None})
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        for name in ("max_steps", "batch_size", "eval_interval", "checkpoint_interval", "eval_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PretrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")


for _name in MODEL_FIELDS:  # read access in the flat form: cfg.n_layer is cfg.model.n_layer
    setattr(PretrainConfig, _name, property(lambda self, _n=_name: getattr(self.model, _n)))


@dataclass
class PretrainResult(TrainResult):
    """What a run produced: the trainers' ``TrainResult`` (losses per step in nats/token, also
    readable as ``train_losses``; checkpoint path; wall time in seconds) plus validation losses as
    (step, loss), the number of corpus tokens and the greedy samples printed at each evaluation."""

    val_losses: list = field(default_factory=list)
    n_tokens: int = 0
    samples: list = field(default_factory=list)

    @property
    def train_losses(self) -> list:
        return self.losses

    @train_losses.setter
    def train_losses(self, value: list) -> None:
        self.losses = value


def builtin_texts() -> tuple[str, str]:
    """(corpus, tokenizer training text) of the built-in task world (``--corpus builtin``)."""
    from minillm.tasks import default_world, tokenizer_training_text

    world = default_world()
    return "".join(world.corpus_documents()), tokenizer_training_text(world)


def encode_corpus(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of the corpus (special-token strings such as ``<|bos|>`` become their ids): int32."""
    return np.asarray(tokenizer.encode(text, allowed_special="all"), dtype=np.int32)


def pretrain(cfg: PretrainConfig, text: str | None = None, tokenizer_text: str | None = None) -> PretrainResult:
    """Run (or resume) pretraining; returns a PretrainResult. ``text`` overrides reading ``cfg.corpus``;
    ``tokenizer_text`` (e.g. the corpus plus instruction strings) trains the tokenizer instead of the corpus.

    Raises FileNotFoundError/ValueError for a missing, empty or non-UTF-8 corpus (naming the file),
    ValueError for a vocab_size too small for 256 bytes + special tokens, a checkpoint whose shapes
    do not match the config (naming the shapes), or a corpus shorter than one window;
    FileExistsError when ``out_dir`` holds a checkpoint and neither ``resume`` nor ``overwrite`` is
    set; ValueError when resuming a checkpoint made from another corpus or other settings (naming
    the differing fields) or one without optimizer state; FloatingPointError when the loss or a
    weight becomes NaN/inf (the last good checkpoint is kept).
    """
    t0 = time.perf_counter()
    if text is None and cfg.corpus == "builtin":
        text, tokenizer_text = builtin_texts()
    if text is None:
        text = read_text(cfg.corpus)
    elif not text.strip():
        raise ValueError("pretrain: the corpus text is empty")
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    if ckpt_path.exists() and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"{ckpt_path} already exists (an earlier run); pass --resume true to continue it, "
                              f"--overwrite true to replace it, or choose another --out-dir")
    resume = cfg.resume and ckpt_path.exists()
    ck = load_checkpoint(ckpt_path) if resume else None
    corpus_sha256 = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if ck:
        check_resumable(ck, cfg, corpus_sha256, continue_training=cfg.continue_training)
    try:  # the stored tokenizer's pattern must be one minillm writes (pretokenize.check_loaded_pattern)
        tok = Tokenizer.from_dict(ck.tokenizer) if ck else Tokenizer.train(tokenizer_text or text, cfg.model.vocab_size)
    except ValueError as e:
        if not ck:
            raise
        raise ValueError(f"{ckpt_path}: tokenizer: {e}") from None

    data = encode_corpus(text, tok)
    n_val = max(cfg.model.block_size + 1, int(len(data) * cfg.val_fraction))
    if len(data) - n_val <= cfg.model.block_size:
        raise ValueError(f"corpus has {len(data)} tokens: too short for block_size={cfg.model.block_size} "
                         f"plus a validation split of {n_val}")
    train_data, val_data = data[:-n_val], data[-n_val:]
    val_batches = np.array_split(fixed_windows(val_data, cfg.eval_windows, cfg.model.block_size),
                                 max(1, cfg.eval_windows // cfg.batch_size))

    gcfg = cfg.model_config(tok.vocab_size)
    model = GPT(gcfg, seed=cfg.seed)
    opt = AdamW(weight_decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2))
    rng = np.random.default_rng(cfg.seed)
    result = PretrainResult(n_tokens=len(data))
    start = 0
    if ck:
        if ck.config != gcfg.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint config {ck.config} does not match this run's {gcfg.to_dict()}")
        model.load_state_dict(ck.model_state, source=str(ckpt_path))
        opt.load_state_dict(ck.optimizer_state)
        st = ck.train_state
        start = st["step"]
        set_rng_state(rng, st["rng"])
        set_rng_state(model.drop_rng, st["drop_rng"])
        result.train_losses = list(st["train_losses"])
        result.val_losses = [tuple(v) for v in st["val_losses"]]

    def save(step: int) -> None:
        save_checkpoint(ckpt_path, model, tok, opt, train_state={
            "step": step, "rng": rng_state(rng), "drop_rng": rng_state(model.drop_rng),
            "train_losses": result.train_losses, "val_losses": result.val_losses,
            "pretrain_config": asdict(cfg), "corpus_sha256": corpus_sha256})

    def windows():  # drawn lazily, one per step, so a checkpoint's RNG state is the state after its step
        while True:
            yield random_windows(train_data, cfg.batch_size, cfg.model.block_size, rng)

    def loss_fn(batch):  # next-token cross-entropy over every position (nats/token)
        _, loss = model(batch, labels=batch)
        return loss, {}

    def on_step(step: int, record: dict) -> None:  # evaluation and checkpoints
        result.train_losses.append(record["loss"])
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            vl = mean_loss(model, val_batches)
            result.val_losses.append((done, vl))
            sample = greedy_sample(model, tok, val_data[: min(8, cfg.model.block_size // 2)], cfg.sample_tokens)
            result.samples.append((done, sample))
            if cfg.progress:
                tqdm.write(f"step {done}: train {record['loss']:.3f}  val {vl:.3f}  sample: {sample!r}")
        if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps:
            save(done)

    model.train()
    train_loop(opt, model.parameters(), windows(), loss_fn, max_steps=cfg.max_steps, lr=cfg.lr,
               warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
               start_step=start, what="pretrain", progress=cfg.progress, on_step=on_step)
    result.checkpoint = str(ckpt_path)
    result.seconds = time.perf_counter() - t0
    return result


#: PretrainConfig fields a resumed run may change (they do not change the trained weights).
RESUME_MAY_DIFFER = ("resume", "overwrite", "progress", "out_dir", "corpus", "eval_interval", "eval_windows",
                     "sample_tokens", "checkpoint_interval", "continue_training")


def check_resumable(ck, cfg: PretrainConfig, corpus_sha256: str, continue_training: bool = False) -> None:
    """Raise ValueError naming ``ck.path`` and exactly the differing fields when checkpoint ``ck``
    cannot be continued by ``cfg`` on a corpus of SHA-256 ``corpus_sha256``: another corpus, other
    training settings (every PretrainConfig field but ``RESUME_MAY_DIFFER``), or no optimizer state
    or training state to continue from. ``continue_training`` (continued pretraining, chapter 13)
    asks only for the optimizer and training state: a new corpus and schedule are the point."""
    st = ck.train_state
    if ck.optimizer_state is None or "step" not in st or "rng" not in st:
        raise ValueError(f"{ck.path}: has no optimizer/training state (not written by `minillm pretrain`), so it "
                         f"cannot be resumed; use --overwrite true or another --out-dir")
    if continue_training:
        return
    old = flat_pretrain_config(st.get("pretrain_config") or {})
    new = flat_pretrain_config(asdict(cfg))
    diff = {k: (old.get(k), new[k]) for k in new if k not in RESUME_MAY_DIFFER and k in old and old[k] != new[k]}
    if diff:
        raise ValueError(f"{ck.path}: cannot resume with different settings: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
                         + " (use --overwrite true to start over)")
    if st.get("corpus_sha256") not in (None, corpus_sha256):
        raise ValueError(f"{ck.path}: was trained on another corpus (SHA-256 {st['corpus_sha256'][:12]}…, this corpus "
                         f"{corpus_sha256[:12]}…); resuming would mix them (use --overwrite true to start over)")


def flat_pretrain_config(d: Mapping) -> dict:
    """A stored ``pretrain_config`` in the flat form of earlier versions: the ``model`` dict's
    ``MODEL_FIELDS`` beside the run's fields (a flat dict is returned as is)."""
    d = dict(d)
    model = d.pop("model", None) or {}
    return {**d, **{k: model[k] for k in MODEL_FIELDS if k in model}}


def greedy_sample(model: GPT, tok: Tokenizer, prompt_ids, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt_ids`` (a short list of ids), decoded to text."""
    n = min(max_new_tokens, model.config.block_size - len(prompt_ids))
    if n <= 0:
        return ""
    out = model.generate(np.asarray(prompt_ids, dtype=np.int64)[None, :], max_new_tokens=n, temperature=0,
                         eos_id=tok.eos_id, pad_id=tok.pad_id)
    return tok.decode([int(i) for i, m in zip(out.new_tokens[0], out.response_mask[0]) if m])


def add_arguments(parser) -> None:
    """``minillm pretrain`` flags: one per PretrainConfig field, the model's as ``--n-layer`` etc. (``MODEL_FIELDS``)."""
    names = [f.name for f in fields(PretrainConfig)]
    before = tuple(names[:names.index("model")])  # the model's flags stand where the field does
    add_dataclass_arguments(parser, PretrainConfig, only=before)
    add_dataclass_arguments(parser, GPTConfig, only=MODEL_FIELDS)
    add_dataclass_arguments(parser, PretrainConfig, skip=before + ("model",))
    parser.add_argument("--json", default=None, help="also write the result summary as JSON to this file")


def run(args) -> int:
    cfg = dataclass_from_args(PretrainConfig, args, **{k: getattr(args, k) for k in MODEL_FIELDS})
    res = pretrain(cfg)
    summary = {"checkpoint": res.checkpoint, "seconds": round(res.seconds, 1), "n_tokens": res.n_tokens,
               "final_train_loss": res.train_losses[-1] if res.train_losses else None,
               "val_losses": res.val_losses}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json_atomic(args.json, summary)
    return 0
