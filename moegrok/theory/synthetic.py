"""The synthetic check of METHOD §7 (the paper's Appendix C.4, then beyond).

A one-layer MoE ``F(x) = Σ_k g_k(x) f_k(x)`` with E ReLU experts (NTK parameterisation) and a frozen softmax router,
on d-dimensional inputs drawn from C Gaussian clusters.

Router: expert k belongs to cluster ``k mod C``; its router row is ``normalise(α·μ_{k mod C} + (1−α)·v_k)`` with v_k
a random unit vector, so α = 0 is a random router and α = 1 a cluster-aligned one. Logits are divided by their
standard deviation on the training inputs (so the temperature T alone sets sharpness, whatever α) and by T.

Target: ``f*(x) = b_c + s·⟨β_c, ξ⟩`` for ``x = μ_c + spread·ξ/√d`` (a cluster offset plus a cluster-specific linear
function), labels ``y = f*(x) + N(0, σ²)``.

Three studies:
1. sweep: for every seed and (α, T), the routing kernel of the experts at initialisation, its d_eff, the bound's
   terms, kernel ridge regression with H (in-sample and held-out excess risk), and the pathway distance (METHOD §4).
2. training: the finite network trained by full-batch GD (optax SGD with Nesterov momentum) on
   ``½Σ(F − y)² + ½λ‖θ − θ0‖²``, whose linearisation at θ0 is exactly kernel ridge regression with H, at several
   widths; compared with KRR (the converged linearised predictor) and with the linearised model run through the same
   optimizer for the same steps (isolates the non-linearity from unfinished optimisation).
3. the bound: every (measured excess risk, bound) pair, with every violation listed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import numpy as np

from moegrok.analysis import pathways
from moegrok.theory._blas import single_threaded_blas
from moegrok.theory.kernel import (TheoryError, complexity_bound, effective_dimension, kernel_ridge_fit,
                                   kernel_spectrum, relative_lambda, routing_cross_kernel, routing_kernel)
from moegrok.theory.ntk import ReluExperts, init_relu_experts, moe_apply, relu_expert_kernels


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    n: int = 200  # training samples
    n_test: int = 200  # held-out samples for the excess risk
    dim: int = 100
    num_experts: int = 16
    num_clusters: int = 4
    cluster_spread: float = 0.5  # ‖x − μ_c‖ ≈ spread, with ‖μ_c‖ = 1
    within_scale: float = 0.5  # weight of the within-cluster linear part of f*
    noise_std: float = 0.3  # σ
    width: int = 256  # expert width for the routing sweep
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    temperatures: tuple[float, ...] = (3.0, 1.0, 0.3, 0.1)
    seeds: int = 20
    lam: float = 0.1  # ridge λ of the bound, of KRR and of training (absolute)
    lam_rel: float = 0.1  # second d_eff column at λ = lam_rel · Tr(H)/n (spectral shape, not scale)
    tau: float = 0.7
    delta: float = 0.05
    C1: float = 1.0
    C2: float = 1.0
    train_widths: tuple[int, ...] = (64, 256, 1024)
    train_seeds: int = 2  # the first seeds also run the training study
    train_routings: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 0.1), (1.0, 0.1))  # (α, T)
    train_steps: int = 3000  # at most; fewer once the linearised model is within opt_tol of its optimum
    opt_tol: float = 1e-3
    momentum: float = 0.9
    lr_scale: float = 1.0  # learning rate = lr_scale / (μ_max(H) + λ)
    chunk_size: int = 128

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SyntheticConfig":
        """The rules, applied when the config is built (and again if called)."""
        checks = [
            (self.n >= 2, "n must be >= 2 (pathway distance needs pairs)"),
            (self.n_test >= 1, "n_test must be >= 1"),
            (self.dim >= 1 and self.num_experts >= 1 and self.num_clusters >= 1, "dim, experts, clusters >= 1"),
            (self.seeds >= 1, "seeds must be >= 1"),
            (0 <= self.train_seeds <= self.seeds, "train_seeds must be in [0, seeds]"),
            (all(0.0 <= a <= 1.0 for a in self.alphas) and self.alphas, "alphas must be non-empty, in [0, 1]"),
            (all(t > 0 for t in self.temperatures) and self.temperatures, "temperatures must be non-empty, > 0"),
            (all(0.0 <= a <= 1.0 and t > 0 for a, t in self.train_routings), "train_routings: α in [0,1], T > 0"),
            (self.lam > 0, "lam must be > 0 (training and the bound use it)"),
            (self.lam_rel >= 0 and self.noise_std >= 0, "lam_rel and noise_std must be >= 0"),
            (0 < self.tau <= 1 and 0 < self.delta < 1, "tau in (0, 1], delta in (0, 1)"),
            (all(w >= 2 and w % 2 == 0 for w in (self.width, *self.train_widths)), "widths must be even, >= 2"),
            (self.train_steps >= 1 and 0 <= self.momentum < 1, "train_steps >= 1, momentum in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TheoryError(f"synthetic config: {msg}")
        return self


# --- data and router --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    means_CxD: np.ndarray
    V_ExD: np.ndarray  # random router directions
    X_NxD: np.ndarray
    y_N: np.ndarray
    f_N: np.ndarray  # f*(x) on the training inputs
    Xt_MxD: np.ndarray
    ft_M: np.ndarray


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-300)


def make_task(cfg: SyntheticConfig, seed: int) -> Task:
    rng = np.random.default_rng([seed, 0])
    C, d = cfg.num_clusters, cfg.dim
    means = _unit_rows(rng.standard_normal((C, d)))
    beta = _unit_rows(rng.standard_normal((C, d)))
    offset = rng.standard_normal(C)
    V = _unit_rows(rng.standard_normal((cfg.num_experts, d)))

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, C, m)
        xi = rng.standard_normal((m, d))
        x = means[c] + cfg.cluster_spread * xi / math.sqrt(d)
        f = offset[c] + cfg.within_scale * np.einsum("md,md->m", beta[c], xi)
        return x, f

    X, f = draw(cfg.n)
    Xt, ft = draw(cfg.n_test)
    y = f + cfg.noise_std * rng.standard_normal(cfg.n)
    return Task(means_CxD=means, V_ExD=V, X_NxD=X, y_N=y, f_N=f, Xt_MxD=Xt, ft_M=ft)


def router_rows(task: Task, alpha: float) -> np.ndarray:
    E, C = task.V_ExD.shape[0], task.means_CxD.shape[0]
    aligned = task.means_CxD[np.arange(E) % C]
    return _unit_rows(alpha * aligned + (1.0 - alpha) * task.V_ExD)


def routing(task: Task, alpha: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax routing weights ``(g_train [n, E], g_test [m, E])`` of the frozen router (α, T)."""
    R = router_rows(task, alpha)
    logits_tr, logits_te = task.X_NxD @ R.T, task.Xt_MxD @ R.T
    scale = max(float(logits_tr.std()), 1e-12) * temperature

    def softmax(z: np.ndarray) -> np.ndarray:
        z = z / scale
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return softmax(logits_tr), softmax(logits_te)


