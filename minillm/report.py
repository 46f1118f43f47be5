"""The pipeline's report: one Markdown table of every method and PNG plots.

Scope
    ``format_table`` renders the rows the pipeline measured (method, trainable parameters, memory
    estimate, exact-match, format compliance, gold reward, reward-model score, KL to the SFT model,
    wall time, notes) as a Markdown table; ``plot_losses``, ``plot_ppo`` and ``plot_dpo`` draw the
    loss curves of every stage, PPO's RM score / gold reward / KL per iteration for each run with
    gold and RM score against KL, and DPO's implicit reward margins; ``plot_overoptimization`` draws
    gold and proxy reward against √KL with the fitted forms of Gao et al. 2022; ``write_report`` puts it all
    in ``<run_dir>/report.md``. Numbers are only ever copied from measurements, never typed.

Sources
    matplotlib (Agg backend, no display needed); the over-optimization plot after Gao et al. 2022,
    arXiv 2210.10760, Fig. 1.

Deviations
    None.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: pipeline.py imports this module
    from minillm.pipeline import Context

COLUMNS = [("method", "method"), ("trainable", "trainable params"), ("memory_mb", "memory est. (MB)"),
           ("exact_match", "exact-match"), ("format", "format"), ("gold", "gold reward"),
           ("rm_score", "RM score"), ("kl", "KL to SFT (nats)"), ("seconds", "wall time (s)"), ("notes", "notes")]


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if key in ("exact_match", "format"):
        return f"{100 * v:.1f} %"
    if key == "trainable":
        return f"{int(v):,}"
    if key in ("gold", "rm_score", "kl"):
        return f"{v:+.3f}" if key != "kl" else f"{v:.2f}"
    if key == "memory_mb":
        return f"{v:.1f}"
    if key == "seconds":
        return f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (dicts with the keys of ``COLUMNS``; missing values show "—")."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _save(fig, path) -> Path:
    """Save a figure as PNG via a temp file and rename (no half-written image on a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict, path) -> Path:
    """One panel per stage: its training loss per step (``curves``: stage -> list of floats)."""
    plt = _plt()
    curves = {k: v for k, v in curves.items() if v}
    n = max(1, len(curves))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, ys) in zip(axes.flat, curves.items()):
        ax.plot(range(1, len(ys) + 1), ys, lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_ppo(histories: dict, path) -> Path:
    """PPO runs side by side: RM score, gold reward and KL per iteration, and gold / RM score vs KL.

    ``histories``: run name -> list of per-iteration dicts with keys rm_score, gold, kl.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, hist in histories.items():
        if not hist:
            continue
        it = range(1, len(hist) + 1)
        rm = [h.get("rm_score", float("nan")) for h in hist]
        gold = [h.get("gold", float("nan")) for h in hist]
        kl = [h.get("kl", float("nan")) for h in hist]
        axes[0].plot(it, rm, label=name)
        axes[1].plot(it, gold, label=name)
        axes[2].plot(it, kl, label=name)
        axes[3].scatter(kl, gold, s=8, label=f"{name}: gold")
        axes[3].scatter(kl, rm, s=8, marker="x", label=f"{name}: RM")
    for ax, title in zip(axes, ("RM score (proxy)", "gold reward", "KL to SFT (nats)", "gold / RM vs KL")):
        ax.set_title(title)
        ax.set_xlabel("iteration" if title != "gold / RM vs KL" else "KL (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_dpo(history: list[dict], path) -> Path:
    """DPO implicit rewards per step: chosen, rejected and their margin (β·log π/π_ref, nats)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = range(1, len(history) + 1)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("implicit reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_overoptimization(curves: dict, path, fits: dict | None = None) -> Path:
    """Gold (left) and proxy (right) reward against d = √KL, with fitted curves (Gao et al. 2022 Fig. 1).

    curves: name -> {"d": (N,), "gold": (N,), "proxy": (N,)} (rewards relative to the start, as
    ``overoptimization.curve_from_history``); fits: name -> {"gold": fit, "proxy": fit} with fits
    from ``overoptimization.fit_overoptimization`` (drawn as lines). Returns the PNG path.
    """
    import numpy as np

    from minillm.overoptimization import predict

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    handles = []
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        for j, (ax, key) in enumerate(zip(axes, ("gold", "proxy"))):
            h = ax.scatter(c["d"], c[key], s=9, color=color, alpha=0.6)
            f = (fits or {}).get(name, {}).get(key)
            if f:
                xs = np.linspace(0, max(float(np.max(c["d"])), 1e-6) * 1.1, 100)
                ax.plot(xs, predict(xs, f["alpha"], f["beta"], f["form"]), color=color, lw=1.5)
            if j == 0:
                g = (fits or {}).get(name, {}).get("gold")
                label = name if not g else f"{name} (gold fit α={g['alpha']:.2f}, β={g['beta']:.2f})"
                handles.append((h, label))
    for ax, title in zip(axes, ("gold reward − start", "proxy (RM) score − start")):
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(title)
        ax.set_xlabel("d = √KL (nats^½)")
    fig.legend([h for h, _ in handles], [lb for _, lb in handles], loc="lower center", ncol=2, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(handles) / 2), 1, 1))
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def write_report(run_dir, rows: list[dict], sections: list[str], plots: list[str]) -> Path:
    """Write ``<run_dir>/report.md``: the table, then the extra sections and the plot images."""
    run_dir = Path(run_dir)
    parts = ["# minillm pipeline report", "", format_table(rows), ""]
    for s in sections:
        parts += [s, ""]
    for p in plots:
        parts += [f"![{Path(p).stem}]({Path(p).name})", ""]
    from minillm.checkpoint import write_text_atomic

    return write_text_atomic(run_dir / "report.md", "\n".join(parts))


