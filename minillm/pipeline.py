"""The whole fine-tuning spectrum end to end, with one report (chapter 12; ``minillm pipeline``).

Scope
    On the built-in task world by default, the stages run in order, each in
    ``runs/<name>/<stage>/``: pretrain → prompting (base model zero-/few-shot) → SFT (full) →
    SFT (LoRA) → SFT (QLoRA) → SFT with "Sure!" demonstrations (the start of best-of-n and PPO) →
    SFT on noisy demonstrations (DPO's start) → reward model →
    best-of-n (n = 1, 2, 4, 8) → PPO (β > 0) → PPO (β = 0) → PPO with the gold judge as reward
    (the control) → DPO → issue 14's "alignment that works", all from the noisy SFT model: a
    reward model on the clean pairs (``reward_clean``), PPO with it and DPO on the same pairs, each
    in its own process (``align_clean``: gold, KL to the start, wall/CPU time, peak RSS, models
    held, output diversity, also of the base and full SFT models), best-of-n with it (``best_of_n_clean``) → GRPO (chapter 14: its own
    small model on the verifiable addition task, not the fact world, since GRPO needs a reward a
    program checks). Opt-in, run only when named in ``--stages`` (the expensive sweeps): PPO β = 0
    with the clean reward model (``ppo_clean_beta0``) and over-refusal on a cautious rater's pairs,
    with and without helpfulness pairs (``refusal``: DPO from the noisy SFT model; ``refusal_rlhf``: a
    reward model + PPO from it, and DPO and reward model + PPO from an SFT start with refusal
    demonstrations). The report adds the PPO-vs-DPO,
    diversity, over-optimization and over-refusal tables and the over-optimization plot (gold and
    proxy against √KL with Gao et al.'s fitted forms, for every PPO run and both best-of-n curves).
    A stage is done when its
    ``summary.json`` exists (written last, atomically); finished stages are reused and a crashed
    run resumes from the first unfinished stage, its earlier checkpoints intact. ``report.md`` holds one table (method, trainable
    parameters, memory estimate, exact-match, format compliance, gold reward, RM score, KL to
    SFT, wall time) and PNG plots. ``--quick`` runs every stage for a handful of steps (the CI
    smoke test). ``--corpus``, ``--sft-data``, ``--pref-data`` switch stages to user files in any
    format data.py reads; stages that need the world's gold judge are then skipped, and say so.

    ``ensure(stage)`` is the one helper notebooks use to get a stage's output, created on the fly
    and cached when missing (with only the stages it needs, ``NEEDS``).

    ``--jobs`` (default: as many as cores, up to 4): stages whose needs are done run side by side,
    each in its own process at one BLAS thread, its console output in ``<stage>/log.txt``; a stage
    that the stage graph makes run alone (pretraining, which everything else waits for) keeps the
    thread policy's count. On two idle cores this is only a little faster than one stage after
    another at two threads (docs/performance.md has the measurement): a second BLAS thread speeds a
    stage up almost as much as a second process does. ``--jobs 1`` runs the stages one after
    another in this process, as before; at the same thread count both give the same results (tested
    at one thread). A different thread count changes the floating-point sums, so a run's numbers
    are reproduced by the same seed *and* thread count (``MINILLM_THREADS=1`` fixes it).

    This file is the driver (settings, the stage table, caching keyed on content and settings,
    ``--profile``, ``ensure``); what each stage runs is ``pipeline_stages.py``, the report's rows,
    tables and plots ``report.py``.

    The ``rag`` stage (chapter 13, ``stage_rag``) measures prompting vs retrieval vs fine-tuning on new
    knowledge with the pipeline's own ``pretrain`` and ``sft`` models, at the chapter's quick step counts.

Sources
    The stage recipes are the measured ones of docs/task-world.md and docs/rlhf-notes.md (see each
    train/*.py); best-of-n: Nakano et al. 2021 (WebGPT) §3 / Gao et al. 2022 §3.

Deviations
    * Exact-match, format and gold in the table are measured with greedy decoding on the held-out
      facts; the KL column is measured on responses sampled at the PPO temperature.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from minillm import pipeline_stages, report, threads
from minillm.checkpoint import write_json_atomic

STAGES = ("pretrain", "prompting", "sft", "sft_lora", "sft_qlora", "sft_opener", "sft_noisy", "reward",
          "best_of_n", "ppo", "ppo_beta0", "ppo_gold", "dpo",
          "reward_clean", "align_clean", "best_of_n_clean", "ppo_clean_beta0", "refusal", "refusal_rlhf",  # issue 14
          "grpo", "rag")

#: Stages that run only when named in ``--stages`` (``"all"`` skips them): the expensive sweeps.
OPT_IN_STAGES = ("ppo_clean_beta0", "refusal", "refusal_rlhf")
#: What ``--stages all`` (the default, ``make demo``) runs, in order.
DEFAULT_STAGES = tuple(s for s in STAGES if s not in OPT_IN_STAGES)


@dataclass
class PipelineConfig:
    """Settings of ``minillm pipeline`` (CLI: ``--quick true``, ``--name demo``)."""

    name: str = ""  # runs/<name>; "" = "default", or "quick" with --quick (never mixed with full runs)
    runs_dir: str = "runs"
    quick: bool = False
    corpus: str = "builtin"
    sft_data: str = "builtin"
    pref_data: str = "builtin"
    stages: str = "all"  # comma-separated subset of STAGES (earlier stages still run if missing)
    seed: int = 0
    eval_prompts: int = 0  # held-out prompts per evaluation; 0 = all (485)
    progress: bool = True
    profile: bool = False  # run each stage that runs under cProfile: <stage>/profile.txt + the top functions
    jobs: int = 0  # stages run side by side, each in its own process, as soon as the stages they need are done (0 = auto: min(cores, 4); 1 = one after another in this process)


class Context:
    """What stages share: the config, the run directory and the summaries of finished stages."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / (cfg.name or ("quick" if cfg.quick else "default"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summaries: dict[str, dict] = {}
        self.run_info: dict = {}  # run_pipeline: this run's wall_seconds and jobs, for the report
        self.stage: str | None = None  # the stage running now (run_stage), whose reads path() checks

    @property
    def builtin(self) -> bool:
        return self.cfg.sft_data == "builtin"

    def path(self, stage: str, name: str = "checkpoint.safetensors") -> Path:
        """``<run dir>/<stage>/<name>``. While a stage runs (``run_stage``), it may name only itself
        and the stages ``NEEDS`` lists for it: another raises RuntimeError, so a stage table that
        would let ``--jobs`` start a stage before its input exists fails in every run, not by chance."""
        if self.stage is not None and stage != self.stage and stage not in NEEDS[self.stage]:
            raise RuntimeError(f"stage {self.stage} reads stage {stage}, which pipeline.NEEDS[{self.stage!r}] "
                               f"does not list {NEEDS[self.stage]}: add it there")
        return self.dir / stage / name

    def steps(self, full: int, quick: int) -> int:
        return quick if self.cfg.quick else full

    @property
    def eval_prompts(self) -> int:
        return 24 if self.cfg.quick else self.cfg.eval_prompts