def routing_stats(g_NxE: np.ndarray, tau: float) -> dict[str, float]:
    """Pathway distance (text and expert encodings, normalised) and the saturation diagnostics of METHOD §4."""
    p = g_NxE[:, None, :]  # one MoE layer
    sat = pathways.saturation(p, tau=tau)
    return {
        "path_dist_text": pathways.pathway_distance(p, tau=tau, encoding="text").mean_normalised,
        "path_dist_expert": pathways.pathway_distance(p, tau=tau, encoding="expert").mean_normalised,
        "mean_kept": sat.mean_kept,
        "top1_weight": float(sat.top1_weight_L[0]),
        "entropy": float(sat.entropy_L[0]),
    }


# --- study 1: the routing sweep ---------------------------------------------------------------------------------


def _excess(pred: np.ndarray, f: np.ndarray) -> float:
    return float(np.mean((pred - f) ** 2))


def kernel_rows(cfg: SyntheticConfig, task: Task, K_tr: np.ndarray, K_te: np.ndarray, g_tr: np.ndarray,
                g_te: np.ndarray) -> dict[str, Any]:
    """d_eff, bound terms and KRR excess risk for one routing (everything at absolute λ = cfg.lam)."""
    H = routing_kernel(g_tr, K_tr)
    spec = kernel_spectrum(H)
    n = cfg.n
    lam_rel_abs = relative_lambda(H, cfg.lam_rel)
    bound = complexity_bound(spec, task.y_N, cfg.lam, cfg.noise_std ** 2, cfg.delta, cfg.C1, cfg.C2)
    alpha = kernel_ridge_fit(spec, task.y_N, cfg.lam)
    pred_tr = H @ alpha
    pred_te = routing_cross_kernel(g_te, g_tr, K_te) @ alpha
    ex_in, ex_out = _excess(pred_tr, task.f_N), _excess(pred_te, task.ft_M)
    return {
        "trace_over_n": float(np.trace(H)) / n,
        "mu_max": float(spec.mu[-1]),
        "d_eff": bound.d_eff,
        "d_eff_norm": bound.d_eff / n,
        "lam_rel_value": lam_rel_abs,
        "d_eff_rel_norm": effective_dimension(spec, lam_rel_abs) / n,
        **{f"bound_{k}": v for k, v in bound.as_dict().items() if k not in ("n", "d_eff")},
        "excess_in_sample": ex_in,
        "excess_held_out": ex_out,
        "violated_in_sample": ex_in > bound.total,
        "violated_held_out": ex_out > bound.total,
    }