# ------------------------------------------------------------------ the pipeline's rows and sections

#: Report label of each chapter-13 arm (``rag_rows``), in the order of ``rag_experiments.ARMS``.
RAG_ROW_LABELS = {"closed_book": "ch13 closed book (SFT model)", "rag_plain": "ch13 RAG, plain SFT reader",
                  "qa_full": "ch13 QA fine-tuning (full)", "qa_lora": "ch13 QA fine-tuning (LoRA)",
                  "rag_raft": "ch13 RAG, RAFT-style reader", "qa_full+rag": "ch13 QA fine-tuning + RAG"}


def rag_rows(summaries: dict) -> list[dict]:
    """Report rows of the ``rag`` stage: per arm, exact match and format on the *new* facts (held-out
    phrasings), the notes naming updated / old exact match, "I don't know." on absent entities and prompt
    tokens; one row for continued pretraining (most paraphrases) and one for the retriever."""
    s = summaries.get("rag", {})
    if "arms" not in s:
        return []
    rows = []
    for arm, label in RAG_ROW_LABELS.items():
        a = s["arms"].get(arm)
        if not a:
            continue
        t = s["train"].get({"rag_raft": "raft", "qa_full+rag": "qa_full"}.get(arm, arm), {})
        rows.append({"method": label, "trainable": t.get("trainable", 0), "exact_match": a["new"]["exact_match"],
                     "format": a["new"]["format_compliance"], "seconds": t.get("seconds"),
                     "notes": f"new facts; updated EM {a['updated']['exact_match']:.1%}, old EM "
                              f"{a['old']['exact_match']:.1%}, absent \"I don't know.\" "
                              f"{a['absent']['abstain_rate']:.0%}, prompt {a['new']['prompt_tokens']:.0f} tokens"})
    if s.get("curve"):
        n = max(s["curve"], key=int)
        c = s["curve"][n]
        rows.append({"method": f"ch13 continued pretraining ({n} paraphrases) + SFT", "exact_match": c["new"],
                     "seconds": c["seconds"], "notes": f"new facts; updated EM {c['updated']:.1%}, old EM {c['old']:.1%}"})
    u = s["update"]
    rows.append({"method": "ch13 BM25 retriever", "trainable": 0,
                 "notes": f"recall@1 {s['recall_at_1']:.1%} on new and updated facts; changing one fact: "
                          f"re-index {u['rag_seconds'] * 1e3:.1f} ms vs fine-tuning {u['finetune_seconds']:.2f} s; "
                          f"the ch13 rows train for rag_experiments.QUICK_STEPS {s['steps']} (notebook 13 has the chapter's sizes)"})
    return rows


