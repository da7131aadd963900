"""Files of ``moegrok theory run``: per-checkpoint table, correlations across checkpoints, figures, theory.md."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from moegrok.theory.fromrun import KERNELS, RunTheoryConfig, run_theory_rows
from moegrok.rundir import write_text
from moegrok.tables import NA, pyplot, write_csv
from moegrok.theory.report import corr_text, correlation

TARGETS = ("path_dist", "path_dist_layer", "accuracy", "step")


def _num(v: Any) -> float:
    return float(v) if not isinstance(v, str) and v is not None else float("nan")


def by_group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list] = defaultdict(list)
    for r in rows:
        out[r["group"]].append(r)
    return {g: sorted(rs, key=lambda r: r["step"]) for g, rs in out.items()}


def correlation_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Across checkpoints, per group: each d_eff against pathway distance, accuracy and the step itself (a metric
    that only drifts with training time correlates with the step as well), raw and on first differences."""
    out = []
    for group, rs in by_group(rows).items():
        for kind in KERNELS:
            x = np.array([_num(r[f"d_eff_{kind}_norm"]) for r in rs])
            for target in TARGETS:
                y = np.array([_num(r[target]) for r in rs])
                out.append({"group": group, "x": f"d_eff_{kind}_norm", "y": target, "kind": "raw",
                            **correlation(x, y)})
                if target != "step":
                    out.append({"group": group, "x": f"d_eff_{kind}_norm", "y": target,
                                "kind": "first differences", **correlation(np.diff(x), np.diff(y))})
    return out


def _figures(rows: list[dict[str, Any]], out: Path) -> list[str]:
    plt = pyplot()
    names = []
    for group, rs in by_group(rows).items():
        steps = [r["step"] for r in rs]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for kind in KERNELS:
            ax.plot(steps, [_num(r[f"d_eff_{kind}_norm"]) for r in rs], "o-", label=f"d_eff/n ({kind} kernel)")
        ax.plot(steps, [_num(r["path_dist"]) for r in rs], "s--", label="pathway distance (normalised)")
        ax.set_xlabel("training step")
        ax.set_ylabel("d_eff / n, normalised pathway distance")
        ax2 = ax.twinx()
        ax2.plot(steps, [_num(r["accuracy"]) for r in rs], "k^:", label="test accuracy")
        ax2.set_ylabel("test accuracy")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
        ax.set_title(f"Routing-kernel effective dimension over training — {group}")
        fig.tight_layout()
        name = f"fig_run_{_safe(group)}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def write_run(rows: list[dict[str, Any]], cfg: RunTheoryConfig, run_dir: str | Path, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corr = correlation_rows(rows)
    write_csv(out / "run_kernel.csv", rows)
    write_csv(out / "run_correlations.csv", corr)
    figs = _figures(rows, out)
    write_text(out / "theory.md", _markdown(rows, corr, cfg, run_dir, figs))
    return {"rows": len(rows), "correlations": corr}


def _markdown(rows, corr, cfg: RunTheoryConfig, run_dir, figs) -> str:
    layer = rows[0]["layer"] if rows else NA
    lam = f"λ = {cfg.lam:g} (absolute)" if cfg.lam is not None else f"λ = {cfg.lam_rel:g}·Tr(H)/n (relative)"
    L = [f"# Routing kernel of run `{run_dir}`", "",
         f"g = `route_probs` (token-mean full router softmax) at MoE layer {layer}; {lam}; pathway distance: τ = "
         f"{cfg.tau:g}, {cfg.encoding} encoding, normalised, over all pairs of probe samples of the group (all "
         f"layers: `path_dist`; layer {layer} alone: `path_dist_layer`).", "",
         "Expert kernels (the record has no expert parameters, so the experts' own NTK cannot be evaluated):",
         "- **constant**: K_k ≡ 1 (expert = learnable constant), H = G Gᵀ: pure expert sharing between samples.",
         "- **embedding**: linear experts on the routing embedding e_i = Σ_k g_ik W[k], H = (G Gᵀ)∘(Z Zᵀ).", "",
         "Correlations across checkpoints (Pearson and Spearman, p-values, n; first differences remove shared "
         "trends; the correlation with the step shows how much is plain drift with training time):", "",
         "| group | d_eff | against | kind | result |", "|---|---|---|---|---|"]
    for c in corr:
        L.append(f"| {c['group']} | {c['x']} | {c['y']} | {c['kind']} | {corr_text(c)} |")
    L += [""] + [f"![d_eff, pathway distance and accuracy over training]({f})" for f in figs]
    L += ["", "Caveat: with few checkpoints these correlations are fragile (measured before this project: r = "
          "+0.96 on 6 checkpoints became +0.33 on 12); read n and p (with n <= 4 the p-values of asymptotic formulas mean little).", "",
          "Files: `run_kernel.csv` (one row per checkpoint and group), "
          "`run_correlations.csv`, " + ", ".join(f"`{f}`" for f in figs) + ".", ""]
    return "\n".join(L)


def run_theory(run_dir: str | Path, out_dir: str | Path | None = None, cfg: RunTheoryConfig | None = None, *,
               progress: bool = False) -> dict[str, Any]:
    """Compute the per-checkpoint table and write ``run_kernel.csv``, ``run_correlations.csv``, figures and
    ``theory.md`` into `out_dir` (default ``RUN_DIR/theory``). Returns ``{"rows", "correlations"}``."""
    cfg = cfg or RunTheoryConfig()
    rows = run_theory_rows(run_dir, cfg, progress=progress)
    return write_run(rows, cfg, run_dir, Path(out_dir) if out_dir is not None else Path(run_dir) / "theory")
