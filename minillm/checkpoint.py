"""Checkpoints: model weights, config, tokenizer, optimizer state and training state in one
safetensors file, written atomically.

Scope
    ``save_checkpoint`` writes ``model.<name>`` arrays, ``optimizer.state.<i>.<name>`` arrays and
    JSON metadata (config, tokenizer, optimizer hyperparameters and scalar state, the training
    state: step, random-generator states, loss history) to ``<path>.tmp`` and renames it over
    ``path`` (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written file.
    ``load_checkpoint`` reads it back and checks it; nothing is ever unpickled.

Sources
    safetensors format (huggingface/safetensors): a JSON header of dtypes, shapes and offsets,
    then raw little-endian bytes; metadata is a str -> str map.

Deviations
    None.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from minillm import backend

FORMAT = "minillm-checkpoint-v1"


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8, "\n" newlines) to ``path`` atomically: a temp file in the same folder,
    then ``os.replace``; the folder is created if needed and the temp file removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path, obj) -> Path:
    """``obj`` as indented JSON (numpy scalars as floats), written with ``write_text_atomic``."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_safetensors_atomic(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> array, copied to the host) and str metadata to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = {k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(host, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file. Raises FileNotFoundError / ValueError naming the file.

    A PyTorch pickle (``.bin``/``.pt``) is refused with a clear message: minillm never unpickles.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header's "{"
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise ValueError(f"{path}: looks like a pickle/zip (PyTorch .bin/.pt) file; minillm reads only safetensors")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, metadata


@dataclass
class Checkpoint:
    """Everything a checkpoint file holds.

    config: dict of the model's GPTConfig; model_state: name -> array; tokenizer: dict or None;
    optimizer_state: the optimizer's ``state_dict()`` form or None; train_state: JSON-able dict.
    """

    path: Path
    config: dict
    model_state: dict
    tokenizer: dict | None = None
    optimizer_state: dict | None = None
    train_state: dict = field(default_factory=dict)


def save_checkpoint(path, model, tokenizer=None, optimizer=None, train_state: dict | None = None,
                    extra_tensors: dict | None = None) -> Path:
    """Save model (+ tokenizer, optimizer, training state) to one safetensors file, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if tokenizer is not None:
        meta["tokenizer"] = json.dumps(tokenizer.to_dict())
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if hasattr(v, "shape"):
                    tensors[f"optimizer.state.{i}.{k}"] = v
                else:
                    scalars.setdefault(str(i), {})[k] = v
        meta["optimizer"] = json.dumps({"param_groups": sd["param_groups"], "scalars": scalars,
                                        "type": type(optimizer).__name__})
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    meta["train_state"] = json.dumps(train_state or {})
    save_safetensors_atomic(path, tensors, meta)
    return Path(path)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; raises ValueError naming the file when
    it is not a minillm checkpoint or a part is missing."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a minillm checkpoint (metadata format={meta.get('format')!r})")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state = None
    if "optimizer" in meta:
        o = json.loads(meta["optimizer"])
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer.state."):
                i, name = k[len("optimizer.state."):].split(".", 1)
                state.setdefault(int(i), {})[name] = v
        for i, sc in o["scalars"].items():
            state.setdefault(int(i), {}).update(sc)
        for g in o["param_groups"]:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        opt_state = {"state": state, "param_groups": o["param_groups"], "type": o.get("type")}
    return Checkpoint(path=Path(path), config=json.loads(meta["config"]), model_state=model_state,
                      tokenizer=json.loads(meta["tokenizer"]) if "tokenizer" in meta else None,
                      optimizer_state=opt_state, train_state=json.loads(meta.get("train_state", "{}")))


def load_model(path, config_overrides: dict | None = None):
    """Build a GPT from a checkpoint file, a run directory or a Hugging Face GPT-2 directory:
    returns (model, tokenizer or None, Checkpoint).

    Raises ValueError naming the file and every mismatched shape when the weights do not fit the
    stored config.
    """
    from minillm.model import GPT, GPTConfig

    if Path(path).is_dir():  # a Hugging Face GPT-2 directory or a run directory
        from minillm.hf import load_any

        return load_any(path, config_overrides=config_overrides)
    from minillm.hf import tokenizer_from_dict

    ck = load_checkpoint(path)
    cfg = dict(ck.config)
    cfg.update(config_overrides or {})
    model = GPT(GPTConfig.from_dict(cfg))
    state = ck.model_state
    if cfg.get("scalar_head") and not ck.config.get("scalar_head"):
        state = dict(state)
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    model.load_state_dict(state, source=str(path))
    tok = tokenizer_from_dict(ck.tokenizer) if ck.tokenizer is not None else None
    return model, tok, ck
