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
