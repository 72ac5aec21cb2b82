# SPDX-License-Identifier: Apache-2.0
"""The algorithms of :class:`~pyro_softmix.MixtureOfExperts`, as functions: starts, the
likelihood, EM (E-step, M-step, the run) and the gradient baselines.

``spec`` is the estimator (its ``num_experts``, ``expert``, ``noise``, ``l2`` and ``min_noise``
configure the model); ``params`` holds the internal parameters ``"gate"`` (K, d_g, last row 0),
``"experts"`` (K, d_x) and, for linear experts, ``"scale"`` (K,).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch

from ._checks import as_tensor
from .solvers import (
    damped_newton,
    fit_logistic_regression,
    logistic_objective,
    multinomial_objective,
    newton_direction,
    weighted_least_squares,
)
from .stopping import StoppingRule, next_run, progress_bar

_LOG_2PI = math.log(2 * math.pi)


def bad_init(got: str) -> str:
    """The message for an unusable ``init`` (``got``: its repr, or its type's name)."""
    return (f"init must be 'auto', 'random', 'kmeans', a fitted MixtureOfExperts or a mapping, "
            f"got {got}")


def noise_floor(spec, y: torch.Tensor) -> float:
    return spec.min_noise * max(float(y.std()), 1e-12) if y.numel() > 1 else spec.min_noise


def start_params(spec, init: str, xe, xg, y, gen) -> dict[str, torch.Tensor]:
    k, n = spec.num_experts, xe.shape[0]
    col_sd = xe.std(0)
    col_sd = torch.where(col_sd > 0, col_sd, torch.ones_like(col_sd))
    if init == "random":
        noise = torch.randn(k, xe.shape[1], generator=gen, dtype=torch.float64).to(xe)
        gate = 0.1 * torch.randn(k, xg.shape[1], generator=gen, dtype=torch.float64).to(xe)
        gate = gate - gate[-1:]
        ones = torch.ones(n, 1, dtype=xe.dtype, device=xe.device)
        if spec.expert == "linear":
            pooled = weighted_least_squares(xe, y, ones, l2=1e-8 * n)
            sd = max(float(y.std()), 1e-12)
            experts = pooled + noise * sd / (col_sd * math.sqrt(xe.shape[1]))
            return {"gate": gate, "experts": experts,
                    "scale": torch.full((k,), sd, dtype=xe.dtype, device=xe.device)}
        pooled = fit_logistic_regression(xe, y, ones, l2=max(spec.l2, 1e-3)).atoms
        experts = pooled + 2 * noise / (col_sd * math.sqrt(xe.shape[1]))
        return {"gate": gate, "experts": experts}
    if init == "kmeans":
        labels = kmeans(torch.cat([xe, y[:, None]], 1), k, gen)
        soft = 0.8 * torch.nn.functional.one_hot(labels, k).to(xe) + 0.2 / k
        return m_step(spec, xe, xg, y, soft, None, exact=True)
    raise ValueError(bad_init(repr(init)))


def log_joint(spec, params, xe, xg, y) -> torch.Tensor:
    """log P(z = k | x_i) + log p(y_i | x_i, z = k), shape (n, K); differentiable."""
    log_gate = torch.log_softmax(xg @ params["gate"].T, 1)
    eta = xe @ params["experts"].T
    if spec.expert == "linear":
        s = params["scale"]
        comp = -0.5 * ((y[:, None] - eta) / s) ** 2 - torch.log(s) - 0.5 * _LOG_2PI
    else:
        comp = y[:, None] * eta - torch.nn.functional.softplus(eta)
    return log_gate + comp


def penalty(spec, params) -> torch.Tensor:
    if not spec.l2:
        return params["experts"].new_zeros(())
    return 0.5 * spec.l2 * ((params["gate"] ** 2).sum() + (params["experts"] ** 2).sum())


def m_step(spec, xe, xg, y, resp, params, *, exact: bool = False, m_steps: int = 1,
            checked: bool = True, floor: float | None = None):
    """New parameters from responsibilities (n, K).

    Weighted least squares and the noise scales are exact; the logistic experts and the
    gate take ``m_steps`` Newton steps from ``params`` (run to convergence with ``exact``).
    ``checked`` steps are damped by Armijo backtracking, so each increases its block of
    the EM surrogate Q; unchecked ones are full Newton steps (cheaper; the caller checks the
    log-likelihood and redoes the step checked if it fell). ``floor`` is the noise-scale
    floor (computed from y when not given).
    """
    k = spec.num_experts
    steps = 100 if exact else m_steps
    checked = checked or exact
    weight = resp.sum(0)
    empty = weight <= 1e-12 * resp.shape[0]
    new: dict[str, torch.Tensor] = {}
    if spec.expert == "linear":
        # Given the current scales, the penalised weighted least squares is exact (an ECM
        # step); the scales are then exact given the new coefficients.
        scale = params["scale"] if params is not None and spec.l2 else None
        w = resp if scale is None else resp / scale**2
        coef = weighted_least_squares(xe, y, w, l2=spec.l2)
        resid2 = (y[:, None] - xe @ coef.T) ** 2
        if spec.noise == "shared":
            var = ((resp * resid2).sum() / resp.sum()).expand(k)
        else:
            var = (resp * resid2).sum(0) / weight.clamp_min(1e-300)
        floor = noise_floor(spec, y) if floor is None else floor
        new["scale"] = var.clamp_min(floor**2).sqrt()
        if params is not None:
            coef = torch.where(empty[:, None], params["experts"], coef)
            new["scale"] = torch.where(empty, params["scale"], new["scale"])
        new["experts"] = coef
    else:
        start = params["experts"] if params is not None else xe.new_zeros(k, xe.shape[1])
        new["experts"] = newton_steps(start, logistic_objective(xe, y, resp, spec.l2),
                                       steps, checked, weight + 1)
    if k == 1:
        new["gate"] = xg.new_zeros(1, xg.shape[1])
    else:
        start = (params["gate"][:-1] if params is not None
                 else xg.new_zeros(k - 1, xg.shape[1]))
        flat = newton_steps(start.reshape(1, -1), multinomial_objective(xg, resp, spec.l2),
                             steps, checked, xg.new_full((1,), resp.shape[0] + 1.0))
        new["gate"] = torch.cat([flat.view(k - 1, -1), xg.new_zeros(1, xg.shape[1])])
    return new


def objective(spec, params, xe, xg, y):
    """Responsibilities (n, K) and the penalised log-likelihood (one host sync)."""
    with torch.no_grad():
        lj = log_joint(spec, params, xe, xg, y)
        lse = torch.logsumexp(lj, 1, keepdim=True)
        # Accumulated in float64: a float32 sum over n terms is too coarse for the
        # stopping rule's increments.
        obj = float(lse.sum(dtype=torch.float64) - penalty(spec, params).double())
        return (lj - lse).exp_(), obj


def run_em(spec, params, xe, xg, y, max_iter, tol, m_steps, bar):
    floor = noise_floor(spec, y) if spec.expert == "linear" else None
    resp, obj = objective(spec, params, xe, xg, y)
    trace = Trace(obj, tol, bar, monotone=True)
    for _ in range(max_iter):
        new = m_step(spec, xe, xg, y, resp, params, m_steps=m_steps, checked=False,
                           floor=floor)
        resp_new, obj_new = objective(spec, new, xe, xg, y)
        if not obj_new >= obj:  # a full Newton step overshot (or NaN): redo it damped
            new = m_step(spec, xe, xg, y, resp, params, m_steps=m_steps, checked=True,
                               floor=floor)
            resp_new, obj_new = objective(spec, new, xe, xg, y)
        params, resp, obj = new, resp_new, obj_new
        if trace.record(obj):
            break
    return params, trace.history, trace.times, trace.converged


def run_gradient(spec, params, xe, xg, y, max_iter, tol, method, lr, bar):
    k = spec.num_experts
    free = {"gate": params["gate"][:-1].clone().requires_grad_(True),
            "experts": params["experts"].clone().requires_grad_(True)}
    if spec.expert == "linear":
        s = params["scale"] if spec.noise == "expert" else params["scale"][:1]
        free["log_scale"] = s.log().clone().requires_grad_(True)
    opt = (torch.optim.SGD if method == "gd" else torch.optim.Adam)(free.values(), lr=lr)
    n = xe.shape[0]
    floor = math.log(noise_floor(spec, y)) if spec.expert == "linear" else None

    def assemble():
        out = {"gate": torch.cat([free["gate"], xg.new_zeros(1, xg.shape[1])]),
               "experts": free["experts"]}
        if spec.expert == "linear":
            out["scale"] = free["log_scale"].clamp_min(floor).exp().expand(k)
        return out

    trace = None
    for _ in range(max_iter + 1):
        p = assemble()
        obj_t = torch.logsumexp(log_joint(spec, p, xe, xg, y), 1).sum() - penalty(spec, p)
        obj = float(obj_t.detach())
        if trace is None:
            trace = Trace(obj, tol, bar, monotone=False)
        elif trace.record(obj):
            break
        if len(trace.history) > max_iter or not math.isfinite(obj):
            break
        opt.zero_grad()
        (-obj_t / n).backward()
        opt.step()
    with torch.no_grad():
        final = {key: v.detach().clone() for key, v in assemble().items()}
    return final, trace.history, trace.times, trace.converged


def check_start(spec, init, xe, xg) -> dict[str, torch.Tensor]:
    """A user-given start (a fitted MixtureOfExperts or a mapping with ``gate_weights``,
    ``expert_weights`` and, for linear experts, ``noise_scale``) as internal parameters."""
    if not isinstance(init, Mapping) and hasattr(init, "expert_weights"):  # a fitted MoE
        init = {"gate_weights": init.gate_weights, "expert_weights": init.expert_weights,
                "noise_scale": init.noise_scale}
    if not isinstance(init, Mapping):
        raise TypeError(bad_init(type(init).__name__))
    k = spec.num_experts
    shapes = {"gate_weights": (k, xg.shape[1]), "expert_weights": (k, xe.shape[1])}
    if spec.expert == "linear":
        shapes["noise_scale"] = (k,)
    out = {}
    for name, shape in shapes.items():
        if init.get(name) is None:
            raise ValueError(f"init must have key {name!r} with shape {shape}")
        v = as_tensor(init[name], f"init {name}").to(xe)
        if name == "gate_weights" and v.shape == (k - 1, shape[1]):
            v = torch.cat([v, v.new_zeros(1, shape[1])])
        if name == "noise_scale" and v.numel() == 1:
            v = v.reshape(1).expand(k)
        if v.shape != shape:
            raise ValueError(f"init {name} must have shape {shape}, got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()) or (name == "noise_scale" and
                                                 bool((v <= 0).any())):
            raise ValueError(f"init {name} must be finite" +
                             (" and positive" if name == "noise_scale" else ""))
        out[name] = v.clone()
    gate = out["gate_weights"] - out["gate_weights"][-1:]  # same gate, last row 0
    params = {"gate": gate, "experts": out["expert_weights"]}
    if spec.expert == "linear":
        params["scale"] = out["noise_scale"]
    return params


def public_params(params) -> dict[str, torch.Tensor]:
    """Internal parameters under the estimator's attribute names."""
    out = {"gate_weights": params["gate"], "expert_weights": params["experts"]}
    if "scale" in params:
        out["noise_scale"] = params["scale"]
    return out


def fit_starts(spec, xe, xg, y, init, num_inits: int, gen: torch.Generator, method: str,
               max_iter: int, tol: float, m_steps: int, lr: float | None, progress):
    """Run ``method`` from every start of ``init`` and keep the best objective: returns
    ``(label, (params, history, times, converged))``."""
    if isinstance(init, str):
        if init == "auto":
            labels = ["kmeans"] + ["random"] * (num_inits - 1)
        elif init in ("random", "kmeans"):
            labels = [init] * num_inits
        else:
            raise ValueError(bad_init(repr(init)))
        starts = [start_params(spec, lab, xe, xg, y, gen) for lab in labels]
    else:
        labels, starts = ["given"], [check_start(spec, init, xe, xg)]
    best = None
    bar = progress_bar(progress, max_iter, f"MoE {method}")
    for i, (label, start) in enumerate(zip(labels, starts, strict=True)):
        next_run(bar, i, len(starts), max_iter, f"MoE {method}")
        if method == "em":
            run = run_em(spec, start, xe, xg, y, max_iter, tol, m_steps, bar)
        else:
            run = run_gradient(spec, start, xe, xg, y, max_iter, tol, method, lr, bar)
        if best is None or (math.isfinite(run[1][-1]) and not run[1][-1] <= best[1][1][-1]):
            best = (label, run)
    if bar is not None:
        bar.close()
    return best


class Trace:
    """Objective history, timings and progress bar of one run, stopped by the package's
    :class:`~pyro_softmix.stopping.StoppingRule` on the increments of the objective (EM is
    monotone; for a gradient method a loss of objective is an overshoot, not convergence).
    """

    def __init__(self, start: float, tol: float, bar, *, monotone: bool):
        self.history, self.times = [start], [0.0]
        self.rule = StoppingRule(tol, monotone=monotone)
        self.bar = bar
        self.converged = False
        self._t0 = time.perf_counter()

    def record(self, obj: float) -> bool:
        """Append one iteration's objective; True when the run should stop."""
        self.history.append(obj)
        self.times.append(time.perf_counter() - self._t0)
        self.rule.record(obj - self.history[-2])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(objective=f"{obj:.10g}", refresh=False)
        self.converged = self.rule.converged(obj)
        return self.converged


def newton_steps(params, evaluate, steps: int, checked: bool, scale) -> torch.Tensor:
    """Up to ``steps`` Newton ascent steps (damped if ``checked``), stopping once the predicted
    gain is negligible."""
    for i in range(steps):
        if checked:
            params, info = damped_newton(params, evaluate)
            gain = info.gain
        else:
            _, grad, hess = evaluate(params, True)
            direction = newton_direction(grad, hess)
            gain = (grad * direction).sum(-1)
            params = params + direction
        if i + 1 < steps and bool((gain <= 1e-12 * scale).all()):
            break
    return params


def kmeans(points: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Labels (n,) from Lloyd's k-means on standardised columns, k-means++ seeding."""
    sd = points.std(0)
    z = (points - points.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    n = z.shape[0]
    centres = [z[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(z, torch.stack(centres)).amin(1) ** 2
        probs = (d2 / d2.sum()).double().cpu() if float(d2.sum()) > 0 else torch.full((n,), 1 / n)
        centres.append(z[int(torch.multinomial(probs, 1, generator=gen))])
    c = torch.stack(centres)
    labels = torch.cdist(z, c).argmin(1)
    for _ in range(iters):
        one_hot = torch.nn.functional.one_hot(labels, k).to(z)
        size = one_hot.sum(0)
        c = torch.where(size[:, None] > 0, one_hot.T @ z / size.clamp_min(1)[:, None], c)
        new = torch.cdist(z, c).argmin(1)
        if bool((new == labels).all()):
            break
        labels = new
    return labels
