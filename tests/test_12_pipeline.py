"""Chapter 12: the whole spectrum end to end (``minillm pipeline --quick``), the report, reuse of
finished stages and resuming after a crash."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from minillm import pipeline as P
from minillm import pipeline_stages as PS
from minillm import report as R
from minillm.report import COLUMNS, format_table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = P.PipelineConfig(name="smoke", runs_dir=str(runs), quick=True, progress=False)
    report = P.run_pipeline(cfg)
    return cfg, report


def test_quick_pipeline_runs_every_stage_and_writes_the_report(quick_run):
    cfg, report = quick_run
    run_dir = report.parent
    for stage in P.DEFAULT_STAGES:
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        assert "skipped" not in summary, f"{stage} was skipped: {summary.get('skipped')}"
    for stage in P.OPT_IN_STAGES:  # only when named in --stages
        assert not (run_dir / stage / "summary.json").exists(), stage
    for stage in ("pretrain", "sft", "sft_lora", "sft_qlora", "sft_noisy", "reward", "ppo", "ppo_beta0", "ppo_gold",
                  "dpo", "grpo"):
        assert (run_dir / stage / "checkpoint.safetensors").exists(), stage
    text = report.read_text()
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    assert header in text
    for label in ("base model, zero-shot", "SFT (full)", "SFT (LoRA", "SFT (QLoRA", "reward model", "best-of-8",
                  "PPO (β = 0.1)", "PPO (β = 0)", "gold judge as reward", "DPO",
                  "GRPO (dapo, β = 0, G = 8), addition task", "PPO (β = 0.1), clean RM, from noisy SFT",
                  "DPO (β = 0.1), clean pairs, from noisy SFT", "## PPO vs DPO from the same start",
                  "## Output diversity", "## Over-optimization", "best-of-n, clean RM", "PPO β=0.1, clean RM"):
        assert label in text, label
    for png in ("losses.png", "ppo.png", "dpo.png", "overoptimization.png"):
        assert (run_dir / png).stat().st_size > 10_000, png


def test_finished_stages_are_reused_and_a_crash_resumes(quick_run, monkeypatch):
    cfg, report = quick_run
    run_dir = report.parent
    before = {s: (run_dir / s / "summary.json").stat().st_mtime_ns for s in P.DEFAULT_STAGES}
    ckpt = run_dir / "sft" / "checkpoint.safetensors"
    ckpt_bytes = ckpt.read_bytes()
    # a crash in the middle of the DPO stage: earlier stages and checkpoints stay as they were
    (run_dir / "dpo" / "summary.json").unlink()

    def crash(ctx):
        raise RuntimeError("simulated crash mid-stage")

    monkeypatch.setitem(P.STAGE_FUNCTIONS, "dpo", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.run_pipeline(replace(cfg, jobs=1))  # in this process, where the patch is
    assert not (run_dir / "dpo" / "summary.json").exists()
    assert ckpt.read_bytes() == ckpt_bytes
    monkeypatch.undo()
    # the rerun runs only the unfinished stage
    P.run_pipeline(cfg)
    after = {s: (run_dir / s / "summary.json").stat().st_mtime_ns for s in P.DEFAULT_STAGES}
    assert {s for s in P.DEFAULT_STAGES if after[s] != before[s]} == {"dpo"}


def test_table_formatting_and_unknown_stage():
    rows = [{"method": "x", "trainable": 1234, "exact_match": 0.5, "gold": -0.25, "kl": 3.14159}]
    t = format_table(rows)
    assert "| x | 1,234 | — | 50.0 % | — | -0.250 | — | 3.14 | — | — |" in t
    with pytest.raises(ValueError, match="unknown stages"):
        P.run_pipeline(P.PipelineConfig(stages="sft,telepathy", runs_dir="/nonexistent-dir-never-created"))


def test_quick_pipeline_on_real_samples(tmp_path):
    """--corpus / --sft-data / --pref-data switch the stages to user files in real formats (tinyshakespeare,
    Alpaca-field instructions, HH-RLHF transcripts); stages that need the built-in world's gold judge say they skip."""
    from pathlib import Path

    real = Path(__file__).resolve().parents[1] / "datasets" / "real"
    cfg = P.PipelineConfig(name="real", runs_dir=str(tmp_path), quick=True, progress=False,
                           corpus=str(real / "tinyshakespeare" / "input.txt"),
                           sft_data=str(real / "rasbt-instruction-data" / "instruction-data.json"),
                           pref_data=str(real / "hh-rlhf-harmless-base" / "harmless-base-test.sample.jsonl"))
    report = P.run_pipeline(cfg)
    ran = {s for s in P.DEFAULT_STAGES if "skipped" not in json.loads((report.parent / s / "summary.json").read_text())}
    assert ran == {"pretrain", "sft", "sft_lora", "sft_qlora", "reward", "ppo", "ppo_beta0", "dpo"}
    rm = json.loads((report.parent / "reward" / "summary.json").read_text())["metrics"]
    assert rm["test"]["n"] > 0 and 0.0 <= rm["test"]["accuracy"] <= 1.0
    assert "reward model (Bradley-Terry)" in report.read_text()


