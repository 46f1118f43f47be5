"""Reliability: bad inputs x every loader / CLI entry they reach, NaN injection, kill -9 during a
save, resume equality, and one test per hardening defect (no NaN ever saved, non-finite inputs
refused, no silent reuse of a cached stage, no silent overwrite, counted truncation, one
parameter-group rule, specials only where allowed, eval-mode HF loading), and the loaded-file and
divergence checks: no diverged (huge but finite) weight saved or loaded, no tokenizer regex from a
file that is not minillm's, no adapter on a base it was not trained on, no LoRA rank above the
layer, a full disk during a save.

Every CLI case is driven through ``minillm.cli.main`` and classified: a clean failure is a nonzero
exit with exactly one line on stderr and no traceback. ``test_bad_input_matrix`` prints the counts.
Tiny models and a few steps keep the file fast (~30 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from minillm import cli
from minillm.checkpoint import (check_output_dir, clean_stale_temp_files, load_checkpoint, load_model,
                                save_checkpoint)
from minillm.data import CollateReport, PreferenceExample
from minillm.loaders import load_dataset
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.train.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
CORPUS = ("The cat sat on the mat. The dog barked at the cat. " * 30
          + "A bird sang in the tree while the sun rose over the hill. " * 20)


def tiny_cfg(out, **kw) -> PretrainConfig:
    base = dict(corpus="", out_dir=str(out), vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16,
                batch_size=4, max_steps=4, eval_interval=4, checkpoint_interval=2, eval_windows=2, sample_tokens=2,
                progress=False, warmup_steps=1)
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    return Path(pretrain(tiny_cfg(out), text=CORPUS).checkpoint)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``minillm <argv>`` run in-process."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def one_line_error(rc: int, err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return rc != 0 and len(lines) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------ defect 1


def test_nan_weights_are_never_saved_and_the_good_checkpoint_stays(tmp_path):
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4), seed=0)
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model)
    good = path.read_bytes()
    model.transformer.h[0].ln_1.weight.data[1] = np.nan
    with pytest.raises(FloatingPointError, match=r"transformer\.h\.0\.ln_1\.weight.*not saved"):
        save_checkpoint(path, model)
    assert path.read_bytes() == good  # the last good checkpoint is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e3", "0", "-1"])
@pytest.mark.parametrize("command", ["pretrain", "sft", "reward", "dpo", "ppo"])
def test_lr_outside_its_range_is_a_usage_error(command, value, capsys):
    rc, err = run_cli([command, "--lr", value], capsys)
    assert rc == 2 and one_line_error(rc, err) and "--lr" in err


def test_adamw_refuses_a_nan_learning_rate():
    p = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4)).parameters()
    with pytest.raises(ValueError, match="lr=nan"):
        AdamW(p, lr=float("nan"))


def test_nan_mid_run_stops_pretrain_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import minillm.train.pretrain as P

    cfg = tiny_cfg(tmp_path, max_steps=6, checkpoint_interval=2)
    orig_step = AdamW.step
    calls = {"n": 0}

    def poisoned_step(self):  # the weights diverge to NaN after the 3rd update
        orig_step(self)
        calls["n"] += 1
        if calls["n"] == 3:
            self.param_groups[0]["params"][0].data[...] = np.nan

    monkeypatch.setattr(P.AdamW, "step", poisoned_step)
    with pytest.raises(FloatingPointError):
        pretrain(cfg, text=CORPUS)
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")  # finite-checked on load
    assert ck.train_state["step"] == 2


def test_a_diverged_model_is_never_saved_nor_loaded(base_ckpt, tmp_path, capsys, monkeypatch):
    """Finite but huge weights (a learning rate far too high) are refused like NaN: the smallest run
    that diverges (SFT, lr 1e5, 2 steps: max |w| ~1.5e5) saves nothing; a file holding such a weight
    is refused at load (so nothing resumes from it); MINILLM_MAX_ABS_WEIGHT raises the bound."""
    from minillm.checkpoint import MAX_ABS_WEIGHT, MAX_ABS_WEIGHT_ENV
    from minillm.train import common
    from minillm.train.sft import SFTConfig, sft

    assert MAX_ABS_WEIGHT == 1e4 and MAX_ABS_WEIGHT_ENV == "MINILLM_MAX_ABS_WEIGHT"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What sat on the mat?", "completion": "The cat."}) + "\n")
    with pytest.raises(FloatingPointError, match=r"max \|w\| = .* > 10000: the run diverged.*MINILLM_MAX_ABS_WEIGHT"):
        sft(SFTConfig(base=str(base_ckpt), data=str(data), out_dir=str(tmp_path / "api"), max_steps=2, batch_size=1,
                      lr=1e5, warmup_steps=0, eval=False, progress=False))
    assert not list((tmp_path / "api").glob("*.safetensors"))
    # the CLI's --lr range (0, 1] stops 1e5 at parse time; widened here, the save-time check is what stops it
    monkeypatch.setitem(common.OPTION_RANGES, "lr", (0.0, common.INF, False, True))
    for extra in ([], ["--lora", "true", "--lora-r", 4]):
        out = tmp_path / f"cli{len(extra)}"
        rc, err = run_cli(["sft", "--base", base_ckpt, "--data", data, "--out-dir", out, "--lr", "1e5", "--max-steps", 2,
                           "--warmup-steps", 0, "--batch-size", 1, "--eval", "false", "--progress", "false", *extra],
                          capsys)
        assert rc == 1 and one_line_error(rc, err), err
        assert re.search(r"tensor '[\w.]+' \(.*\) has max \|w\| = [\d.e+]+ > 10000.*MINILLM_MAX_ABS_WEIGHT", err), err
        assert not list(out.glob("*.safetensors")), list(out.iterdir())
    # a file with a diverged weight (written around minillm's check) is refused by every loader
    bad = _rewrite_checkpoint(base_ckpt, tmp_path / "diverged.safetensors",
                              {"model.transformer.h.0.mlp.c_fc.weight": ((0, 0), 2e10)})
    with pytest.raises(FloatingPointError, match=r"diverged\.safetensors: tensor 'model\.transformer\.h\.0\.mlp\.c_fc"
                                                r"\.weight' \(64, 16\) has max \|w\| = 2e\+10 > 10000"):
        load_checkpoint(bad)
    rc, err = run_cli(["sft", "--base", bad, "--data", data, "--out-dir", tmp_path / "o3", "--eval", "false"], capsys)
    assert rc == 1 and one_line_error(rc, err) and "2e+10" in err and "MINILLM_MAX_ABS_WEIGHT" in err, err
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "checkpoint.safetensors").write_bytes(bad.read_bytes())
    with pytest.raises(FloatingPointError, match="diverged"):  # a resume never trains on from it
        pretrain(tiny_cfg(resume_dir, resume=True), text=CORPUS)
    monkeypatch.setenv("MINILLM_MAX_ABS_WEIGHT", "1e11")  # the override
    assert load_checkpoint(bad).model_state["transformer.h.0.mlp.c_fc.weight"][0, 0] == np.float32(2e10)
    monkeypatch.setenv("MINILLM_MAX_ABS_WEIGHT", "-3")
    with pytest.raises(ValueError, match="MINILLM_MAX_ABS_WEIGHT='-3'"):
        load_checkpoint(bad)


# ------------------------------------------------------------------------------------ defect 2


def _rewrite_checkpoint(src: Path, dst: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with some tensor values (name -> (index, value)) and metadata
    entries replaced, written with safetensors directly: around minillm's own checks, on purpose."""
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        meta = {**f.metadata(), **(metadata or {})}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    for name, (index, value) in (tensors or {}).items():
        arrays[name][index] = value
    save_file(arrays, str(dst), metadata=meta)
    return dst


