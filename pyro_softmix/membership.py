# SPDX-License-Identifier: Apache-2.0
"""Class membership that depends on covariates of the groups (concomitant variables).

With grouped data and covariates c_g (d,) per group, group g's class shares are
softmax(Gamma c_g) with Gamma (K, d) and its last row held at 0 (the reference class), instead of
one alpha for all groups (Dayton and Macready 1988; flexmix's "concomitant" model, the
"class-membership model" of latent-class logit packages). The log-likelihood is

    sum_g log sum_k softmax(Gamma c_g)_k prod_j q_k(j)^{n_gj}.

EM: the E-step gives r_gk = P(k | group g); the atoms' M-step is the grouped one (weights
w_jk = sum_g n_gj r_gk, one damped Newton step per component); Gamma's M-step is a multinomial
logit of the soft labels r on the covariates, by the damped Newton solver the gate of a mixture of
experts uses (:func:`~pyro_softmix.fit_multinomial_logit`). Each step raises its part of the EM
surrogate, so the log-likelihood never decreases. EM starts from the fit without covariates
(every group at the same shares alpha): with an intercept column alone it is already the fixed
point, and the two fits coincide.
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import as_tensor, warn_user
from .engine import EM_MAX_STEP, GroupedEMProblem
from .solvers import fit_multinomial_logit, softmax_newton_step
from .stopping import ConvergenceWarning, StoppingRule, check_finite

__all__ = ["check_group_features", "fit_membership"]


def check_group_features(group_features: Any, num_groups: int | None, *,
                         any_rows: bool = False) -> torch.Tensor | None:
    """(G, d) float64 covariates of ``num_groups`` groups (any number with ``any_rows``; None
    passes through)."""
    if group_features is None:
        return None
    if num_groups is None and not any_rows:
        raise ValueError("group_features= needs grouped data (groups=): covariates describe "
                         "the groups whose draws share one component")
    c = as_tensor(group_features, "group_features")
    if c.dtype == torch.bool:
        raise TypeError(f"group_features must be real numbers, got dtype {c.dtype}")
    if c.dim() == 1:
        c = c[:, None]
    rows = c.shape[0] if any_rows and c.dim() == 2 else num_groups
    if c.dim() != 2 or c.shape[0] != rows or c.shape[1] < 1:
        raise ValueError(f"group_features must have shape ({rows or 'G'}, d): one row per "
                         f"group (in the order of the sorted group ids), got {tuple(c.shape)}")
    c = c.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("group_features contains NaN or infinite values")
    return c


def fit_membership(problem: GroupedEMProblem, atoms: torch.Tensor, log_weights: torch.Tensor,
                   group_features: torch.Tensor, max_iter: int, tol: float, bar=None):
    """EM for atoms (K, r) and Gamma (K, d) from a fit without covariates (atoms, log_weights).

    The E-step is the grouped engine's, with one set of shares per group, and the atoms' step
    its Newton step on the engine's buffers (one start). Returns ``(atoms, gamma, log_shares
    (G, K), history, converged)``; the history holds the log-likelihood at the start and after
    every iteration.
    """
    z = problem.z
    c = group_features.to(z)
    k = atoms.shape[0]
    st = problem.start(atoms, log_weights)
    if k == 1:  # one class: every share is 1 and there is nothing to regress
        return atoms, c.new_zeros(1, c.shape[1]), c.new_zeros(c.shape[0], 1), [
            float(st.loglik[0])], True
    logits, lse = st.logits, st.lse  # the workspace holds their softmax
    # Gamma's start: the M-step for the current responsibilities (exactly log alpha_k - log
    # alpha_K in the intercept's coefficient when the covariates are an intercept alone).
    gamma = fit_multinomial_logit(c, problem.group_resp).atoms
    log_shares = torch.log_softmax(c @ gamma.T, 1)
    loglik, w = problem.e_step(logits, lse, log_shares)
    history = [float(loglik[0])]
    rule, converged = StoppingRule(tol), False
    for _ in range(max_iter):
        resp = problem.group_resp
        atoms, logits, lse, _ = softmax_newton_step(z, w, atoms, logits, problem.workspace, lse,
                                                    max_step=EM_MAX_STEP, offset=problem.offset)
        gamma = fit_multinomial_logit(c, resp, init=gamma, max_steps=1).atoms
        log_shares = torch.log_softmax(c @ gamma.T, 1)
        loglik, w = problem.e_step(logits, lse, log_shares)
        history.append(float(loglik[0]))
        check_finite(history[-1:], "the EM objective with covariates")
        if bar is not None:
            bar.update(1)
        rule.record(max(history[-1] - history[-2], 0.0))
        if rule.converged(history[-1]):
            converged = True
            break
    if not converged:
        warn_user(f"EM with group_features did not converge in max_iter={max_iter} "
                  "iterations; increase max_iter", ConvergenceWarning)
    return atoms, gamma, log_shares, history, converged