def sweep_seed(cfg: SyntheticConfig, seed: int) -> list[dict[str, Any]]:
    task = make_task(cfg, seed)
    experts = init_relu_experts(np.random.default_rng([seed, 1]), cfg.num_experts, cfg.width, cfg.dim)
    K_tr = relu_expert_kernels(experts, task.X_NxD, chunk_size=cfg.chunk_size)
    K_te = relu_expert_kernels(experts, task.Xt_MxD, task.X_NxD, chunk_size=cfg.chunk_size)
    rows = []
    for a in cfg.alphas:
        for t in cfg.temperatures:
            g_tr, g_te = routing(task, a, t)
            rows.append({"seed": seed, "alpha": a, "temperature": t, "width": cfg.width,
                         **routing_stats(g_tr, cfg.tau), **kernel_rows(cfg, task, K_tr, K_te, g_tr, g_te)})
    return rows


# --- study 2: trained networks vs the kernel predictor ----------------------------------------------------------


def _sgd(lr: float, momentum: float):
    import optax

    return optax.sgd(learning_rate=lr, momentum=momentum or None, nesterov=momentum > 0)


@functools.cache
def _train_fn(momentum: float) -> Callable:
    import jax
    import jax.numpy as jnp
    import optax

    def run(params0, g, X, y, lam, lr, steps):
        opt = _sgd(lr, momentum)

        def loss(p):
            r = moe_apply(p, g, X) - y
            reg = sum(jnp.sum((a - b) ** 2) for a, b in zip(p, params0))
            return 0.5 * jnp.dot(r, r) + 0.5 * lam * reg

        def step(_, carry):
            p, s = carry
            upd, s = opt.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, upd), s

        # A traced step count (a while loop) compiles once per shape, whatever number of steps each run needs.
        p, _ = jax.lax.fori_loop(0, steps, step, (params0, opt.init(params0)))
        return p, loss(p)

    return jax.jit(run)


@functools.cache
def _dual_fn(steps: int, momentum: float) -> Callable:
    import jax
    import jax.numpy as jnp
    import optax

    # The linearised model keeps θ − θ0 = Jᵀc, and its parameter gradient is Jᵀ(Hc − y + λc): every linear
    # optimizer (SGD, momentum, Nesterov) therefore runs exactly on c with that "gradient".
    def run(H, y, lam, lr):
        opt = _sgd(lr, momentum)

        def step(carry, _):
            c, s = carry
            upd, s = opt.update(H @ c - y + lam * c, s, c)
            c = optax.apply_updates(c, upd)
            return (c, s), c

        c0 = jnp.zeros_like(y)
        _, cs = jax.lax.scan(step, (c0, opt.init(c0)), None, length=steps)
        return cs

    return jax.jit(run)


def train_network(experts: ReluExperts, g_NxE: np.ndarray, X_NxD: np.ndarray, y_N: np.ndarray, lam: float,
                  lr: float, steps: int, momentum: float) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """Full-batch GD on ``½Σ(F − y)² + ½λ‖θ − θ0‖²`` in float32; returns the trained (W, a) and the final loss."""
    import jax.numpy as jnp

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    p, loss = _train_fn(float(momentum))((f32(experts.W), f32(experts.a)), f32(g_NxE), f32(X_NxD), f32(y_N),
                                         f32(lam), f32(lr), jnp.int32(steps))
    if not np.isfinite(float(loss)):
        raise TheoryError(f"network training diverged (loss {float(loss)}) at lr {lr:.3g}: lower lr_scale")
    return (np.asarray(p[0], np.float64), np.asarray(p[1], np.float64)), float(loss)