def test_a_cached_stage_made_with_other_settings_is_rebuilt(quick_run):
    """A summary whose fingerprint (recipe version, quick, seed, data) differs is not reused."""
    cfg, report = quick_run
    path = report.parent / "prompting" / "summary.json"
    summary = json.loads(path.read_text())
    assert summary["fingerprint"]["quick"] is True
    summary["fingerprint"]["recipe_version"] = -1
    path.write_text(json.dumps(summary))
    before = path.stat().st_mtime_ns
    ctx = P.Context(cfg)
    P.run_stage(ctx, "prompting")
    assert path.stat().st_mtime_ns != before
    assert json.loads(path.read_text())["fingerprint"] == P.stage_fingerprint(ctx)


def test_the_stage_table_lists_every_stage_in_order():
    """The pipeline's explicit stage table (no look-up by name) runs exactly STAGES, in that order."""
    assert tuple(P.STAGE_FUNCTIONS) == P.STAGES
    assert all(fn.__name__ == f"stage_{name}" for name, fn in P.STAGE_FUNCTIONS.items())


def test_the_needs_table_names_earlier_stages_and_ensure_builds_only_those():
    assert tuple(P.NEEDS) == P.STAGES
    for stage, needs in {**P.NEEDS, **P.AFTER}.items():
        assert all(P.STAGES.index(n) < P.STAGES.index(stage) for n in needs), stage
    assert P.needed("reward") == ["pretrain", "sft", "reward"]
    assert P.needed("align_clean") == ["pretrain", "sft", "sft_noisy", "reward_clean", "align_clean"]
    assert P.needed("grpo") == ["grpo"]  # AFTER orders the side-by-side run only
    # side by side, only a stage the graph makes run alone keeps the thread policy; the rest get one thread
    assert P.solo_stages(list(P.DEFAULT_STAGES)) == {"pretrain"}
    assert P.solo_stages(["pretrain", "sft", "reward"]) == {"pretrain", "sft", "reward"}  # a chain
    assert P.solo_stages(["pretrain", "sft", "sft_lora", "reward"]) == {"pretrain"}


def test_a_stage_may_read_only_the_stages_it_needs(tmp_path):
    ctx = P.Context(P.PipelineConfig(name="x", runs_dir=str(tmp_path)))
    assert ctx.path("reward").name == "checkpoint.safetensors"  # outside a stage: anything
    ctx.stage = "reward"
    assert ctx.path("sft") == ctx.dir / "sft" / "checkpoint.safetensors"
    assert ctx.path("reward", "metrics.json") == ctx.dir / "reward" / "metrics.json"
    with pytest.raises(RuntimeError, match=r"stage reward reads stage sft_noisy, which pipeline.NEEDS\['reward'\]"):
        ctx.path("sft_noisy")