STAGE_FUNCTIONS = {  # the stages in the order they run; each builds on the ones before it
    "pretrain": pipeline_stages.stage_pretrain,
    "prompting": pipeline_stages.stage_prompting,
    "sft": pipeline_stages.stage_sft,
    "sft_lora": pipeline_stages.stage_sft_lora,
    "sft_qlora": pipeline_stages.stage_sft_qlora,
    "sft_opener": pipeline_stages.stage_sft_opener,
    "sft_noisy": pipeline_stages.stage_sft_noisy,
    "reward": pipeline_stages.stage_reward,
    "best_of_n": pipeline_stages.stage_best_of_n,
    "ppo": pipeline_stages.stage_ppo,
    "ppo_beta0": pipeline_stages.stage_ppo_beta0,
    "ppo_gold": pipeline_stages.stage_ppo_gold,
    "dpo": pipeline_stages.stage_dpo,
    # issue 14: alignment that works, from one start (the noisy SFT model); see the block above
    "reward_clean": pipeline_stages.stage_reward_clean,
    "align_clean": pipeline_stages.stage_align_clean,
    "best_of_n_clean": pipeline_stages.stage_best_of_n_clean,
    "ppo_clean_beta0": pipeline_stages.stage_ppo_clean_beta0,
    "refusal": pipeline_stages.stage_refusal,
    "refusal_rlhf": pipeline_stages.stage_refusal_rlhf,
    "grpo": pipeline_stages.stage_grpo,
    "rag": pipeline_stages.stage_rag,
}