def overoptimization_curves(S: dict) -> tuple[dict, dict]:
    """(curves, fits) for the over-optimization plot from the stage summaries ``S``: PPO runs (RL form,
    points per iteration, relative to the first iteration) and best-of-n (bon form, relative to n = 1).
    Curves: name -> {"d", "gold", "proxy"} lists; fits: name -> {"gold": fit, "proxy": fit}."""
    from minillm.overoptimization import best_of_n_kl, curve_from_history, fit_overoptimization

    curves, fits = {}, {}
    runs = (("PPO β=0.1, flawed RM", S.get("ppo", {}).get("history")),
            ("PPO β=0, flawed RM", S.get("ppo_beta0", {}).get("history")),
            ("PPO β=0.1, clean RM", S.get("align_clean", {}).get("ppo", {}).get("history")),
            ("PPO β=0, clean RM", S.get("ppo_clean_beta0", {}).get("history")))
    for name, hist in runs:
        hist = [h for h in (hist or []) if h.get("gold") is not None and h.get("rm_score") is not None]
        if len(hist) >= 2:
            c = curve_from_history(hist)
            curves[name] = {k: [float(x) for x in c[k]] for k in ("d", "gold", "proxy")}
    b = S.get("best_of_n", {}).get("n", {})
    if len(b) >= 2:
        ns = sorted(b, key=int)
        g0, p0 = b[ns[0]]["gold"], b[ns[0]]["rm_score"]
        curves["best-of-n, flawed RM"] = {"d": [float(np.sqrt(best_of_n_kl(int(n)))) for n in ns],
                                          "gold": [b[n]["gold"] - g0 for n in ns],
                                          "proxy": [b[n]["rm_score"] - p0 for n in ns]}
    c = S.get("best_of_n_clean", {})
    if len(c.get("n", [])) >= 2:
        curves["best-of-n, clean RM"] = {"d": c["d"], "gold": [g - c["gold"][0] for g in c["gold"]],
                                         "proxy": [p - c["proxy"][0] for p in c["proxy"]]}
    for name, c in curves.items():
        form = "bon" if name.startswith("best-of-n") else "rl"
        fits[name] = {k: fit_overoptimization(c["d"], c[k], form) for k in ("gold", "proxy")}
    return curves, fits


def clean_alignment_rows(S: dict) -> list[dict]:
    """Main-table rows of the issue-14 stages: the noisy SFT start, PPO and DPO with the clean RM / pairs
    (one sample per held-out-fact prompt at T = 0.7: correctness as exact-match, gold, RM, KL to the start)."""
    a = S.get("align_clean", {})
    if "start" not in a:
        return []
    s = a["start"]["test"]
    rows = [{"method": "noisy SFT (start of the clean PPO / DPO), T = 0.7", "trainable": None, "gold": s["gold"],
             "exact_match": s.get("exact_match"), "rm_score": s.get("rm_score"), "kl": 0.0,
             "notes": "RM score from the clean reward model"}]
    for m, label in (("ppo", "PPO (β = 0.1), clean RM, from noisy SFT"),
                     ("dpo", "DPO (β = 0.1), clean pairs, from noisy SFT")):
        if m in a:
            e = a[m]["end"]["test"]
            rows.append({"method": label, "trainable": a[m].get("trainable_parameters"), "gold": e["gold"],
                         "exact_match": e.get("exact_match"), "rm_score": e.get("rm_score"), "kl": e.get("kl"),
                         "seconds": a[m].get("train_seconds"),
                         "notes": f"gold {s['gold']:+.3f} → {e['gold']:+.3f} (T = 0.7); see the PPO-vs-DPO table"})
    return rows