def linearised_gd(H: np.ndarray, y_N: np.ndarray, lam: float, lr: float, steps: int, momentum: float) -> np.ndarray:
    """Dual coefficients ``c_t [steps, n]`` after each step of the same optimizer on the linearised model (f64)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        cs = _dual_fn(int(steps), float(momentum))(jnp.asarray(H), jnp.asarray(y_N), jnp.float64(lam),
                                                    jnp.float64(lr))
        return np.asarray(cs)


def steps_to_converge(H: np.ndarray, cs_TxN: np.ndarray, alpha_N: np.ndarray, tol: float) -> tuple[int, bool]:
    """First step at which the linearised in-sample predictor is within `tol` (relative) of the KRR optimum."""
    target = H @ alpha_N
    gaps = np.linalg.norm(cs_TxN @ H - target, axis=1) / max(float(np.linalg.norm(target)), 1e-300)
    hit = np.flatnonzero(gaps <= tol)
    return (int(hit[0]) + 1, True) if hit.size else (cs_TxN.shape[0], False)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / nb if nb > 0 else float(np.linalg.norm(a - b))


def train_run(cfg: SyntheticConfig, seed: int, width: int, alpha: float, temperature: float,
              task: Task | None = None) -> dict[str, Any]:
    task = task or make_task(cfg, seed)
    experts = init_relu_experts(np.random.default_rng([seed, 2, width]), cfg.num_experts, width, cfg.dim)
    g_tr, g_te = routing(task, alpha, temperature)
    K_tr = relu_expert_kernels(experts, task.X_NxD, chunk_size=cfg.chunk_size)
    K_te = relu_expert_kernels(experts, task.Xt_MxD, task.X_NxD, chunk_size=cfg.chunk_size)
    H = routing_kernel(g_tr, K_tr)
    spec = kernel_spectrum(H)
    Theta_te = routing_cross_kernel(g_te, g_tr, K_te)
    lr = cfg.lr_scale / (float(spec.mu[-1]) + cfg.lam)

    alpha_krr = kernel_ridge_fit(spec, task.y_N, cfg.lam)
    krr_tr, krr_te = H @ alpha_krr, Theta_te @ alpha_krr
    cs = linearised_gd(H, task.y_N, cfg.lam, lr, cfg.train_steps, cfg.momentum)
    steps, converged = steps_to_converge(H, cs, alpha_krr, cfg.opt_tol)
    c = cs[steps - 1]
    lin_tr, lin_te = H @ c, Theta_te @ c
    params, loss = train_network(experts, g_tr, task.X_NxD, task.y_N, cfg.lam, lr, steps, cfg.momentum)
    net_tr = np.asarray(moe_apply(params, g_tr, task.X_NxD), np.float64)
    net_te = np.asarray(moe_apply(params, g_te, task.Xt_MxD), np.float64)
    bound = complexity_bound(spec, task.y_N, cfg.lam, cfg.noise_std ** 2, cfg.delta, cfg.C1, cfg.C2)
    ex = {f"excess_{who}_{where}": _excess(pred, f)
          for who, (ptr, pte) in {"net": (net_tr, net_te), "krr": (krr_tr, krr_te)}.items()
          for where, pred, f in (("in_sample", ptr, task.f_N), ("held_out", pte, task.ft_M))}
    return {
        "seed": seed, "alpha": alpha, "temperature": temperature, "width": width, "steps": steps,
        "linearised_converged": converged, "lr": lr, "final_loss": loss,
        "gap_net_vs_krr_held_out": _rel(net_te, krr_te),
        "gap_net_vs_krr_in_sample": _rel(net_tr, krr_tr),
        "gap_net_vs_lin_same_steps": _rel(net_te, lin_te),
        "gap_lin_same_steps_vs_krr": _rel(lin_te, krr_te),  # optimisation left unfinished
        "d_eff_norm": bound.d_eff / cfg.n,
        **{f"bound_{k}": v for k, v in bound.as_dict().items() if k not in ("n", "d_eff")},
        **ex,
        **{f"violated_{k[7:]}": v > bound.total for k, v in ex.items()},
    }


# --- the whole study --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticResult:
    sweep: list[dict[str, Any]]
    training: list[dict[str, Any]]


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


def run_synthetic(cfg: SyntheticConfig, progress: bool = False) -> SyntheticResult:
    cfg.validate()
    with single_threaded_blas():
        return _run_synthetic(cfg, progress)


def _run_synthetic(cfg: SyntheticConfig, progress: bool) -> SyntheticResult:
    sweep: list[dict[str, Any]] = []
    for seed in _progress(range(cfg.seeds), cfg.seeds, "theory sweep (seeds)", progress):
        sweep.extend(sweep_seed(cfg, seed))
    jobs = [(s, w, a, t) for s in range(cfg.train_seeds) for w in cfg.train_widths for a, t in cfg.train_routings]
    training = []
    tasks: dict[int, Task] = {}
    for s, w, a, t in _progress(jobs, len(jobs), "theory training (runs)", progress):
        task = tasks.setdefault(s, make_task(cfg, s))
        training.append(train_run(cfg, s, w, a, t, task))
    return SyntheticResult(sweep=sweep, training=training)