#: What each stage reads (checkpoints through ``ctx.path``, or summaries): it starts once these are
#: done. The builtin-world and user-data variants are both listed (PPO starts from ``sft_opener`` on
#: the world, from ``sft`` on user data). ``ensure(stage)`` builds only what a stage needs; with
#: ``--jobs`` > 1 the stages whose needs are done run side by side.
NEEDS: dict[str, tuple[str, ...]] = {
    "pretrain": (),
    "prompting": ("pretrain",),
    "sft": ("pretrain",),
    "sft_lora": ("pretrain",),
    "sft_qlora": ("pretrain",),
    "sft_opener": ("pretrain",),
    "sft_noisy": ("pretrain",),
    "reward": ("sft",),
    "best_of_n": ("sft_opener", "reward"),
    "ppo": ("sft", "sft_opener", "reward"),
    "ppo_beta0": ("sft", "sft_opener", "reward"),
    "ppo_gold": ("sft", "sft_opener"),
    "dpo": ("sft", "sft_noisy", "reward"),
    "reward_clean": ("sft_noisy",),
    "align_clean": ("pretrain", "sft", "sft_noisy", "reward_clean"),  # + the base's and SFT's diversity
    "best_of_n_clean": ("sft_noisy", "reward_clean"),
    "ppo_clean_beta0": ("sft_noisy", "reward_clean"),
    "refusal": ("sft_noisy", "reward_clean"),
    "refusal_rlhf": ("pretrain", "sft_noisy", "reward_clean"),  # + an SFT start with refusal demos
    "grpo": (),  # its own small model on the addition task
    "rag": ("pretrain", "sft"),
}


#: Scheduling only (``run_side_by_side``), not reading: GRPO trains its own model, but waits for
#: pretraining, which every other stage waits for, so that pretraining has the machine to itself.
AFTER: dict[str, tuple[str, ...]] = {"grpo": ("pretrain",)}


def _before(stage: str, graph: tuple[dict, ...] = (NEEDS, AFTER)) -> set[str]:
    """Every stage that must finish before ``stage`` starts side by side (``NEEDS`` and ``AFTER``,
    directly or through others; ``graph=(NEEDS,)``: only what it reads)."""
    todo, seen = [n for g in graph for n in g.get(stage, ())], set()
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(n for g in graph for n in g.get(s, ()))
    return seen


def solo_stages(order: list[str]) -> set[str]:
    """The stages of ``order`` that the graph makes run alone: every other stage of ``order`` must
    finish before them or waits for them (for the default stages: pretraining)."""
    first = {s: _before(s) for s in order}
    return {s for s in order if all(t == s or s in first[t] or t in first[s] for t in order)}


def needed(stage: str) -> list[str]:
    """``stage`` and every stage it needs, directly or through others, in ``STAGES`` order."""
    seen = _before(stage, (NEEDS,)) | {stage}
    return [s for s in STAGES if s in seen]


# ----------------------------------------------------------------------------------- driver


#: Bump when a stage's recipe changes, so cached stages made by an older recipe are rebuilt.
RECIPE_VERSION = 2


def content_sha256(path: str) -> str:
    """SHA-256 (hex) of a data file's bytes, or ``"builtin"`` for the built-in data, so a stage is
    keyed on what the data *is*, not on where it lies (an edited file at the same path rebuilds).
    Raises FileNotFoundError naming the option's file, before any stage runs."""
    if path == "builtin":
        return "builtin"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_fingerprint(ctx: Context) -> dict:
    """What a cached stage must have been made with to be reused: the recipe version and every
    pipeline setting that changes results (not the run name, folder or progress bars), with each
    data file's content hash (``content_sha256``) next to its path."""
    c = ctx.cfg
    if not hasattr(ctx, "_data_hashes"):
        ctx._data_hashes = {k: content_sha256(getattr(c, k)) for k in ("corpus", "sft_data", "pref_data")}
    return {"recipe_version": RECIPE_VERSION, "quick": c.quick, "seed": c.seed, "corpus": c.corpus,
            "sft_data": c.sft_data, "pref_data": c.pref_data, "eval_prompts": c.eval_prompts,
            "data_sha256": ctx._data_hashes}


def cached_summary(ctx: Context, stage: str) -> dict | None:
    """The finished stage's summary when it was made with the current settings (``stage_fingerprint``),
    recorded in ``ctx.summaries``; else None."""
    path = ctx.dir / stage / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("fingerprint") == stage_fingerprint(ctx):
            ctx.summaries[stage] = summary
            return summary
    return None