def ppo_vs_dpo_table(a: dict) -> list[str]:
    """The PPO-vs-DPO table (same start, same pairs), Markdown lines, from the ``align_clean`` summary ``a``."""
    out = ["## PPO vs DPO from the same start (noisy SFT) on the same clean pairs", "",
           "| method | gold (held-out), start → end | gold (train facts) | KL to start (nats) | train wall (s) "
           "| train CPU (s) | peak RSS (MB) | models in memory |", "|---|---|---|---|---|---|---|---|"]
    g0, t0 = a["start"]["test"]["gold"], a["start"]["train"]["gold"]
    for m in ("ppo", "dpo"):
        if m not in a:
            continue
        r, e = a[m], a[m]["end"]
        out.append(f"| {m.upper()} (β = {r['beta']:g}) | {g0:+.3f} → {e['test']['gold']:+.3f} | {t0:+.3f} → "
                   f"{e['train']['gold']:+.3f} | {e['test']['kl']:.2f} | {r['train_seconds']:.0f} | "
                   f"{r['train_cpu_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['models_in_memory']} |")
    return out


def diversity_table(a: dict) -> list[str]:
    """The output-diversity table before and after SFT (the base model; full and noisy SFT) and after PPO
    and DPO from the noisy SFT start, Markdown lines, from the ``align_clean`` summary ``a`` (the
    SFT rows only where it holds ``sft_diversity``)."""
    out = ["## Output diversity (8 samples per prompt at T = 0.7 on 32 held-out-fact prompts)", "",
           "| model | distinct-1 | distinct-2 | mean token entropy (nats) | all 8 identical |", "|---|---|---|---|---|"]
    sd = a.get("sft_diversity", {})
    for label, v in (("base model (pretrained, before SFT)", sd.get("base")), ("SFT (full, clean demos)", sd.get("sft")),
                     ("noisy SFT (start of PPO and DPO)", a["start"].get("diversity")),
                     ("PPO, clean RM", a.get("ppo", {}).get("end", {}).get("diversity")),
                     ("DPO, clean pairs", a.get("dpo", {}).get("end", {}).get("diversity"))):
        if v:
            out.append(f"| {label} | {v['distinct_1']:.3f} | {v['distinct_2']:.3f} | {v['entropy']:.3f} | "
                       f"{v['all_identical']:.1%} |")
    return out


def clean_alignment_sections(S: dict) -> list[str]:
    """The PPO-vs-DPO and diversity sections (Markdown); [] without the ``align_clean`` stage."""
    a = S.get("align_clean", {})
    if "start" not in a:
        return []
    return ["\n".join(ppo_vs_dpo_table(a)), "\n".join(diversity_table(a))]