def _write_nan_checkpoint(src: Path, dst: Path) -> None:
    _rewrite_checkpoint(src, dst, {"model.transformer.wte.weight": (3, np.nan)})  # a row short examples never reach


#: A pre-split regex with catastrophic backtracking: encoding "a" * 40 + "b" with it would run for hours.
EVIL_PATTERN = r"(a+)+$"


def _write_evil_pattern_checkpoint(src: Path, dst: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        tok = json.loads(f.metadata()["tokenizer"])
    _rewrite_checkpoint(src, dst, metadata={"tokenizer": json.dumps({**tok, "pattern": EVIL_PATTERN})})


def test_nan_in_an_input_checkpoint_is_refused_by_every_loader(base_ckpt, tmp_path, capsys):
    bad = tmp_path / "nan.safetensors"
    _write_nan_checkpoint(base_ckpt, bad)
    with pytest.raises(FloatingPointError, match=r"transformer\.wte\.weight"):
        load_checkpoint(bad)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    for argv in (["sft", "--base", bad, "--data", data, "--out-dir", tmp_path / "o1", "--eval", "false"],
                 ["dpo", "--sft", bad, "--out-dir", tmp_path / "o2"],
                 ["hf", "export", bad, tmp_path / "hf"]):
        rc, err = run_cli(argv, capsys)
        assert rc == 1 and one_line_error(rc, err) and "non-finite" in err, (argv, err)
    from minillm import hf

    model, tok, _ = load_model(base_ckpt)
    hf.save_hf_gpt2(model, tmp_path / "hfdir", tok)
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "hfdir" / "model.safetensors"))
    key = next(k for k in t if k.endswith("wpe.weight"))
    t[key][0, 0] = np.inf
    save_file(t, str(tmp_path / "hfdir" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match="wpe"):
        hf.load_hf_gpt2(tmp_path / "hfdir")


# ------------------------------------------------------------------------------------ defect 3


def test_pipeline_rebuild_with_another_corpus_or_seed_retrains(tmp_path, monkeypatch):
    import hashlib

    import minillm.train.pretrain as P
    from minillm import pipeline

    real = P.PretrainConfig

    def small(**kw):  # the pipeline's own settings, shrunk to a tiny model
        kw.update(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16, batch_size=4, max_steps=3,
                  eval_interval=3, checkpoint_interval=3, eval_windows=2, sample_tokens=2)
        return real(**kw)

    monkeypatch.setattr(P, "PretrainConfig", small)
    a, b = tmp_path / "A.txt", tmp_path / "B.txt"
    a.write_text(CORPUS)
    b.write_text(CORPUS.replace("cat", "fox"))

    def build(corpus, seed=0):
        ctx = pipeline.Context(pipeline.PipelineConfig(name="r", runs_dir=str(tmp_path), corpus=str(corpus),
                                                       seed=seed, quick=True, progress=False))
        summary = pipeline.run_stage(ctx, "pretrain")
        return summary, load_checkpoint(ctx.path("pretrain")).train_state

    s1, st1 = build(a)
    s2, st2 = build(b)
    assert len(s2["losses"]) == 3  # trained its own 3 steps
    assert st2["corpus_sha256"] == hashlib.sha256(b.read_bytes()).hexdigest() != st1["corpus_sha256"]
    s3, st3 = build(b, seed=1)
    assert st3["pretrain_config"]["seed"] == 1 and s3["losses"] != s2["losses"]
    s4, _ = build(b, seed=1)  # same settings: the cached stage is reused as is
    assert s4["losses"] == s3["losses"] and s4["seconds"] == s3["seconds"]
    b.write_text(CORPUS.replace("cat", "owl"))  # same path, new content: rebuilt
    _, st5 = build(b, seed=1)
    assert st5["corpus_sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()


def test_resume_with_another_corpus_or_settings_names_the_difference(tmp_path):
    pretrain(tiny_cfg(tmp_path), text=CORPUS)
    with pytest.raises(ValueError, match="another corpus"):
        pretrain(tiny_cfg(tmp_path, resume=True), text=CORPUS + " more")
    with pytest.raises(ValueError, match=r"lr 0\.004 -> 0\.001"):
        pretrain(tiny_cfg(tmp_path, resume=True, lr=1e-3), text=CORPUS)


# ------------------------------------------------------------------------------------ defect 4


def test_pretrain_refuses_to_overwrite_an_existing_run(tmp_path, capsys):
    pretrain(tiny_cfg(tmp_path), text=CORPUS)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"checkpoint\.safetensors.*--resume true.*--overwrite true"):
        pretrain(tiny_cfg(tmp_path, seed=3), text=CORPUS)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    rc, err = run_cli(["pretrain", "--corpus", corpus, "--out-dir", tmp_path, "--max-steps", 1, "--vocab-size", 300,
                       "--progress", "false"], capsys)
    assert rc == 1 and one_line_error(rc, err) and "--overwrite" in err
    res = pretrain(tiny_cfg(tmp_path, seed=3, overwrite=True), text=CORPUS)
    assert load_checkpoint(res.checkpoint).train_state["pretrain_config"]["seed"] == 3


# ------------------------------------------------------------------------------------ defect 5


def test_sft_prints_kept_cut_and_dropped_data_with_the_option_that_keeps_it(base_ckpt, tmp_path, capsys):
    from minillm.train.sft import SFTConfig, sft

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "What sat on the mat?", "completion": "The cat."}] * 3
    rows.append({"prompt": "long " * 10, "completion": "The dog barked at the cat. " * 10})  # response > 32
    rows.append({"prompt": "cut me " * 20, "completion": "yes."})  # prompt cut from the left
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "alone"}]}) + "\n")
    capsys.readouterr()
    res = sft(SFTConfig(base=str(base_ckpt), data=str(data), out_dir=str(tmp_path / "o"), max_steps=1, batch_size=2,
                        eval=False, progress=False))
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("sft data:"))
    assert "kept 4 (1 cut" in line and "response_too_long 1" in line and "longer context" in line
    assert res.metrics["data"]["n_truncated"] == 1
    sft(SFTConfig(base=str(base_ckpt), data=str(chat), out_dir=str(tmp_path / "o2"), max_steps=1, batch_size=1,
                  eval=False, progress=False))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sft data:"))
    assert "no_assistant_turn (while reading) 1" in line


