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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from minillm.tensor import no_grad


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """One ``--field-name`` option per dataclass field (bools take true/false), defaults shown."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        typ = f.type if isinstance(f.type, type) else eval(f.type, {}, {})  # noqa: S307 - type names only
        if typ is bool or default is True or default is False:
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL",
                                help=f"(default: {default})")
        elif typ in (int, float, str):
            parser.add_argument(flag, type=typ, default=default, help=f"(default: {default})")
        else:  # Optional[...] and friends: take a string, let the config validate it
            parser.add_argument(flag, type=_auto, default=default, help=f"(default: {default})")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _auto(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
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
class TrainResult:
    """What a training run returns: loss per step (nats), metrics (JSON-able dict), checkpoint path,
    wall time in seconds."""

    losses: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    checkpoint: str = ""
    seconds: float = 0.0


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