def _results(run_dir, stage):
    """A stage's summary without what differs between two identical runs: times, threads, the run folder."""
    def scrub(x):
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items() if k not in ("seconds", "train_seconds", "threads")}
        return [scrub(v) for v in x] if isinstance(x, list) else x

    text = (run_dir / stage / "summary.json").read_text().replace(str(run_dir), "<run>")
    return scrub(json.loads(text))


def test_stages_side_by_side_give_what_one_process_gives(tmp_path, monkeypatch):
    """--jobs 2 (each stage in its own process, two at once) and --jobs 1 (one after another in this
    process) train and measure the same: identical summaries at one thread, stage for stage."""
    monkeypatch.setenv("MINILLM_THREADS", "1")
    dirs = {}
    for jobs in (1, 2):
        cfg = P.PipelineConfig(name=f"jobs{jobs}", runs_dir=str(tmp_path), quick=True, progress=False,
                               stages="sft_lora", jobs=jobs)
        dirs[jobs] = P.run_pipeline(cfg).parent
    assert (dirs[2] / "sft" / "log.txt").is_file() and not (dirs[1] / "sft" / "log.txt").exists()
    for stage in ("pretrain", "prompting", "sft", "sft_lora"):
        assert _results(dirs[1], stage) == _results(dirs[2], stage), stage


