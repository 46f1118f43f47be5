"""Checkpoints: model weights, config, tokenizer, optimizer state and training state in one
safetensors file, written atomically.

Scope
    ``save_checkpoint`` writes ``model.<name>`` arrays, ``optimizer.state.<i>.<name>`` arrays and
    JSON metadata (config, tokenizer, optimizer hyperparameters and scalar state, the training
    state: step, random-generator states, loss history) to ``<path>.tmp`` and renames it over
    ``path`` (``os.replace`` is atomic on POSIX; the temp file is fsynced first and the folder
    after), so a crash never leaves a half-written file; temp files left by a killed save are
    removed by the next write into that folder (``clean_stale_temp_files``).
    ``load_checkpoint`` reads it back and checks it; nothing is ever unpickled.
    Every tensor written (``save_safetensors_atomic``) and every checkpoint read
    (``load_checkpoint``) must be finite (``check_finite_tensors``): a diverged run fails instead
    of replacing a good checkpoint, and a NaN weight in an input file is named, not trained on.
    Every weight written or read must also be below a divergence bound (``check_weight_magnitude``:
    max |w| ≤ ``MAX_ABS_WEIGHT`` = 1e4, override with the environment variable
    ``MINILLM_MAX_ABS_WEIGHT``): a run that diverged to huge but finite weights (``lr 1e3`` gave
    ~2e10) is not saved, and such a file is not resumed from. ``check_weights`` runs both checks.
    ``check_output_dir`` tells an unwritable output folder before training, not at the first save.
    ``read_safetensors_any`` reads safetensors files other programs wrote (float16 / bfloat16
    converted to float32; a pickle is refused by its magic bytes), for the Hugging Face import.

Sources
    safetensors format (huggingface/safetensors): a JSON header of dtypes, shapes and offsets,
    then raw little-endian bytes; metadata is a str -> str map.

Deviations
    None.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from minillm import backend

FORMAT = "minillm-checkpoint-v1"


#: Temp files of an atomic write are ``.<name>.<pid>.<random>.tmp`` in the target's folder.
TEMP_SUFFIX = ".tmp"
#: A temp file without a live writer's pid in its name counts as litter only after this many
#: seconds (a concurrent writer's file stays alive).
STALE_TEMP_SECONDS = 60.0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def clean_stale_temp_files(folder, name: str | None = None, min_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove temp files that an atomic write killed mid-save left in ``folder``: files named
    ``.<name>.<pid>.*.tmp`` (any name when ``name`` is None) whose writer process ``pid`` is no
    longer running; a temp file with no pid in its name is removed once older than ``min_age``
    seconds. Returns the removed paths. Never raises for a file that vanished or cannot be removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for p in folder.glob(f".{name or '*'}.*{TEMP_SUFFIX}"):
        parts = p.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        try:
            if not p.is_file():
                continue
            if (pid is not None and not _pid_alive(pid)) or (pid is None and now - p.stat().st_mtime >= min_age):
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write) -> Path:
    """The one atomic-write routine: ``write(tmp_path)`` fills a temp file in the target's folder,
    which is fsynced and renamed over ``path`` (then the folder is fsynced). The folder is created
    if needed, old temp litter of ``path`` is removed first, and the temp file is removed on
    failure. Raises OSError naming ``path`` (e.g. a full disk) with the original error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and str(path) not in str(e):
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8, "\n" newlines) to ``path`` atomically (``_atomic_write``: temp file
    in the same folder, fsync, ``os.replace``); the folder is created if needed."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return _atomic_write(path, write)


def check_finite_tensors(tensors: dict, source: str, action: str = "loaded") -> None:
    """Raise FloatingPointError when a floating-point array of ``tensors`` (name -> array, host or
    device) holds NaN or ±inf. The message names ``source``, the first bad tensor, how many of
    its values are bad and the first bad index. Integer arrays (quantized codes) are skipped.

    Used before every save (``action="saved"``: the file is left as it was) and on every
    checkpoint read, so a diverged or corrupted model is never silently trained on or kept.
    """
    for name, v in tensors.items():
        a = backend.to_numpy(v) if hasattr(v, "shape") else None
        if a is None or not np.issubdtype(a.dtype, np.floating):
            continue
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(a.size - int(finite.sum()))
            idx = tuple(int(i) for i in np.argwhere(~finite)[0]) if a.ndim else ()
            raise FloatingPointError(
                f"{source}: tensor {name!r} {tuple(a.shape)} has {bad} non-finite value(s) (first at index {idx}: "
                f"{a[idx] if a.ndim else a}); the weights are not {action}"
                + (" (the file on disk, if any, is kept unchanged)" if action == "saved" else ""))