def run_stage(ctx: Context, stage: str) -> dict:
    """Run one stage unless its summary exists and was made with the same settings (stage_fingerprint);
    returns the summary (cached or new). A stage rebuilt for new settings makes every later stage
    rebuild too, since they share the fingerprint.

    Before a stage runs, ``<stage>/fingerprint.json`` records the settings it runs with. A stage
    that crashed resumes from its checkpoint only when that record equals the current fingerprint;
    otherwise (other corpus, seed, data content or recipe, or no record) the stage's old checkpoint
    is deleted first, so a rebuild always retrains and never continues another run's weights."""
    fp = stage_fingerprint(ctx)
    if (cached := cached_summary(ctx, stage)) is not None:
        return cached
    path = ctx.dir / stage / "summary.json"
    if path.exists():
        path.unlink()  # made by another recipe or settings: rebuild
    marker = ctx.dir / stage / "fingerprint.json"
    started = json.loads(marker.read_text()) if marker.is_file() else None
    if started != fp:  # not a crash of this very run: nothing of the old stage may be reused
        for old in (ctx.path(stage), ctx.dir / stage / "metrics.json"):
            if old.exists():
                old.unlink()
        write_json_atomic(marker, fp)
    t0 = time.perf_counter()
    ctx.stage = stage
    try:
        with threads.phase("train") as n_threads:  # chosen per stage: the machine's load may have changed
            if ctx.cfg.profile:
                summary = profile_stage(ctx, stage)
            else:
                summary = STAGE_FUNCTIONS[stage](ctx)
    finally:
        ctx.stage = None
    summary.setdefault("seconds", time.perf_counter() - t0)
    summary.setdefault("threads", n_threads)
    summary["fingerprint"] = stage_fingerprint(ctx)
    write_json_atomic(path, summary)
    ctx.summaries[stage] = summary
    return summary


