"""The `moegrok analyze` figures (matplotlib, Agg backend), drawn from a computed :class:`Analysis`.

Every figure has one panel per domain with the training step on x, and returns, besides the PNG path, one
sentence of reading for report.md (so the report says what the figure shows, not only where it is).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moegrok.analysis.run_metrics import NAN, Analysis, DomainResult, cell_number, cell_text
from moegrok.tables import pyplot


def _colors() -> list[str]:
    return pyplot().rcParams["axes.prop_cycle"].by_key()["color"]


def _per_domain(a: Analysis, path: Path, title: str, ylabel: str, panel: Callable[..., str | None],
                lead: str = "") -> tuple[Path, str]:
    """Draws one panel per domain through `panel(ax, domain_result)`, which returns the domain's sentence of reading
    (None: nothing to say); saves the figure to `path`. Returns (path, reading)."""
    plt = pyplot()
    n = max(len(a.domains), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    fig.suptitle(title)
    reading = []
    for ax, dr in zip(axes[0], a.domains):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        said = panel(ax, dr)
        if said is not None:
            reading.append(said)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path, lead + "; ".join(reading) + "."


def _na_text(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)


def _rows_of(a: Analysis, domain: str, group: str) -> list[dict]:
    return sorted((r for r in a.rows if r["domain"] == domain and r["group"] == group), key=lambda r: r["checkpoint"])


def _col(rows: Sequence[dict], col: str) -> np.ndarray:
    return np.array([cell_number(r.get(col)) for r in rows])


def _change(v: np.ndarray) -> str:
    f = v[np.isfinite(v)]
    return "n/a" if f.size == 0 else f"{f[0]:.3g} → {f[-1]:.3g}"


def fig_memorized_vs_accuracy(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data

    def panel(ax, dr: DomainResult) -> str:
        count = np.array([int(((dr.t_star >= 0) & (dr.t_star <= c)).sum()) for c in range(len(d.steps))])
        ax.plot(d.steps, count, "o-", color="tab:blue", label="memorized samples")
        eps = "" if dr.epsilon is None else f", ε={dr.epsilon.epsilon:g}"
        ax.set_title(f"{dr.domain}{eps}")
        ax2 = ax.twinx()
        acc = d.accuracy[dr.domain]
        ax2.plot(d.steps, acc, "s--", color="tab:red", label="test accuracy")
        ax2.set_ylabel("test accuracy")
        ax2.set_ylim(-0.02, 1.02)
        if (dr.t_star >= 0).any() and np.isfinite(acc).any():
            last_mem = d.steps[int(dr.t_star.max())]
            return (f"{dr.domain}: {int(count[-1])} of {dr.sample_idx.size} samples memorized, the last "
                    f"from step {last_mem}, while test accuracy goes {_change(acc)}")
        return f"{dr.domain}: {dr.mem_note or dr.gen_note or 'n/a'}"

    return _per_domain(a, path, "Memorized probe samples vs test accuracy", "memorized samples (count)", panel)


LAG_PANELS = 4  # pairs drawn per domain, as the paper's Figure 2; every pair is in lag.csv


def lag_pairs_to_draw(pairs, n: int = LAG_PANELS):
    """The `n` matched pairs with a positive lag and the highest train/test similarity (ties: longer lag first)."""
    pos = [p for p in pairs if p.lag_steps > 0]
    return sorted(pos, key=lambda p: (-p.similarity, -p.lag_steps, p.train_step))[:n]


def fig_lag(a: Analysis, path: Path) -> tuple[Path, str]:
    """One row per domain, one panel per drawn pair: Train@p's mean probe loss (solid) and Test@q's accuracy
    (dashed), the lag as an arrow between the two checkpoints."""
    d = a.data
    plt = pyplot()
    colors = _colors()
    n_rows = max(len(a.domains), 1)
    fig, axes = plt.subplots(n_rows, LAG_PANELS, figsize=(3.4 * LAG_PANELS, 2.7 * n_rows), squeeze=False)
    fig.suptitle(f"Train@p (probe loss, solid) → Test@q (accuracy, dashed): the {LAG_PANELS} most similar matched "
                 "pairs with a positive lag per domain (all pairs: lag.csv)", fontsize=10)
    reading = []
    for row, dr in zip(axes, a.domains):
        drawn = lag_pairs_to_draw(dr.pairs)
        if not drawn:
            why = dr.pair_note or ("no matched pair with a positive lag" if dr.pairs else "no matched groups")
            _na_text(row[0], f"{dr.domain}: {why}")
            reading.append(f"{dr.domain}: {why}")
        for ax in row[max(len(drawn), 1):]:
            ax.axis("off")
        for i, (ax, p) in enumerate(zip(row, drawn)):
            col = colors[i % len(colors)]
            mem = dr.sample_idx[dr.t_star == p.train_index]
            items = np.flatnonzero(dr.t_hash == p.test_index)
            ax.plot(d.steps, d.loss_TxN[:, mem].mean(axis=1), "-", color=col)
            ax2 = ax.twinx()
            ax2.plot(d.steps, d.correct[dr.domain][:, items].mean(axis=1), "--", color="k", lw=1)
            ax2.set_ylim(-0.02, 1.02)
            y = ax.get_ylim()[1] * 0.85
            ax.annotate("", xy=(p.test_step, y), xytext=(p.train_step, y), arrowprops={"arrowstyle": "->"})
            ax.axvline(p.train_step, color=col, ls=":", lw=1)
            ax.axvline(p.test_step, color="k", ls=":", lw=1)
            ax.set_title(f"{dr.domain}: Train@{p.train_step} → Test@{p.test_step}\n"
                         f"lag {p.lag_steps} steps, sim {p.similarity:.2f}, n {p.n_train}/{p.n_test}", fontsize=8)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax2.tick_params(labelsize=7)
            if i == 0:
                ax.set_ylabel("probe loss of Train@p", fontsize=8)
            if i == len(drawn) - 1:
                ax2.set_ylabel("accuracy of Test@q", fontsize=8)
        if drawn:
            reading.append(f"{dr.domain}: " + ", ".join(f"Train@{p.train_step}→Test@{p.test_step} "
                                                         f"({p.lag_steps:+d})" for p in drawn))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, "Most similar matched groups with a positive lag, in steps — " + "; ".join(reading) + "."


def fig_distance_vs_loss(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data
    colors = _colors()

    def panel(ax, dr: DomainResult) -> str:
        ax2 = ax.twinx()
        ax2.set_ylabel("mean probe loss")
        groups = ["memorized"] + [f"Train@{d.steps[p]}" for p in np.unique(dr.t_star[dr.t_star >= 0])]
        drew = False
        for i, g in enumerate(groups):
            rows = _rows_of(a, dr.domain, g)
            dist = _col(rows, "path_text")
            col = colors[i % len(colors)]
            if np.isfinite(dist).any():
                ax.plot(d.steps, dist, "o-", color=col, label=g, lw=2 if g == "memorized" else 1)
                drew = True
            ax2.plot(d.steps, _col(rows, "loss_mean"), "--", color=col, lw=1)
        mem = _rows_of(a, dr.domain, "memorized")
        sat = mem[-1] if mem else {}
        ax.set_title(f"{dr.domain} (last: {cell_text(sat.get('kept_per_layer'))} of {d.num_experts} experts "
                     "kept/layer)", fontsize=9)
        if drew:
            ax.legend(fontsize=7)
            return (f"{dr.domain}: memorized-sample distance {_change(_col(mem, 'path_text'))} while their "
                    f"loss goes {_change(_col(mem, 'loss_mean'))} (saturated at the last checkpoint: "
                    f"{cell_text(sat.get('saturated'))})")
        why = next((r.get("path_text") for r in mem if isinstance(r.get("path_text"), str)),
                   dr.mem_note or "n/a: no memorized samples")
        _na_text(ax, str(why))
        return f"{dr.domain}: distance {why}"

    return _per_domain(a, path, "Pathway distance (text, solid) vs probe loss (dashed) per group",
                       "mean pairwise pathway distance", panel)


def fig_layerwise(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data

    def panel(ax, dr: DomainResult) -> str | None:
        ax.set_title(dr.domain)
        rows = [r for r in a.layer_rows if r["domain"] == dr.domain and r["group"] == "memorized"]
        if not rows:
            _na_text(ax, "n/a: no layer-wise distances (no memorized pairs or pathways unavailable)")
            return f"{dr.domain}: n/a"
        drops = []
        for layer in sorted({r["layer"] for r in rows}):
            v = np.full(len(d.steps), NAN)
            for r in rows:
                if r["layer"] == layer:
                    v[r["checkpoint"]] = cell_number(r["distance"])
            ax.plot(d.steps, v, "o-", label=f"layer {layer}")
            f = v[np.isfinite(v)]
            if f.size:
                drops.append((f[-1] - f[0], layer, _change(v)))
        ax.legend(fontsize=7)
        if not drops:
            return None
        ch, layer, txt = min(drops)
        return (f"{dr.domain}: the largest fall is in layer {layer} ({txt})" if ch < 0 else
                f"{dr.domain}: no layer's distance falls (smallest rise: layer {layer}, {txt})")

    return _per_domain(a, path, "Layer-wise pathway distance of memorized samples",
                       "mean pairwise distance in the layer", panel)


def fig_consistency(a: Analysis, path: Path) -> tuple[Path, str]:
    d = a.data

    def panel(ax, dr: DomainResult) -> str:
        ax.set_title(dr.domain)
        rows = _rows_of(a, dr.domain, "memorized")
        S, R = _col(rows, "S_mean"), _col(rows, "R_mean")
        if not (np.isfinite(S).any() or np.isfinite(R).any()):
            why = a.consistency_note or dr.mem_note or "n/a: no memorized samples"
            _na_text(ax, why)
            return f"{dr.domain}: {why}"
        ax.plot(d.steps, S, "o-", label="S (consistency)")
        ax.plot(d.steps, R, "^-", label="R (raw mean cosine)")
        ax.legend(fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(d.steps, _col(rows, "loss_mean"), "k--", lw=1)
        ax2.set_ylabel("mean probe loss (dashed)")
        n_na = int(np.nansum(_col(rows, "S_n_na")))
        return (f"{dr.domain}: R {_change(R)}, S {_change(S)} ({n_na} sample-checkpoints with S n/a) while "
                f"loss goes {_change(_col(rows, 'loss_mean'))}")

    return _per_domain(a, path, "Consistency of memorized samples vs their probe loss", "consistency (S, R)", panel)


FIGURES = (  # (file name, caption in report.md, drawing function)
    ("memorized_vs_accuracy.png", "Memorized samples vs test accuracy", fig_memorized_vs_accuracy),
    ("lag.png", "Train@p → Test@q and the grokking lag", fig_lag),
    ("distance_vs_loss.png", "Pathway distance vs training loss per group", fig_distance_vs_loss),
    ("layerwise_distance.png", "Layer-wise pathway distance", fig_layerwise),
    ("consistency_vs_loss.png", "Consistency vs loss", fig_consistency),
)


def write_figures(a: Analysis, fig_dir: Path) -> dict[str, tuple[Path, str, str]]:
    """file name -> (path, one sentence of reading, caption) for every figure in :data:`FIGURES`."""
    return {name: (*fn(a, fig_dir / name), title) for name, title, fn in FIGURES}