def test_a_stage_failing_side_by_side_names_the_stage_and_its_log(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    cfg = P.PipelineConfig(name="fail", runs_dir=str(tmp_path), quick=True, progress=False, stages="sft",
                           corpus=str(corpus), jobs=2)
    with pytest.raises(RuntimeError, match=r"stage pretrain failed \(exit 1\): .*log: .*pretrain/log.txt"):
        P.run_pipeline(cfg)
    assert not (tmp_path / "fail" / "sft" / "summary.json").exists()


def test_profile_writes_where_a_stages_time_went(tmp_path):
    cfg = P.PipelineConfig(name="prof", runs_dir=str(tmp_path), quick=True, progress=False, stages="pretrain",
                           profile=True)
    P.run_pipeline(cfg)
    stage_dir = tmp_path / "prof" / "pretrain"
    summary = json.loads((stage_dir / "summary.json").read_text())
    top = summary["profile_top"]
    assert len(top) == 10
    shares = [r["share"] for r in top]
    assert shares == sorted(shares, reverse=True) and 0 < shares[0] <= 1
    text = (stage_dir / "profile.txt").read_text()
    assert "sorted by cumulative" in text and "sorted by tottime" in text
    assert "train_loop" in text  # the shared loop is where pretraining's time is spent
    assert "most self time:" in R.one_line("pretrain", summary)


def test_rag_stage_measures_chapter_13_on_the_pipeline_models(quick_run):
    """The ``rag`` stage (chapter 13) at the chapter's quick step counts on the quick pipeline's own ``pretrain``
    and ``sft`` models: its summary holds every arm and the decision table, and the report gets its rows."""
    from minillm import rag_experiments

    cfg, report = quick_run
    ctx = P.Context(cfg)
    for stage in ("pretrain", "sft"):
        P.run_stage(ctx, stage)  # cached by the fixture: loads their summaries
    s = P.run_stage(ctx, "rag")
    assert "skipped" not in s
    assert s["steps"] == rag_experiments.QUICK_STEPS and set(s["curve"]) == {str(n) for n in PS.RAG_CURVE_NS}
    assert s["recall_at_1"] >= 0.9  # BM25 does not depend on the model
    assert [row["requirement"] for row in s["table"]] == list(rag_experiments.REQUIREMENTS)
    for arm in ("closed_book", "oracle", "rag_plain", "qa_full", "qa_lora", "rag_raft", "qa_full+rag"):
        for part in ("new", "updated", "old", "absent"):
            assert 0.0 <= s["arms"][arm][part]["exact_match"] <= 1.0, (arm, part)
    # a retrieved passage lengthens the prompt; the update costs milliseconds to re-index
    assert s["arms"]["rag_plain"]["new"]["prompt_tokens"] > s["arms"]["closed_book"]["new"]["prompt_tokens"] + 5
    assert 0.0 < s["update"]["rag_seconds"] < s["update"]["finetune_seconds"]
    labels = [r["method"] for r in R.rag_rows(ctx.summaries)]
    assert labels[:2] == ["ch13 closed book (SFT model)", "ch13 RAG, plain SFT reader"]
    assert "ch13 continued pretraining (30 paraphrases) + SFT" in labels and labels[-1] == "ch13 BM25 retriever"
    text = R.write_pipeline_report(ctx).read_text()
    assert "| ch13 RAG, RAFT-style reader |" in text and "recall@1" in text
    assert R.one_line("rag", s).startswith("[rag] ") and "BM25 recall@1" in R.one_line("rag", s)
    # a rebuilt stage never reuses the cached results of an earlier run (they are keyed on checkpoint paths)
    stale = report.parent / "rag" / "results" / "arms.json"
    stale.write_text(json.dumps({"config": json.loads(stale.read_text())["config"], "result": {"stale": True}}))
    (report.parent / "rag" / "summary.json").unlink()
    assert "stale" not in P.run_stage(ctx, "rag")["arms"]


def test_clean_alignment_stages_measure_ppo_and_dpo_from_one_start(quick_run):
    """align_clean: PPO (clean RM) and DPO (clean pairs) from the noisy SFT model, each in its own process,
    measured by one evaluator: finite gold, KL ≥ 0 for both, the start's KL 0, RSS and models held recorded,
    diversity in [0, 1]; best_of_n_clean's d is √(log n − (n−1)/n)."""
    import numpy as np

    cfg, report = quick_run
    a = json.loads((report.parent / "align_clean" / "summary.json").read_text())
    assert a["start"]["test"]["kl"] == 0.0
    for m, held in (("ppo", "3 GPTs"), ("dpo", "policy (1 GPT")):
        r = a[m]
        assert r["method"] == m and held in r["models_in_memory"]
        assert r["peak_rss_mb"] > 50 and r["train_seconds"] > 0
        assert np.isfinite(r["end"]["test"]["gold"]) and r["end"]["test"]["kl"] > -0.5
        v = r["end"]["diversity"]
        assert 0 <= v["distinct_1"] <= 1 and 0 <= v["all_identical"] <= 1 and v["n_samples"] == 8
    for m in ("base", "sft"):  # diversity before and after SFT, sampled as the start is
        v = a["sft_diversity"][m]
        assert 0 < v["distinct_1"] <= 1 and v["n_prompts"] == 32 and v["n_samples"] == 8
    summaries = {s: json.loads((report.parent / s / "summary.json").read_text()) for s in P.DEFAULT_STAGES}
    text = "\n".join(R.clean_alignment_sections(summaries))  # (report.md may have been rewritten by another test)
    assert "| base model (pretrained, before SFT) |" in text and "| SFT (full, clean demos) |" in text
    assert len(a["ppo"]["history"]) == 2
    b = json.loads((report.parent / "best_of_n_clean" / "summary.json").read_text())
    assert b["n"] == [1, 2, 4, 8]
    np.testing.assert_allclose(b["d"], np.sqrt(np.log(b["n"]) - (np.array(b["n"]) - 1) / np.array(b["n"])), atol=1e-12)
    curves, fits = R.overoptimization_curves(summaries)
    assert {"PPO β=0.1, flawed RM", "PPO β=0, flawed RM", "PPO β=0.1, clean RM", "best-of-n, flawed RM",
            "best-of-n, clean RM"} <= set(curves)
    assert fits["best-of-n, clean RM"]["gold"]["form"] == "bon" and fits["PPO β=0.1, clean RM"]["gold"]["form"] == "rl"
    assert curves["best-of-n, clean RM"]["gold"][0] == 0.0


def test_opt_in_refusal_stages_run_only_when_named(quick_run):
    """The over-refusal sweeps are not in --stages all; named, ``refusal`` runs DPO on the cautious pairs with
    and without helpfulness pairs, and ``refusal_rlhf`` a reward model + PPO on them on a prompt pool with
    unanswerable questions (and, from an SFT start with refusal demonstrations, both methods); the report
    gains the over-refusal table with both methods."""
    cfg, report = quick_run
    import dataclasses

    report = P.run_pipeline(dataclasses.replace(cfg, stages="refusal,refusal_rlhf"))
    r = json.loads((report.parent / "refusal" / "summary.json").read_text())
    h = json.loads((report.parent / "refusal_rlhf" / "summary.json").read_text())
    assert set(k for k in r if not k in ("seconds", "threads", "fingerprint")) == {"cautious", "cautious_helpful"}
    for runs, names in ((r, ("cautious", "cautious_helpful")), (h, ("ppo_cautious", "ppo_cautious_helpful"))):
        for name in names:
            for when in ("refusal_start", "refusal_end"):
                for split in ("answerable", "unanswerable"):
                    assert 0.0 <= runs[name][when][split]["refusal_attempt_rate"] <= 1.0
    for name in ("ppo_cautious", "ppo_cautious_helpful"):
        p = h[name]
        assert p["method"] == "ppo" and p["beta"] == 0.1 and len(p["history"]) == 2
        assert p["reward_model"].endswith(f"refusal_rlhf/reward_{name[4:]}/checkpoint.safetensors")
        assert 0.0 <= p["reward"]["test_accuracy"] <= 1.0
        assert set(p["reward"]["prefers_refusal"]) == {"answerable", "unanswerable"}
    ppo_cfg = json.loads((report.parent / "refusal_rlhf" / "ppo_cautious" / "metrics.json").read_text())["config"]
    assert ppo_cfg["prompts"].endswith("refusal_rlhf/ppo_prompts.txt")
    demos = h["demos"]  # the start with refusal demonstrations: SFT on them, then the same four runs
    assert demos["sft"]["data"]["n_examples"] == 1125 + 90
    for name in ("cautious", "cautious_helpful", "ppo_cautious", "ppo_cautious_helpful"):
        assert demos[name]["sft"].endswith("refusal_rlhf/demos/sft/checkpoint.safetensors")
        assert 0.0 <= demos[name]["refusal_end"]["answerable"]["refusal_attempt_rate"] <= 1.0
    text = report.read_text()
    assert "## Over-refusal" in text
    for start in ("noisy SFT", "SFT + refusal demos"):
        assert f"| {start} | reward model + PPO (β = 0.1) | cautious rater + helpfulness pairs |" in text
        assert f"| {start} | DPO | cautious rater |" in text


def test_opt_in_clean_beta0_ppo_joins_the_overoptimization_curves(quick_run):
    """ppo_clean_beta0 (opt-in) runs PPO with β = 0 and the clean reward model from the noisy SFT model; its
    per-iteration points become the "PPO β=0, clean RM" curve of the over-optimization plot."""
    import dataclasses

    cfg, report = quick_run
    report = P.run_pipeline(dataclasses.replace(cfg, stages="ppo_clean_beta0"))
    s = json.loads((report.parent / "ppo_clean_beta0" / "summary.json").read_text())
    assert s["metrics"]["config"]["beta"] == 0.0 and s["metrics"]["config"]["sft"].endswith("sft_noisy/checkpoint.safetensors")
    assert "PPO β=0, clean RM" in report.read_text()


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """bench.peak_rss_mb in a process started by a large one reports the child's own peak (VmHWM), not
    the parent's size carried across fork + exec by ru_maxrss: the PPO-vs-DPO memory column depends on it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from minillm.bench import peak_rss_mb

    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched in this (the parent) process
    assert peak_rss_mb() > 400
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", "from minillm.bench import peak_rss_mb; print(peak_rss_mb())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert float(out) < 300, out
    del big