def profile_stage(ctx: Context, stage: str) -> dict:
    """Run one stage under cProfile (``--profile true``): where its time went.

    Writes ``<stage>/profile.txt`` — the functions sorted by cumulative time (which phase: generation,
    evaluation, the training loop) and by self time (which op) — and adds ``profile_top`` (the 10
    functions with the most self time, ``bench.profile_rows``) to the stage's summary. cProfile's
    own overhead makes the profiled stage slower (most in Python-heavy generation); the shares, not
    the absolute seconds, are the answer. A stage reused from an earlier run is not profiled: use a
    new ``--name``."""
    import cProfile
    import io
    import pstats

    from minillm.bench import profile_rows

    prof = cProfile.Profile()
    prof.enable()
    try:
        summary = STAGE_FUNCTIONS[stage](ctx)
    finally:
        prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    for key in ("cumulative", "tottime"):
        text.write(f"=== {stage}: sorted by {key} ===\n")
        stats.sort_stats(key).print_stats(30)
    (ctx.dir / stage).mkdir(parents=True, exist_ok=True)
    (ctx.dir / stage / "profile.txt").write_text(text.getvalue(), encoding="utf-8")
    summary["profile_top"] = profile_rows(prof, n=10)
    return summary


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run every stage in order (reusing finished ones) and write the report; returns its path."""
    wanted = DEFAULT_STAGES if cfg.stages == "all" else tuple(s.strip() for s in cfg.stages.split(","))
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    ctx = Context(cfg)
    stage_fingerprint(ctx)  # reads (hashes) --corpus/--sft-data/--pref-data now: a missing file fails first
    from minillm.loaders import load_dataset

    for path, kind in ((cfg.sft_data, "sft"), (cfg.pref_data, "preference")):
        if path != "builtin":  # parse now, so bad data fails before the earlier stages spend their time
            load_dataset(path, kind=kind)
    last = max(STAGES.index(s) for s in wanted)
    order = [s for s in STAGES[:last + 1] if s not in OPT_IN_STAGES or s in wanted]
    jobs = cfg.jobs or min(threads.cores(), MAX_AUTO_JOBS)
    t0 = time.perf_counter()
    if jobs == 1:
        for stage in order:
            summary = run_stage(ctx, stage)
            print(report.one_line(stage, summary), flush=True)
    else:
        run_side_by_side(ctx, order, jobs)
        ctx.summaries = {s: ctx.summaries[s] for s in order}  # the report lists them in stage order
    ctx.run_info = {"wall_seconds": time.perf_counter() - t0, "jobs": jobs}
    return report.write_pipeline_report(ctx)


#: Most stages ``--jobs 0`` (auto) runs at once: the stage graph is rarely wider than four.
MAX_AUTO_JOBS = 4


def run_side_by_side(ctx: Context, order: list[str], jobs: int) -> None:
    """Run the stages of ``order`` in up to ``jobs`` processes at once, each stage as soon as the
    stages it needs (``NEEDS`` and ``AFTER``, those in ``order``) are done; among the ready ones,
    first the stage most others wait on (directly or not), then in ``order``. Each stage runs in ``python -m minillm.pipeline <stage> <settings.json>`` (``run_stage`` there:
    the same caching, fingerprint and crash-resume as in one process), its console output in
    ``<stage>/log.txt``; a finished stage prints its one line here. Threads: a stage that every
    other stage of ``order`` waits on or is waited on by (pretraining) runs alone whatever the
    timing, and follows the thread policy (``threads.choose``); every other stage gets one thread
    (``MINILLM_THREADS=1``), decided by the graph, not by which stage happened to finish first, so
    the same settings give the same thread counts. Raises RuntimeError naming the stage, its exit status, the last
    line of its log and the log's path when a stage fails; the other stages are stopped then."""
    import subprocess
    import sys

    settings = ctx.dir / "pipeline-settings.json"
    write_json_atomic(settings, {**vars(ctx.cfg), "jobs": 1, "progress": False})
    env = pipeline_stages.child_env()
    pending, done, running = list(order), set(), {}
    waiting = {s: sum(s in needed(t) for t in order if t != s) for s in order}  # stages that wait on s
    solo = solo_stages(order)
    try:
        while pending or running:
            ready = [s for s in pending if all(n in done or n not in order for n in NEEDS[s] + AFTER.get(s, ()))]
            ready.sort(key=lambda s: -waiting[s])  # stable: among equals, stage order
            for stage in ready:
                if len(running) >= jobs:
                    break
                pending.remove(stage)
                if (summary := cached_summary(ctx, stage)) is not None:
                    done.add(stage)
                    print(report.one_line(stage, summary), flush=True)
                    break  # what is ready may have changed
                (ctx.dir / stage).mkdir(parents=True, exist_ok=True)
                child_env = env if stage in solo else {**env, "MINILLM_THREADS": "1"}
                log = open(ctx.dir / stage / "log.txt", "w", encoding="utf-8")
                proc = subprocess.Popen([sys.executable, "-m", "minillm.pipeline", stage, str(settings)],
                                        stdout=log, stderr=subprocess.STDOUT, env=child_env)
                running[stage] = (proc, log)
            finished = [s for s, (proc, _) in running.items() if proc.poll() is not None]
            if not finished:
                time.sleep(0.1)
            for stage in finished:
                proc, log = running.pop(stage)
                log.close()
                if proc.returncode != 0:
                    lines = [x for x in Path(log.name).read_text(encoding="utf-8").splitlines() if x.strip()]
                    raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): "
                                       f"{lines[-1] if lines else 'no output'} (log: {log.name})")
                summary = cached_summary(ctx, stage)
                if summary is None:
                    raise RuntimeError(f"stage {stage} exited without a summary (log: {log.name})")
                done.add(stage)
                print(report.one_line(stage, summary), flush=True)
    finally:
        for proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()


def _stage_main(argv: list[str]) -> int:
    """``python -m minillm.pipeline <stage> <settings.json>``: one stage in its own process
    (``run_side_by_side``'s worker), with the summaries of the stages it needs loaded first."""
    stage, settings = argv
    ctx = Context(PipelineConfig(**json.loads(Path(settings).read_text(encoding="utf-8"))))
    for s in NEEDS[stage]:
        cached_summary(ctx, s)
    run_stage(ctx, stage)
    return 0


def ensure(stage: str, quick: bool = False, runs_dir: str = "runs") -> Path:
    """The checkpoint of ``stage`` (creating it and every stage it needs when missing, then cached).

    The one helper notebooks use: ``ensure("sft")`` returns ``runs/cache[-quick]/sft/checkpoint.safetensors``.
    """
    cfg = PipelineConfig(name="cache-quick" if quick else "cache", runs_dir=runs_dir, quick=quick,
                         stages=stage, progress=False)
    ctx = Context(cfg)
    for s in needed(stage):
        run_stage(ctx, s)
    return ctx.path(stage)


def add_arguments(parser) -> None:
    from minillm.train.common import add_dataclass_arguments

    add_dataclass_arguments(parser, PipelineConfig)


def run(args) -> int:
    from minillm.train.common import dataclass_from_args

    cfg = dataclass_from_args(PipelineConfig, args)
    path = run_pipeline(cfg)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_stage_main(sys.argv[1:]))