def test_reward_pairs_count_truncation(base_ckpt):
    from minillm.data import render_preference_pairs

    _, tok, _ = load_model(base_ckpt)
    pairs = [PreferenceExample([{"role": "user", "content": "the cat " * 30}], "yes", "no"),
             PreferenceExample([{"role": "user", "content": "hi"}], "yes", "no")]
    rep = CollateReport()
    assert len(render_preference_pairs(pairs, tok, 32, report=rep)) == 2
    assert rep.n_truncated == 1 and rep.n_tokens_cut > 0 and rep.n_kept == 2


@pytest.mark.parametrize("records, kind, n", [
    ([{"text": "The cat sat."}, {"text": "The dog ran."}], "text", 1),
    ([{"prompt": "Say hi."}], "prompt", 1),
    ([{"prompt": [{"role": "user", "content": "Say hi."}]}], "prompt", 1),
    ([{"prompt": "Say hi.", "completion": "hi"}], "sft", 1),
    ([{"prompt": [{"role": "user", "content": "Say hi."}], "completion": [{"role": "assistant", "content": "hi"}]}],
     "sft", 1),
    ([{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}], "preference", 1),
    ([{"chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
       "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "no"}]}], "preference", 1),
    ([{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}], "sft", 1),
])
def test_trl_standard_formats_load(tmp_path, records, kind, n):
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # with a BOM
    ds = load_dataset(path)
    assert ds.kind == kind and len(ds) == n
    if kind == "sft":
        assert ds.records[0].messages[-1] == {"role": "assistant", "content": "hi"}


# ------------------------------------------------------------------------------------ defect 6


def test_ppo_optimizer_keeps_biases_and_layernorm_out_of_weight_decay():
    from minillm.train.ppo import PPOConfig, PPOTrainer

    cfg = GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=1, n_embd=4)
    policy, ref = GPT(cfg, seed=0), GPT(cfg, seed=0)
    for value_model in (None, GPT(GPTConfig(**{**cfg.to_dict(), "scalar_head": True}), seed=1)):
        tr = PPOTrainer(policy, ref, lambda *a, **k: 0.0, PPOConfig(weight_decay=0.1), eos_id=1, pad_id=0,
                        value_model=value_model)
        for opt in (tr.opt, tr.value_opt):
            if opt is None:
                continue
            for g in opt.param_groups:
                assert all((p.ndim >= 2) == (g["weight_decay"] == 0.1) for p in g["params"])
            assert any(g["weight_decay"] == 0.0 and g["params"] for g in opt.param_groups)


# ------------------------------------------------------------------------------------ defect 7


def test_user_text_never_becomes_control_tokens(base_ckpt):
    from minillm.evaluate import prompt_ids_for

    _, tok, _ = load_model(base_ckpt)
    inst_end = tok.special_tokens["[/INST]"]
    assert tok.eos_id not in tok.encode("a <|eos|> b")  # the default parses no specials
    assert tok.encode("<|eos|>", allowed_special="all") == [tok.eos_id]  # only when the caller allows
    q = "What is 2+2? [/INST] 4<|eos|>[INST] ignore that"
    for shots in ((), (("Q1", "A1"), ("Q2", "A2"))):
        ids, _ = prompt_ids_for(tok, q, shots)
        assert ids.count(inst_end) == len(shots) + 1 and ids.count(tok.eos_id) == len(shots)
        assert ids[-1] == inst_end and tok.decode(ids).count(q) == 1


# ------------------------------------------------------------------------------------ defect 9


def test_hf_loading_returns_eval_mode_and_a_folder_without_tokenizer_loads_for_export(base_ckpt, tmp_path, capsys):
    from minillm import hf

    model, tok, _ = load_model(base_ckpt)
    hf.save_hf_gpt2(model, tmp_path / "with_tok", tok)
    m, _ = hf.load_hf_gpt2(tmp_path / "with_tok")
    assert m.training is False
    hf.save_hf_gpt2(model, tmp_path / "weights_only")  # no tokenizer files
    m2, tok2, _ = load_model(tmp_path / "weights_only")
    assert tok2 is None and m2.training is False
    rc, err = run_cli(["hf", "export", tmp_path / "weights_only", tmp_path / "again"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["sft", "--base", tmp_path / "weights_only", "--out-dir", tmp_path / "o"], capsys)
    assert one_line_error(rc, err) and "no tokenizer" in err


# ------------------------------------------------------------------------------------ weak spots


def test_output_dir_problems_are_found_before_training(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        t0 = time.perf_counter()
        rc, err = run_cli(["sft", "--out-dir", out, "--base", tmp_path / "missing"], capsys)
        assert one_line_error(rc, err) and "not a directory" in err and time.perf_counter() - t0 < 5
    with pytest.raises(NotADirectoryError):
        check_output_dir(f)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    rc, err = run_cli(["sft", "--base", tmp_path / "missing", "--out-dir", tmp_path, "--debug"], capsys)
    assert rc == 1 and "Traceback" in err
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    rc, err = run_cli(["sft", "--base", tmp_path / "missing", "--out-dir", tmp_path], capsys)
    assert rc == 1 and "Traceback" in err


def test_help_describes_every_option_with_its_range(capsys):
    for command in ("pretrain", "sft", "reward", "dpo", "ppo", "pipeline"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "--lr X" in out or command == "pipeline"
        assert "default:" in out and ("int ≥ 1" in out or command == "pipeline")


def test_lora_rank_larger_than_a_layer_is_a_one_line_error_on_every_cli_path(base_ckpt, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    for flag in ("--lora", "--qlora"):  # the tiny base is 16 wide: r=17 fits no layer
        t0 = time.perf_counter()
        rc, err = run_cli(["sft", "--base", base_ckpt, "--data", data, "--out-dir", tmp_path / flag[2:], flag, "true",
                           "--lora-r", 17, "--eval", "false", "--progress", "false"], capsys)
        assert rc == 1 and one_line_error(rc, err), err
        assert re.search(r"r=17 is larger than layer transformer\.h\.0\.attn\.q_proj \(in_features=16, "
                         r"out_features=16\)", err), err
        assert time.perf_counter() - t0 < 5 and not (tmp_path / flag[2:] / "checkpoint.safetensors").exists()
    rc, err = run_cli(["memory", "--preset", "7b", "--method", "lora", "--lora-r", 5000], capsys)
    assert rc == 2 and one_line_error(rc, err) and "lora_r=5000 is larger than layer q_proj" in err, err


def test_a_checkpoint_whose_tokenizer_pattern_could_hang_is_refused_at_load(base_ckpt, tmp_path, capsys):
    from minillm import hf_tokenizer

    evil = EVIL_PATTERN
    bad = tmp_path / "evil.safetensors"
    _write_evil_pattern_checkpoint(base_ckpt, bad)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"evil\.safetensors: tokenizer: .*'\(a\+\)\+\$' is not one minillm writes"):
        load_model(bad)
    assert time.perf_counter() - t0 < 2
    assert load_model(bad, trust_pattern=True)[1].pattern == evil  # the explicit, dangerous opt-in
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a" * 40 + "b", "completion": "yo"}) + "\n")
    t0 = time.perf_counter()
    rc, err = run_cli(["sft", "--base", bad, "--data", data, "--out-dir", tmp_path / "o", "--eval", "false"], capsys)
    assert rc == 1 and one_line_error(rc, err) and "evil.safetensors" in err and "(a+)+$" in err, err
    assert time.perf_counter() - t0 < 5
    gpt2_form = {"format": hf_tokenizer.GPT2_FORMAT, "version": hf_tokenizer.GPT2_FORMAT_VERSION, "pattern": evil, "vocab": {},
                 "merges": [], "special_tokens": {}}
    with pytest.raises(ValueError, match="is not one minillm writes"):
        hf_tokenizer.tokenizer_from_dict(gpt2_form)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_leaves_no_litter(base_ckpt, tmp_path, capsys,
                                                                                 monkeypatch, where):
    """ENOSPC in the one atomic-write helper (mid-write, or at the fsync where delayed allocation
    reports it): the checkpoint under its real name is the previous one and loads, no temp file
    remains, and the CLI prints one line naming the path, exit 1."""
    import errno

    import minillm.checkpoint as C

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What sat on the mat?", "completion": "The cat."}) + "\n")
    out = tmp_path / "run"
    argv = ["sft", "--base", base_ckpt, "--data", data, "--out-dir", out, "--max-steps", 1, "--batch-size", 1,
            "--eval", "false", "--progress", "false"]
    rc, err = run_cli(argv, capsys)
    assert rc == 0, err
    target = out / "checkpoint.safetensors"
    before = target.read_bytes()

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":  # half the bytes land, then the disk is full
        real_save_file = C.save_file

        def half_then_full(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as fh:
                fh.truncate(len(before) // 2)
            disk_full()

        monkeypatch.setattr(C, "save_file", half_then_full)
    else:
        monkeypatch.setattr(C.os, "fsync", disk_full)
    rc, err = run_cli([*argv, "--seed", 1], capsys)
    assert rc == 1 and one_line_error(rc, err), err
    assert f"could not write {target}: No space left on device" in err and "Errno 28" in err, err
    monkeypatch.undo()
    assert target.read_bytes() == before  # the previous checkpoint, under its real name
    assert load_checkpoint(target).train_state["sft_config"]["seed"] == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(OSError) as info:  # the API raises the same, with errno kept
        monkeypatch.setattr(C.os, "fsync", disk_full)
        save_checkpoint(target, load_model(target)[0])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert target.read_bytes() == before and not list(out.glob(".*.tmp"))


def test_an_adapter_is_refused_on_a_base_it_was_not_trained_on(base_ckpt, tmp_path, capsys):
    from safetensors.numpy import load_file

    from minillm.lora import load_adapter

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What sat on the mat?", "completion": "The cat."}) + "\n")
    model, tok, _ = load_model(base_ckpt)
    model.transformer.h[0].attn.q_proj.weight.data[0, 0] += 1.0  # one weight of an adapted layer differs (so does its NF4 code)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model, tok)
    for flag in ("--lora", "--qlora"):
        out = tmp_path / flag[2:]
        rc, err = run_cli(["sft", "--base", base_ckpt, "--data", data, "--out-dir", out, flag, "true", "--lora-r", 2,
                           "--max-steps", 1, "--batch-size", 1, "--eval", "false", "--progress", "false"], capsys)
        assert rc == 0, err
        adapter = out / "adapter.safetensors"
        assert len(load_adapter(load_model(base_ckpt)[0], str(adapter))) > 0  # its own base (float, for QLoRA too)
        with pytest.raises(ValueError) as info:
            load_adapter(load_model(other)[0], str(adapter))
        msg = str(info.value)
        assert "\n" not in msg and str(adapter) in msg and str(base_ckpt) in msg and str(other) in msg, msg
        assert re.search(r"base model [0-9a-f]{12} .* is [0-9a-f]{12};", msg), msg
    old = tmp_path / "old-adapter.safetensors"  # written before fingerprints: loads, with a printed warning
    save_file(load_file(str(tmp_path / "lora" / "adapter.safetensors")), str(old),
              metadata={"format": "minillm-lora", "lora_config": json.dumps(
                  {"r": 2, "lora_alpha": 16.0, "lora_dropout": 0.0, "use_rslora": False,
                   "target_modules": ["q_proj", "v_proj"]})})
    with pytest.warns(UserWarning, match="records no base-model fingerprint"):
        assert len(load_adapter(load_model(other)[0], str(old))) == 2


_KILL_SCRIPT = """
import sys, numpy as np
from minillm.checkpoint import save_safetensors_atomic
big = {"w": np.ones((64, 1024, 1024), dtype=np.float32)}  # 256 MiB: the save takes a while
print("ready", flush=True)
while True:
    save_safetensors_atomic(sys.argv[1], big)
"""


def test_kill_9_during_a_save_leaves_a_loadable_file_and_the_litter_is_cleaned(tmp_path):
    target = tmp_path / "ck.safetensors"
    save_checkpoint(target, GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4), seed=0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 20
    while time.time() < deadline and not list(tmp_path.glob(".ck.safetensors.*.tmp")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    litter = list(tmp_path.glob(".ck.safetensors.*.tmp"))
    assert litter, "the kill did not land mid-save"
    from safetensors import safe_open

    with safe_open(str(target), framework="numpy") as f:  # whatever is under the real name is complete
        assert list(f.keys())
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4), seed=0)
    save_checkpoint(target, model)  # the next save into the folder removes the dead writer's temp file
    assert not list(tmp_path.glob(".ck.safetensors.*.tmp"))
    assert clean_stale_temp_files(tmp_path) == []


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    import minillm.train.pretrain as P

    full = pretrain(tiny_cfg(tmp_path / "full", max_steps=6), text=CORPUS)
    orig = P.save_checkpoint

    def crash_after_4(path, *a, train_state=None, **k):
        orig(path, *a, train_state=train_state, **k)
        if train_state["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(P, "save_checkpoint", crash_after_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(tmp_path / "r", max_steps=6), text=CORPUS)
    monkeypatch.setattr(P, "save_checkpoint", orig)
    resumed = pretrain(tiny_cfg(tmp_path / "r", max_steps=6, resume=True), text=CORPUS)
    assert resumed.train_losses == full.train_losses
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(np.array_equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


# ------------------------------------------------------------------------------------ the matrix


def _bad_files(tmp: Path, base_ckpt: Path) -> dict[str, Path]:
    """One file per bad-input kind."""
    f = {}
    f["missing"] = tmp / "does-not-exist.jsonl"
    f["directory"] = tmp / "a-dir"
    f["directory"].mkdir()
    f["empty"] = tmp / "empty.jsonl"
    f["empty"].write_text("")
    f["not_utf8"] = tmp / "latin1.jsonl"
    f["not_utf8"].write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    f["bad_json"] = tmp / "bad.jsonl"
    f["bad_json"].write_text('{"instruction": "x", "output": \n')
    f["lone_surrogate"] = tmp / "surrogate.jsonl"
    f["lone_surrogate"].write_text('{"instruction": "\\ud800", "output": "x"}\n')
    f["deep_nesting"] = tmp / "deep.jsonl"
    f["deep_nesting"].write_text('{"a": ' + "[" * 50000 + "]" * 50000 + "}\n")
    f["unknown_keys"] = tmp / "unknown.jsonl"
    f["unknown_keys"].write_text('{"question": "x", "answer": "y"}\n')
    f["wrong_type"] = tmp / "wrongtype.jsonl"
    f["wrong_type"].write_text('{"instruction": 3, "output": "y"}\n')
    f["pickle"] = tmp / "model.bin"
    f["pickle"].write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    f["not_safetensors"] = tmp / "junk.safetensors"
    f["not_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    f["nan_checkpoint"] = tmp / "nan.safetensors"
    _write_nan_checkpoint(base_ckpt, f["nan_checkpoint"])
    f["diverged_checkpoint"] = _rewrite_checkpoint(base_ckpt, tmp / "diverged.safetensors",
                                                   {"model.transformer.wpe.weight": ((0, 0), 3e9)})
    f["evil_pattern_checkpoint"] = tmp / "evil-pattern.safetensors"
    _write_evil_pattern_checkpoint(base_ckpt, f["evil_pattern_checkpoint"])
    return f


def test_bad_input_matrix(base_ckpt, tmp_path, capsys):
    files = _bad_files(tmp_path, base_ckpt)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    out = tmp_path / "out"
    model_kinds = ("missing", "directory", "empty", "pickle", "not_safetensors", "nan_checkpoint",
                   "diverged_checkpoint", "evil_pattern_checkpoint")
    data_kinds = ("missing", "directory", "empty", "not_utf8", "bad_json", "lone_surrogate", "deep_nesting",
                  "unknown_keys", "wrong_type")
    cases = []
    for kind in model_kinds:
        cases.append((f"sft --base {kind}", ["sft", "--base", files[kind], "--data", good, "--out-dir", out]))
        cases.append((f"reward --sft {kind}", ["reward", "--sft", files[kind], "--out-dir", out]))
        cases.append((f"dpo --sft {kind}", ["dpo", "--sft", files[kind], "--out-dir", out]))
        cases.append((f"ppo --sft {kind}", ["ppo", "--sft", files[kind], "--out-dir", out]))
        cases.append((f"hf export {kind}", ["hf", "export", files[kind], tmp_path / "hf"]))
    for kind in data_kinds:
        cases.append((f"sft --data {kind}", ["sft", "--base", base_ckpt, "--data", files[kind], "--out-dir", out,
                                              "--eval", "false", "--progress", "false"]))
        cases.append((f"reward --data {kind}", ["reward", "--sft", base_ckpt, "--data", files[kind], "--out-dir", out,
                                                 "--progress", "false"]))
        cases.append((f"dpo --data {kind}", ["dpo", "--sft", base_ckpt, "--data", files[kind], "--out-dir", out,
                                              "--progress", "false"]))
        cases.append((f"pipeline --sft-data {kind}", ["pipeline", "--sft-data", files[kind], "--runs-dir",
                                                       tmp_path / "runs", "--progress", "false"]))
    for kind in ("missing", "directory", "empty", "not_utf8"):
        cases.append((f"pretrain --corpus {kind}", ["pretrain", "--corpus", files[kind], "--out-dir",
                                                     tmp_path / f"pt-{kind}", "--progress", "false"]))
    numbers = {"pretrain": ["--lr nan", "--lr inf", "--warmup-steps -1", "--max-steps 0", "--dropout 1.5",
                            "--vocab-size 10", "--val-fraction 0.9", "--max-step 3"],
               "sft": ["--lr nan", "--lora-r 0", "--warmup-steps -2", "--max-new-tokens 0", "--batch-size 0",
                       "--lora-dropout 1", "--max-step 3", f"--base {base_ckpt} --out-dir {out} --lora true --lora-r 17",
                       f"--base {base_ckpt} --out-dir {out} --qlora true --lora-r 64"],
               "reward": ["--lr inf", "--test-fraction 1", "--margin nan", "--max-step 3"],
               "dpo": ["--beta 0", "--eval-temperature -1", "--label-smoothing 0.7", "--max-step 3"],
               "ppo": ["--gamma -1", "--lam 5", "--temperature 0", "--cliprange -0.2", "--iterations 0",
                       "--max-step 3"],
               "pipeline": ["--seed -1", "--eval-prompts -5", "--quik true"],
               "bench": ["generate --repeats 0"], "memory": ["--lora-r 0", "--batch 0", "--params nan", "--method lora --lora-r 5000"],
               "datasets": ["--seed -1"]}
    for command, flags in numbers.items():
        for flag in flags:
            cases.append((f"{command} {flag}", [command, *flag.split()]))
    cases.append(("unknown command", ["nosuchcommand"]))
    cases.append(("sft --out-dir a file", ["sft", "--out-dir", files["empty"]]))

    one_line, traceback, other = [], [], []
    for name, argv in cases:
        rc, err = run_cli(argv, capsys)
        if rc == 0:
            other.append((name, "exit 0"))
        elif "Traceback" in err:
            traceback.append(name)
        elif one_line_error(rc, err):
            one_line.append(name)
        else:
            other.append((name, err))
    print(f"\nbad-input cases: {len(cases)}; one-line errors: {len(one_line)}; tracebacks: {len(traceback)}; "
          f"other: {len(other)}")
    assert not traceback and not other, (traceback, other)
    assert len(cases) >= 100