#: The largest |w| a weight may have when saved or loaded. Justification: these models start at
#: N(0, 0.02) weights and LayerNorm 1, AdamW moves a weight by about lr (≤ 1, the CLI's limit) per
#: step, and the largest |w| measured over the 225 checkpoints on the development machine (every
#: chapter's runs) was 2.13 (a LayerNorm gain); 1e4 is over 4000 times that, far below float32's
#: range, and far below what divergence produces (lr 1e3: ~2e10). Override: ``MAX_ABS_WEIGHT_ENV``.
MAX_ABS_WEIGHT = 1e4
#: The environment variable that overrides ``MAX_ABS_WEIGHT`` (a float > 0, e.g. ``1e6``; ``inf`` = off).
MAX_ABS_WEIGHT_ENV = "MINILLM_MAX_ABS_WEIGHT"


def max_abs_weight() -> float:
    """The divergence bound in force: ``$MINILLM_MAX_ABS_WEIGHT`` if set, else ``MAX_ABS_WEIGHT``.
    Raises ValueError naming the variable when it is not a number > 0."""
    raw = os.environ.get(MAX_ABS_WEIGHT_ENV, "").strip()
    if not raw:
        return MAX_ABS_WEIGHT
    try:
        bound = float(raw)
    except ValueError:
        bound = float("nan")
    if not bound > 0:
        raise ValueError(f"{MAX_ABS_WEIGHT_ENV}={raw!r}: expected a number > 0 (e.g. 1e6, or inf to switch the "
                         f"divergence check off)")
    return bound


def check_weight_magnitude(tensors: dict, source: str, action: str = "loaded", max_abs: float | None = None) -> None:
    """Raise FloatingPointError when a floating-point weight of ``tensors`` (name -> array, host or
    device) has max |w| > ``max_abs`` (default ``max_abs_weight()``): the run diverged. The message
    names ``source``, the tensor, its max |w|, the bound and how to raise it. Integer arrays
    (quantized codes), empty arrays and optimizer moments (names starting ``optimizer.``: not
    weights; Adam's second moment is a squared gradient) are skipped; a 4-bit layer's float
    absmax is at most its block's max |w|, so it is held to the same bound. Run after
    ``check_finite_tensors`` (a NaN compares False)."""
    bound = max_abs_weight() if max_abs is None else float(max_abs)
    for name, v in tensors.items():
        if name.startswith("optimizer.") or not hasattr(v, "shape"):
            continue
        a = backend.to_numpy(v)
        if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
            continue
        peak = float(np.abs(a).max())
        if peak > bound:
            raise FloatingPointError(
                f"{source}: tensor {name!r} {tuple(a.shape)} has max |w| = {peak:.3g} > {bound:g}: the run diverged; "
                f"the weights are not {action}" + (" (the file on disk, if any, is kept unchanged)" if action == "saved"
                                                    else "") + f" (set {MAX_ABS_WEIGHT_ENV} to allow larger weights)")


def check_weights(tensors: dict, source: str, action: str = "loaded") -> None:
    """The checks on every tensor saved and every checkpoint, adapter or model file loaded:
    ``check_finite_tensors`` (no NaN/inf), then ``check_weight_magnitude`` (no diverged weight).
    Raises FloatingPointError naming ``source`` and the tensor."""
    check_finite_tensors(tensors, source, action)
    check_weight_magnitude(tensors, source, action)