def overoptimization_section(curves: dict, fits: dict) -> list[str]:
    """The fitted forms and measured peaks of the over-optimization curves, Markdown lines."""
    out = ["## Over-optimization: gold and proxy against d = √KL (Gao et al. 2022 forms)", "",
           "| curve | points | measured peak gold − start (at d) | gold falls below start at d | gold fit α, β "
           "(RMSE) | proxy fit α, β |", "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        g = np.asarray(c["gold"])
        i = int(np.argmax(g))
        below = [c["d"][j] for j in range(i, len(g)) if g[j] < 0]
        fg, fp = fits[name]["gold"], fits[name]["proxy"]
        out.append(f"| {name} | {len(g)} | {g[i]:+.3f} (d {c['d'][i]:.2f}) | "
                   f"{f'{below[0]:.2f}' if below else 'no'} | {fg['alpha']:.3f}, {fg['beta']:.3f} ({fg['rmse']:.3f}) | "
                   f"{fp['alpha']:.3f}, {fp['beta']:.3f} |")
    out += ["", "PPO points are per-iteration rollouts (64 samples each, noisy); best-of-n KL = log n − (n−1)/n."]
    return out


def refusal_section(S: dict) -> str:
    """The over-refusal table (Markdown) from the ``refusal`` stage, or "" when it did not run: DPO on
    the cautious rater's pairs and reward model + PPO on them, each without and with helpfulness pairs,
    from the noisy SFT model and from the start with refusal demonstrations ("demos")."""
    r = {**S.get("refusal", {}), **S.get("refusal_rlhf", {})}  # DPO | reward model + PPO (both opt-in)
    if not any(k in r for k in ("cautious", "cautious_helpful", "ppo_cautious")):
        return ""
    lines = ["## Over-refusal (on a cautious rater's pairs; greedy)", "",
             "| start | method | pairs | refusal on answerable, before → after | on unanswerable (held-out entities), "
             "before → after | gold on answerable, before → after |", "|---|---|---|---|---|---|"]
    for start, rs in (("noisy SFT", r), ("SFT + refusal demos", r.get("demos", {}))):
        for key, method in (("", "DPO"), ("ppo_", "reward model + PPO (β = 0.1)")):
            for name, label in (("cautious", "cautious rater"), ("cautious_helpful", "cautious rater + helpfulness pairs")):
                if key + name not in rs:
                    continue
                a, e = rs[key + name]["refusal_start"], rs[key + name]["refusal_end"]
                lines.append(f"| {start} | {method} | {label} | {a['answerable']['refusal_attempt_rate']:.1%} → "
                             f"{e['answerable']['refusal_attempt_rate']:.1%} | {a['unanswerable']['refusal_attempt_rate']:.1%}"
                             f" → {e['unanswerable']['refusal_attempt_rate']:.1%} | {a['answerable']['gold']:+.3f} → "
                             f"{e['answerable']['gold']:+.3f} |")
    lines += ["", "Rates count responses that start declining (\"I don…\", \"I do not…\"). PPO's prompts mix the "
              "world's answerable questions with questions about the fictional entities of the cautious pairs "
              "(a quarter of the pool); its reward model is trained on the same pairs as DPO, from the same start. "
              "\"SFT + refusal demos\": SFT on the noisy demonstrations plus \"I do not know.\" on the questions "
              "about the pairs' fictional entities (the noisy SFT model never samples a refusal)."]
    return "\n".join(lines)


def one_line(stage: str, s: dict) -> str:
    """The terminal summary of one finished stage."""
    if "skipped" in s:
        return f"[{stage}] skipped: {s['skipped']}"
    m = s.get("metrics", {})
    bits = [f"{s.get('seconds', 0):.0f}s"]
    if stage == "pretrain":
        bits.append(f"val loss {s['val_losses'][-1][1]:.3f}")
    elif stage == "prompting":
        bits.append(f"EM 0-shot {s['zero_shot']['exact_match']:.1%}, 3-shot {s['three_shot']['exact_match']:.1%}; "
                    f"contains {s['zero_shot']['contains']:.1%} -> {s['three_shot']['contains']:.1%}")
    elif "sft_test" in m:
        bits.append(f"held-out EM {m['sft_test']['exact_match']:.1%}, format {m['sft_test']['format_compliance']:.1%}, "
                    f"gold {m['sft_test']['gold']:+.3f}")
    elif stage == "best_of_n":
        bits.append(", ".join(f"n={n}: RM {v['rm_score']:+.2f} gold {v['gold']:+.3f}" for n, v in s["n"].items()))
    elif stage == "reward" and "test" in m:
        bits.append(f"held-out pair accuracy {m['test']['accuracy']:.1%}")
    elif stage.startswith("ppo") and "eval_end" in m:
        a, e = m["eval_start"]["test"], m["eval_end"]["test"]
        bits.append(f"RM {a['rm_score']:+.2f} -> {e['rm_score']:+.2f}, gold {a['gold']:+.3f} -> {e['gold']:+.3f}, "
                    f"KL {e['kl']:.2f}")
    elif stage == "dpo" and "after" in m:
        a, e = m["before"]["test"]["greedy"], m["after"]["test"]["greedy"]
        bits.append(f"gold {a['gold']:+.3f} -> {e['gold']:+.3f}, rude {a['rude']:.0%} -> {e['rude']:.0%}, "
                    f"too long {a['too_long']:.0%} -> {e['too_long']:.0%}")
    elif stage == "grpo" and "eval_end" in m:
        a, e = m["eval_start"], m["eval_end"]
        bits.append(f"addition, held-out pass@1 {a['pass@1']:.3f} -> {e['pass@1']:.3f}, "
                    f"pass@{e['G']} {a['pass@G']:.3f} -> {e['pass@G']:.3f}, greedy {a['greedy']:.1%} -> {e['greedy']:.1%}")
    elif stage == "rag" and "arms" in s:
        a = s["arms"]
        bits.append(f"new-fact EM closed book {a['closed_book']['new']['exact_match']:.1%}, QA FT "
                    f"{a['qa_full']['new']['exact_match']:.1%}, RAG+RAFT reader {a['rag_raft']['new']['exact_match']:.1%}; "
                    f"BM25 recall@1 {s['recall_at_1']:.1%} (quick step counts)")
    elif stage == "reward_clean" and "test" in m:
        bits.append(f"clean pairs, held-out pair accuracy {m['test']['accuracy']:.1%}")
    elif stage == "align_clean" and "start" in s:
        bits.append(", ".join(f"{k.upper()} gold {s['start']['test']['gold']:+.3f} -> {s[k]['end']['test']['gold']:+.3f} "
                              f"(KL {s[k]['end']['test']['kl']:.2f}, {s[k]['train_seconds']:.0f}s)" for k in ("ppo", "dpo")))
    elif stage == "best_of_n_clean" and "n" in s:
        bits.append(", ".join(f"n={n}: gold {g:+.3f}" for n, g in zip(s["n"], s["gold"])))
    elif stage in ("refusal", "refusal_rlhf"):
        bits.append(", ".join(f"{k}: refusal on answerable {v['refusal_start']['answerable']['refusal_attempt_rate']:.0%}"
                              f" -> {v['refusal_end']['answerable']['refusal_attempt_rate']:.0%}, unanswerable "
                              f"{v['refusal_start']['unanswerable']['refusal_attempt_rate']:.0%} -> "
                              f"{v['refusal_end']['unanswerable']['refusal_attempt_rate']:.0%}" for k, v in s.items()
                              if isinstance(v, dict) and "refusal_end" in v))
    if "profile_top" in s:
        bits.append("most self time: " + ", ".join(f"{r['function']} {r['share']:.0%}" for r in s["profile_top"][:3]))
    return f"[{stage}] " + "; ".join(bits)


def _memory_mb(model_cfg: dict, method: str, targets) -> float:
    from minillm import memory
    from minillm.model import GPTConfig

    shape = memory.ModelShape.from_gpt_config(GPTConfig.from_dict(model_cfg))
    est = memory.estimate(shape, method=method, dtype="fp32", batch=32, seq_len=model_cfg["block_size"],
                          lora_r=8, lora_targets=targets)
    return est["total"] / 1e6


def build_rows(ctx: Context) -> list[dict]:
    """The report table, one row per method, from the stage summaries."""
    S = ctx.summaries
    rows: list[dict] = []
    model_cfg = None
    try:
        from minillm.checkpoint import load_checkpoint

        model_cfg = load_checkpoint(ctx.path("pretrain")).config
    except (FileNotFoundError, ValueError):
        pass
    p = S.get("prompting", {})
    for key, label in (("zero_shot", "base model, zero-shot"), ("three_shot", "base model, 3-shot")):
        if key in p:
            rows.append({"method": label, "trainable": 0, "exact_match": p[key]["exact_match"],
                         "format": p[key]["format_compliance"], "gold": p[key]["gold"],
                         "notes": f"answer contained {p[key]['contains']:.1%}"})
    for stage, label, method, targets in (("sft", "SFT (full)", "full", "all-linear"),
                                          ("sft_lora", "SFT (LoRA r=8, q,v)", "lora", ["q_proj", "v_proj"]),
                                          ("sft_qlora", "SFT (QLoRA NF4+DQ, r=8 all linear)", "qlora", "all-linear"),
                                          ("sft_opener", "SFT (full, 25 % \"Sure!\" demos; PPO start)", "full", "all-linear"),
                                          ("sft_noisy", "SFT (full, 20 % noisy demos; DPO start)", "full", "all-linear")):
        s = S.get(stage, {})
        if "metrics" not in s:
            continue
        m = s["metrics"]
        t = m.get("sft_test", {})
        rows.append({"method": label, "trainable": m["parameters"]["trainable"],
                     "memory_mb": _memory_mb(model_cfg, method, targets) if model_cfg else None,
                     "exact_match": t.get("exact_match"), "format": t.get("format_compliance"),
                     "gold": t.get("gold"), "seconds": s.get("seconds"),
                     "notes": f"corpus loss {m.get('corpus_loss_after', float('nan')):.3f}; "
                              f"paraphrase EM {m.get('sft_paraphrase', {}).get('exact_match', float('nan')):.1%}"})
    r = S.get("reward", {})
    if "metrics" in r:
        m = r["metrics"]
        cue = m.get("cue", {}).get("test", {})
        rows.append({"method": "reward model (Bradley-Terry)", "trainable": m.get("parameters", {}).get("trainable"),
                     "seconds": r.get("seconds"),
                     "notes": f"held-out pair accuracy {m.get('test', {}).get('accuracy', float('nan')):.1%}; "
                              f"cue bonus {cue.get('cue_bonus', float('nan')):+.2f}"})
    b = S.get("best_of_n", {})
    for n, v in b.get("n", {}).items():
        rows.append({"method": f"best-of-{n} (T = 0.7)", "trainable": 0, "exact_match": v["exact_match"],
                     "format": v["format_compliance"], "gold": v["gold"], "rm_score": v["rm_score"],
                     "notes": f"opener rate {v['opener_rate']:.1%}"})
    n_full = None
    if model_cfg:  # PPO and DPO fine-tune every weight
        from minillm import memory
        from minillm.model import GPTConfig

        n_full = memory.ModelShape.from_gpt_config(GPTConfig.from_dict(model_cfg)).n_params()
    for stage, label in (("ppo", "PPO (β = 0.1), T = 0.7"), ("ppo_beta0", "PPO (β = 0), T = 0.7"),
                         ("ppo_gold", "PPO, gold judge as reward (control)")):
        s = S.get(stage, {})
        if "metrics" not in s:
            continue
        a = s["metrics"].get("eval_start", {}).get("test", {})
        e = s["metrics"].get("eval_end", {}).get("test", {})
        rows.append({"method": label, "trainable": n_full, "exact_match": e.get("correct"),
                     "gold": e.get("gold"), "rm_score": e.get("rm_score") if stage != "ppo_gold" else None,
                     "kl": e.get("kl"), "seconds": s.get("seconds"),
                     "notes": f"gold {a.get('gold', float('nan')):+.3f} → {e.get('gold', float('nan')):+.3f}; "
                              f"opener {a.get('opener_rate', float('nan')):.0%} → {e.get('opener_rate', float('nan')):.0%}"})
    d = S.get("dpo", {})
    if "metrics" in d:
        m = d["metrics"]
        g0, g1 = m.get("before", {}).get("test", {}).get("greedy", {}), m.get("after", {}).get("test", {}).get("greedy", {})
        t1 = m.get("after", {}).get("test", {}).get("T0.7", {})
        faults = ", ".join(f"{k} {g0.get(k, float('nan')):.0%} → {g1.get(k, float('nan')):.0%}"
                           for k in ("rude", "too_long", "repetition", "opener_rate"))
        rows.append({"method": "DPO (β = 0.1) from noisy SFT", "trainable": m.get("parameters", {}).get("trainable"),
                     "exact_match": g1.get("exact_match"), "format": 1 - g1["malformed"] if "malformed" in g1 else None,
                     "gold": g1.get("gold"), "rm_score": t1.get("rm_score"), "kl": t1.get("kl"),
                     "seconds": d.get("seconds"), "notes": f"gold {g0.get('gold', float('nan')):+.3f} → "
                                                          f"{g1.get('gold', float('nan')):+.3f}; {faults}"})
    g = S.get("grpo", {})
    if "metrics" in g and "eval_end" in g["metrics"]:
        m = g["metrics"]
        c, a, e = m["config"], m["eval_start"], m["eval_end"]
        rows.append({"method": f"GRPO ({c['loss_type']}, β = {c['beta']:g}, G = {c['num_generations']}), addition task",
                     "trainable": m.get("parameters", {}).get("trainable"), "exact_match": e["greedy"],
                     "seconds": g.get("seconds"),
                     "notes": f"own {m.get('parameters', {}).get('total', 0):,}-parameter model and task (not the "
                              f"world): held-out greedy {a['greedy']:.1%} → {e['greedy']:.1%}, pass@1 "
                              f"{a['pass@1']:.3f} → {e['pass@1']:.3f}, pass@{e['G']} {a['pass@G']:.3f} → "
                              f"{e['pass@G']:.3f}; time incl. its SFT start"})
    rows += rag_rows(S)
    rows += clean_alignment_rows(S)
    return rows


def write_pipeline_report(ctx: Context) -> Path:
    """Write ``<run_dir>/report.md`` and its plots from the finished stages of a pipeline run
    (``ctx``: ``pipeline.Context``; its ``summaries`` and ``dir`` are read). Returns the path."""
    plots = []
    curves = {k: v.get("losses") for k, v in ctx.summaries.items() if v.get("losses")}
    if curves:
        plots.append(str(plot_losses(curves, ctx.dir / "losses.png")))
    ppo = {k: v["history"] for k, v in ctx.summaries.items() if k.startswith("ppo") and v.get("history")}
    if ppo:
        plots.append(str(plot_ppo(ppo, ctx.dir / "ppo.png")))
    if ctx.summaries.get("dpo", {}).get("history"):
        plots.append(str(plot_dpo(ctx.summaries["dpo"]["history"], ctx.dir / "dpo.png")))
    curves, fits = overoptimization_curves(ctx.summaries)
    if curves:
        plots.append(str(plot_overoptimization(curves, ctx.dir / "overoptimization.png", fits)))
    stages = "\n".join(["## Stages", ""] + [f"- {one_line(k, v)}" for k, v in ctx.summaries.items()])
    if getattr(ctx, "run_info", None):  # a run of run_pipeline (not ensure)
        total = sum(v.get("seconds") or 0.0 for v in ctx.summaries.values())
        stages += (f"\n\nThis run: {ctx.run_info['wall_seconds']:.0f} s wall clock, up to {ctx.run_info['jobs']} "
                   f"stage(s) side by side (stages reused from an earlier run take no time here); the stages' own "
                   f"times add up to {total:.0f} s.")
    note = ("Times are wall-clock seconds on this machine. Exact-match, format and gold are measured on held-out "
            "facts (never in SFT data) and judged by judge.GoldJudge: greedy answers for the SFT rows and DPO, "
            "one sample at T = 0.7 per prompt for best-of-n and PPO (their KL is the summed log-ratio to the "
            "SFT model on those samples). The GRPO row is another task: 2-digit addition, its exact-match the "
            "greedy accuracy on held-out problems, pass@k from G samples at T = 1.")
    sections = [stages, note]
    sections += clean_alignment_sections(ctx.summaries)
    sections += ["\n".join(overoptimization_section(curves, fits))] if curves else []
    sections += [refusal_section(ctx.summaries)] if refusal_section(ctx.summaries) else []
    return write_report(ctx.dir, build_rows(ctx), sections, plots)