def check_output_dir(path) -> Path:
    """Make sure ``path`` is (or can be created as) a writable directory, before any training.

    Creates it if missing and removes old temp litter of killed saves in it. Raises
    NotADirectoryError when ``path`` (or a parent) is a file, PermissionError naming the folder
    when files cannot be created in it."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"output directory {path}: {p} exists and is not a directory")
        if p.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"output directory {path} is not writable ({e.strerror or e}); choose another "
                              f"with --out-dir") from None
    clean_stale_temp_files(path)
    return path


def write_json_atomic(path, obj) -> Path:
    """``obj`` as indented JSON (numpy scalars as floats), written with ``write_text_atomic``."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_safetensors_atomic(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> array, copied to the host) and str metadata to ``path`` atomically.

    Raises FloatingPointError (``check_weights``) before writing anything when a tensor holds
    NaN/inf or a weight's max |w| exceeds the divergence bound (``max_abs_weight()``): a diverged
    model never replaces the checkpoint already on disk.
    """
    path = Path(path)
    host = {k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in tensors.items()}
    check_weights(host, str(path), action="saved")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_write(path, lambda tmp: save_file(host, tmp, metadata=meta))


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


# ----------------------------------------------------------------------------------------------
# safetensors files of other programs (float16/bfloat16 included, never a pickle)

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def read_safetensors_any(path) -> tuple[dict[str, np.ndarray], dict]:
    """(name -> host array, metadata) of a safetensors file; float16 / bfloat16 / float64 become
    float32 (bfloat16 = the upper 16 bits of a float32). Raises FileNotFoundError, or ValueError
    naming the file for a pickle (PyTorch ``.bin``), a bad header, an unknown dtype or a tensor
    whose bytes do not match its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = None
        if 0 < n <= min(size - 8, 100_000_000):
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
        if not isinstance(header, dict):
            # only now look for a pickle's magic: a valid header length may itself start with 0x80
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ValueError(f"{path}: a pickle/zip (PyTorch .bin/.pt) file; minillm reads only safetensors "
                                 f"and never unpickles")
            raise ValueError(f"{path}: not a safetensors file (the 8-byte header length {n} and the JSON header "
                             f"after it do not fit a file of {size} bytes)")
        meta = header.pop("__metadata__", None) or {}
        out: dict[str, np.ndarray] = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in header.items():
                try:
                    dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: header entry {name!r} is malformed: {info!r}") from None
                lo, hi = 8 + n + start, 8 + n + end
                count = int(np.prod(shape, dtype=np.int64))
                if dtype == "BF16":
                    width = 2
                elif dtype in _ST_DTYPES:
                    width = np.dtype(_ST_DTYPES[dtype]).itemsize
                else:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which minillm does not read")
                if hi - lo != count * width or hi > size or lo < 8 + n:
                    raise ValueError(f"{path}: tensor {name!r} {dtype}{list(shape)} has {hi - lo} bytes, "
                                     f"expected {count * width}")
                buf = mm[lo:hi]  # a bytes copy
                if dtype == "BF16":  # bfloat16 = the upper half of a float32
                    arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = np.frombuffer(buf, _ST_DTYPES[dtype])
                    arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
                out[name] = arr.reshape(shape)
    return out, meta


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
    it is not a minillm checkpoint or a part is missing, FloatingPointError naming the tensor when
    a weight or optimizer state holds NaN/inf or a weight exceeds the divergence bound
    (``check_weights``)."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a minillm checkpoint (metadata format={meta.get('format')!r})")
    check_weights(tensors, str(path))
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


def load_model(path, config_overrides: dict | None = None, trust_pattern: bool = False):
    """Build a GPT from a checkpoint file, a run directory or a Hugging Face GPT-2 directory:
    returns (model, tokenizer or None, Checkpoint). ``model.name_or_path`` is set to ``path``.

    The tokenizer is None when the source has none (a checkpoint saved without one, or a Hugging
    Face folder with weights but no ``vocab.json``/``merges.txt``/``tokenizer.json``): loading
    succeeds, since exporting or scoring ids needs no tokenizer, and a caller that needs one
    (every trainer) raises an error naming the path. Weights with NaN/inf or beyond the divergence
    bound raise FloatingPointError naming the tensor (``check_weights``).

    Raises ValueError naming the file and every mismatched shape when the weights do not fit the
    stored config, or naming the file and the pattern when the stored tokenizer's pre-split regex
    is not one minillm writes (``pretokenize.check_loaded_pattern``; ``trust_pattern=True``, dangerous:
    a regex from a file can make encoding hang, loads it anyway).
    """
    from minillm.model import GPT, GPTConfig

    if Path(path).is_dir():  # a Hugging Face GPT-2 directory or a run directory
        from minillm.hf import load_any

        model, tok, ck = load_any(path, config_overrides=config_overrides)
        model.name_or_path = str(path)
        return model, tok, ck
    from minillm.hf_tokenizer import tokenizer_from_dict

    ck = load_checkpoint(path)
    cfg = dict(ck.config)
    cfg.update(config_overrides or {})
    model = GPT(GPTConfig.from_dict(cfg))
    state = ck.model_state
    if cfg.get("scalar_head") and not ck.config.get("scalar_head"):
        state = dict(state)
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    model.load_state_dict(state, source=str(path))
    model.name_or_path = str(path)  # as transformers' PreTrainedModel.name_or_path (adapter files record it)
    try:  # a pre-split pattern minillm does not write is refused here (it could make encoding hang)
        tok = tokenizer_from_dict(ck.tokenizer, trust_pattern=trust_pattern) if ck.tokenizer is not None else None
    except ValueError as e:
        raise ValueError(f"{path}: tokenizer: {e}") from None
    return model, tok, ck
