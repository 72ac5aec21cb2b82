# SPDX-License-Identifier: Apache-2.0
"""The EM engine for softmax mixtures on counts: its state, one iteration, grouped data, set-up.

With counts n (p,), N = sum n, components q_k = softmax(Z t_k) and weights alpha, one iteration is

    E-step   r_jk = alpha_k q_k(j) / pi_j,      w_jk = n_j r_jk,      W_k = sum_j w_jk
    M-step   alpha_k = W_k / N;   t_k <- one damped Newton step on sum_j w_jk log q_k(j)

The Newton step increases every component's M-step objective (Armijo), so the log-likelihood
sum_j n_j log pi_j never decreases (a generalised EM). Everything runs on the standardised design
z (see :mod:`pyro_softmix.design`); :mod:`pyro_softmix.accelerate` runs the iterations
(SQUAREM, the Newton finish) and :mod:`pyro_softmix.results` reports them in the user's
feature coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._checks import (
    as_tensor,
    check_counts,
    check_features,
    check_groups,
    check_mixing,
    check_num_components,
    check_offset,
    check_positive_float,
    check_positive_int,
    resolve_device,
    resolve_dtype,
)
from ._chunks import column_sums, ordered_sum, rows_per_chunk, weighted_sums
from ._gram import heavy_cov
from ._logprob import group_log_joint
from .design import Design, feature_scales, standardize
from .solvers import (
    Workspace,
    column_logsumexp,
    offset_logits,
    softmax_newton_step,
    stale_factor,
)

__all__ = ["EMProblem", "EMState", "GroupedEMProblem", "Setup", "prepare"]

#: Longest Newton step of an atom per EM iteration, in standardised coordinates (a trust region:
#: a step of length 1 changes a typical logit by about 1).
EM_MAX_STEP = 2.0
#: (rank r, n): explicit M-steps (where ``hessian_free`` is off) from rank r on share one
#: computation of the covariances (p r^2 K) between n consecutive M-steps, the later ones
#: quasi-Newton steps. With ``HESSIAN_FREE_RANK`` below 32 the defaults never use it.
COV_REUSE = ((32, 2), (64, 3))
#: From this rank on the M-steps are Hessian-free: conjugate gradients on Hessian-vector
#: products (two (p x r)(r x K) products each), preconditioned by the Hessian of the last M-step
#: that formed one; a new one is formed only after a solve that did not reach its tolerance.
#: Measured (fit_em defaults, 2 cores): 1.1-1.8x faster than explicit M-steps from r = 16 on
#: (p = 5,000..10^5, K = 3..8, and GloVe's 400,000 x 50 with K = 4 and 8), the same optima;
#: no difference at r = 5 and 8.
HESSIAN_FREE_RANK = 16
#: Largest float64 copy of a float32 design (bytes) made for the Newton finish (see
#: :meth:`EMProblem.precise`); beyond it the finish runs in float32.
PRECISE_MAX_BYTES = 2**32
#: From this size (bytes) of a float64 standardised design on, up to ``PRECISE_MAX_BYTES``,
#: ``fit_em`` (``accelerate=True``, ungrouped data) makes its starts and runs EM on the design
#: rounded to float32 (:meth:`Setup.float32_twin`): a float32 fit, float64 Newton finish
#: included (step for step that of the features passed as float32, where they are float32
#: numbers). It then goes on from that fit's end on the float64 design to its own tolerance.
#: SmolLM2 (p = 49,152, r = 576, K = 4, N = 10^6): 2.4-2.7x faster, and float32
#: and float64 features end at one optimum. Below this size the float32 products gained
#: 0.85-1.5x (bench_speed's regimes).
FLOAT32_SEARCH_BYTES = 2**26
#: Up to this many components the E-step works a column at a time (:meth:`EMProblem.e_step`).
#: Measured (p = 10^5, 4 starts): 1.3-2x faster E-steps for K = 2..4, slower from K = 6 on
#: (float64) and K = 16 (float32).
SMALL_K = 4


class EMProblem:
    """EM for S independent starts at once: the S K components are the columns of one problem.

    Start s owns columns s K .. s K + K - 1, so the logits of all starts come from one
    (p x r)(r x S K) product and the Newton steps of all components form one batch. With S = 1
    this is plain EM. ``penalty`` is None or an (r, r) precision matrix P of a Normal prior
    N(0, P^-1) on every atom (MAP-EM); the objective is then the log-likelihood minus
    0.5 sum_k t_k^T P t_k.
    """

    def __init__(self, z: torch.Tensor, counts: torch.Tensor, num_components: int,
                 chunk_size: int | None = None, num_starts: int = 1,
                 penalty: torch.Tensor | None = None, offset: torch.Tensor | None = None):
        self.z = z
        #: (p,) known term of every component's logits (None: zero), in z's dtype and device.
        self.offset = None if offset is None else offset.to(z)
        self.counts = counts.to(z)
        self.counts64 = counts.to(device=z.device, dtype=torch.float64)
        self.total = float(ordered_sum(self.counts64))
        self.num_components = num_components
        self.num_starts = num_starts
        self.chunk_size = chunk_size
        self.penalty = penalty
        cols = num_starts * num_components
        # Persistent buffers: the loop then makes no allocation of size p x S K.
        self.workspace = Workspace(z, cols, chunk_size)
        self.w = z.new_empty(z.shape[0], cols)
        self.rows = z.new_empty(z.shape[0], 2 * num_starts)
        #: The weights' M-step is alpha_k = weight_sums_k / weight_total (N here; G when grouped).
        self.weight_total = self.total
        self.weight_sums: torch.Tensor | None = None
        #: Rows with n_j > 0 (for the full Hessian of the Newton endgame; set on first use).
        self.support: torch.Tensor | None = None
        #: Whether the Newton endgame applies (the grouped likelihood has no full Hessian here).
        self.newton_capable = True
        #: M-steps that share one computation of the covariances of z under q (see m_step).
        self.cov_reuse = max((n for rank, n in COV_REUSE if z.shape[1] >= rank), default=1)
        self.cov, self.cov_age = None, 0
        self.hessian_free = z.shape[1] >= HESSIAN_FREE_RANK
        #: Hessian-free M-steps: Cholesky factors (S K, r, r) of earlier Hessians.
        self.factor: torch.Tensor | None = None
        self._precise: EMProblem | None = None
        #: The float64 copy of a float32 z (:meth:`precise`), made once and shared with every
        #: problem made from this one by :meth:`with_starts`.
        self._wide: dict[str, torch.Tensor] = {}
        #: On a float64 twin (:meth:`precise`): the float32 z it was made from, for the
        #: Newton-CG finish's Hessian-vector products (None otherwise).
        self.narrow_z: torch.Tensor | None = None

    def with_starts(self, num_starts: int, num_components: int | None = None) -> EMProblem:
        """The same data for another number of starts (and of components), fresh buffers."""
        other = EMProblem(self.z, self.counts64, num_components or self.num_components,
                          self.chunk_size, num_starts, self.penalty, self.offset)
        other._wide = self._wide
        return other

    def precise(self) -> EMProblem:
        """This problem in float64: ``self`` for a float64 problem, else a float64 twin on the
        same (float32-rounded) design, made once, where its copy of z fits
        ``PRECISE_MAX_BYTES`` (``self`` otherwise).

        The Newton finish of a float32 fit runs on the twin: a float32 gradient carries
        rounding noise of order eps32 N |logit|, a floor above the default tolerance on large
        problems, so float32 Newton steps stall there; in float64 they reach the optimum of the
        float32 design, which the fit then reports in float32.
        """
        if self.z.dtype == torch.float64 or self.z.numel() * 8 > PRECISE_MAX_BYTES:
            return self
        if self._precise is None:
            if "z" not in self._wide:
                self._wide["z"] = self.z.double()
            self._precise = self.retyped(self._wide["z"])
            self._precise.support, self._precise.narrow_z = self.support, self.z
        return self._precise

    def retyped(self, z: torch.Tensor) -> EMProblem:
        """This problem (counts, components, starts, chunks, prior, offset) on ``z``, a copy
        of its design in another dtype; the prior and the offset follow z's dtype."""
        penalty = None if self.penalty is None else self.penalty.to(z)
        return EMProblem(z, self.counts64, self.num_components, self.chunk_size,
                         self.num_starts, penalty, self.offset)  # (the offset: cast there)

    def _heavy_cov(self, probs: torch.Tensor) -> torch.Tensor:
        """Covariances of z under the columns of ``probs`` for a preconditioner, from the rows
        that hold all but ``_gram.PRECONDITIONER_TAIL`` of each column's mass."""
        return heavy_cov(self.z, probs, chunk_size=self.chunk_size)

    def logits(self, atoms: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(p, S K) logits z @ atoms.T + offset of atoms (S K, r), into ``out`` if given."""
        return offset_logits(self.z, atoms, self.offset, out)

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Column log-normalisers of fresh logits (and their softmax into the workspace)."""
        return column_logsumexp(logits, self.workspace.q)

    def penalty_value(self, atoms: torch.Tensor) -> torch.Tensor:
        """(S,) 0.5 sum_k t_k^T P t_k per start (zeros without a prior), in float64."""
        if self.penalty is None:
            return torch.zeros(self.num_starts, dtype=torch.float64, device=atoms.device)
        quad = 0.5 * ((atoms @ self.penalty) * atoms).sum(-1)
        return quad.double().view(self.num_starts, self.num_components).sum(1)

    def e_step(self, logits: torch.Tensor, lse: torch.Tensor, log_weights: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) float64 log-likelihoods at (atoms, weights) and the weights w = n r (p, S K).

        ``lse`` are the column log-normalisers of ``logits``. The returned w is a buffer of
        this problem, overwritten by the next call.
        """
        s, k = self.num_starts, self.num_components
        joint = torch.sub(logits, lse - log_weights, out=self.w)  # log alpha_k q_k(j)
        top, total = self.rows[:, :s], self.rows[:, s:]
        j3 = joint.view(-1, s, k)
        torch.amax(j3, 2, out=top)
        # w = n_j alpha_k q_k(j) / pi_j. Up to SMALL_K components, a column at a time: torch's
        # broadcasts and sums over a short last dimension were 1.3-2x slower, with the same bits.
        cols = [j3[:, :, i] for i in range(k)] if k <= SMALL_K else None
        if cols is None:
            j3.sub_(top[:, :, None]).exp_()
            torch.sum(j3, 2, out=total)
        else:
            for col in cols:
                col.sub_(top)
            joint.exp_()
            total.copy_(cols[0])
            for col in cols[1:]:
                total.add_(col)
        log_pi = top.add_(total.log()).clamp_max_(0.0)  # (p, S); pi <= 1 despite rounding
        scale = total.reciprocal_().mul_(self.counts[:, None])
        if cols is None:
            j3.mul_(scale[:, :, None])
        else:
            for col in cols:
                col.mul_(scale)
        loglik = weighted_sums(self.counts64, log_pi.to(torch.float64))
        self.weight_sums = column_sums(joint)
        return loglik, joint

    def m_step(self, w: torch.Tensor, atoms: torch.Tensor, log_weights: torch.Tensor,
               logits: torch.Tensor, lse: torch.Tensor):
        """New (atoms, log_weights, logits, lse) and the (S,) increases of the EM surrogate Q.

        The increase is N KL(alpha_new || alpha_old) for the weights plus the quadratic-model
        gain s g^T d - s^2 d^T H d / 2 of each component's step s d ((s - s^2/2) g^T H^-1 g for
        a full Newton direction). Both come from gradients,
        not from differences of large sums, so they stay accurate in float32 where the
        log-likelihood itself is resolved only to about 1e-7 relative.
        """
        new_log_weights = torch.log(self.weight_sums / self.weight_total)
        l2 = 0.0 if self.penalty is None else self.penalty
        if self.hessian_free:
            if self.factor is None:  # the first M-step: the Hessians here (ws.q: the softmax)
                self.factor = stale_factor(self._heavy_cov(self.workspace.q), column_sums(w), l2)
            atoms, logits, lse, info = softmax_newton_step(
                self.z, w, atoms, logits, self.workspace, lse, l2=l2, max_step=EM_MAX_STEP,
                offset=self.offset, factor=self.factor)
            if not bool(info.solved.all()):
                # A stale preconditioner: factor those components' Hessians at their new atoms
                # (ws.q holds their softmax), the next M-step's up to the weights.
                cols = (~info.solved).nonzero().squeeze(1)
                cov = self._heavy_cov(self.workspace.q[:, cols])
                self.factor[cols] = stale_factor(cov, column_sums(w[:, cols]), l2)
        else:
            # At large r the covariances (p r^2 K) dominate an iteration: reuse them for a few
            # M-steps (quasi-Newton steps; the line search keeps EM monotone).
            reuse = self.cov is not None and self.cov_age < self.cov_reuse
            atoms, logits, lse, info = softmax_newton_step(
                self.z, w, atoms, logits, self.workspace, lse, l2=l2, max_step=EM_MAX_STEP,
                cov=self.cov if reuse else None, offset=self.offset)
            self.cov, self.cov_age = info.cov, (self.cov_age + 1 if reuse else 1)
        # KL(a || b) to second order, 0.5 sum (a - b)^2 / b: no first-order cancellation.
        a, b = new_log_weights.double().exp(), log_weights.double().exp()
        kl = 0.5 * (a - b) ** 2 / b.clamp_min(1e-300)
        newton = info.model_gain.double()
        gain = (self.weight_total * kl + newton).view(self.num_starts, -1).sum(1)
        return atoms, new_log_weights, logits, lse, gain

    def start(self, atoms: torch.Tensor, log_weights: torch.Tensor) -> EMState:
        """The state at (atoms (S K, r), log_weights (S K,)): logits, normalisers, E-step."""
        logits = self.logits(atoms)
        lse = self.normalise(logits)
        loglik, w = self.e_step(logits, lse, log_weights)
        return EMState(atoms, log_weights, logits, lse, w, loglik)

    def iterate(self, st: EMState) -> tuple[EMState, torch.Tensor]:
        """One EM iteration (M-step, then E-step); also returns the (S,) surrogate gains."""
        atoms, log_weights, logits, lse, gain = self.m_step(st.w, st.atoms, st.log_weights,
                                                            st.logits, st.lse)
        loglik, w = self.e_step(logits, lse, log_weights)
        return EMState(atoms, log_weights, logits, lse, w, loglik), gain

    def objective(self, st: EMState) -> torch.Tensor:
        """(S,) float64 objective: log-likelihood minus the prior's penalty."""
        return st.loglik - self.penalty_value(st.atoms)

    def relative_gradient(self, atoms: torch.Tensor, log_weights: torch.Tensor) -> float:
        """The largest entry of the objective's gradient at one start's (atoms (K, r),
        log_weights (K,)), per unit of data: the atoms' part divided by N, the weight logits'
        by the number of units (N draws, or G groups). 0 at a stationary point.

        By Fisher's identity the M-step's gradient at the current point is the
        log-likelihood's: z^T w_k - W_k m_k for the atoms, W - units alpha for the weight
        logits. (Runs one E-step; the workspace then holds this point's softmax.)

        The sums over the p points are taken in float64, in chunks of rows: in float32 their
        rounding alone measured 1e-3 on GloVe (p = 400,000, N = 10^6) at the optimum.
        """
        st = self.start(atoms, log_weights)
        w, q = st.w, self.workspace.q
        total_w = w.sum(0, dtype=torch.float64)
        rows = rows_per_chunk(w.shape[0], (w.shape[1] + self.z.shape[1]) * 8, w.device,
                              self.chunk_size)
        g_t = torch.zeros(w.shape[1], self.z.shape[1], dtype=torch.float64, device=w.device)
        for i in range(0, w.shape[0], rows):
            resid = w[i:i + rows].double() - q[i:i + rows].double() * total_w
            g_t += weighted_sums(resid, self.z[i:i + rows].double())
        if self.penalty is not None:
            g_t = g_t - atoms.double() @ self.penalty.double()
        g_eta = self.weight_sums.double() - self.weight_total * log_weights.double().exp()
        atoms_part = float(g_t.abs().max()) / max(self.total, 1e-300)
        weights_part = float(g_eta.abs().max()) / max(self.weight_total, 1e-300)
        return max(atoms_part, weights_part)


@dataclass
class EMState:
    """Where EM stands: atoms (S K, r), log-weights (S K,), logits z @ atoms.T (p, S K) with
    their column log-normalisers (S K,) (the workspace holds their softmax), the E-step's
    weights w (p, S K) and the (S,) float64 log-likelihoods."""

    atoms: torch.Tensor
    log_weights: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    w: torch.Tensor
    loglik: torch.Tensor


class GroupedEMProblem(EMProblem):
    """EM when all draws of a group share one component.

    Group g has counts n_gj (stored sparsely as triplets). Its log-likelihood is
    log sum_k alpha_k prod_j q_k(j)^{n_gj}; the E-step gives r_gk = P(component k | group g), the
    M-step weights are alpha_k = sum_g r_gk / G and the atoms' weighted softmax regression uses
    w_jk = sum_g n_gj r_gk, so the M-step for the atoms is the ungrouped one with these weights.
    """

    def __init__(self, z: torch.Tensor, group_index: torch.Tensor, point_index: torch.Tensor,
                 values: torch.Tensor, num_groups: int, num_components: int,
                 chunk_size: int | None = None, num_starts: int = 1,
                 penalty: torch.Tensor | None = None, offset: torch.Tensor | None = None):
        counts = torch.zeros(z.shape[0], dtype=torch.float64).index_add_(
            0, point_index.cpu(), values.cpu().double())
        super().__init__(z, counts, num_components, chunk_size, num_starts, penalty, offset)
        self.newton_capable = False
        dev = z.device
        self.triplets = (group_index, point_index, values)
        self.group_index = group_index.to(dev)
        self.point_index = point_index.to(dev)
        self.values = values.to(device=dev, dtype=z.dtype)[:, None]
        self.num_groups = num_groups
        self.weight_total = float(num_groups)
        #: (G, S K) P(component | group) of the last E-step.
        self.group_resp: torch.Tensor | None = None

    def with_starts(self, num_starts: int, num_components: int | None = None
                    ) -> GroupedEMProblem:
        return GroupedEMProblem(self.z, *self.triplets, self.num_groups,
                                 num_components or self.num_components, self.chunk_size,
                                 num_starts, self.penalty, self.offset)

    def _joint(self, log_q: torch.Tensor) -> torch.Tensor:
        return group_log_joint(log_q, self.group_index, self.point_index, self.values,
                                self.num_groups)

    def e_step(self, logits, lse, log_weights):
        """As :meth:`EMProblem.e_step`; ``log_weights`` may also be (G, S K), one set of class
        shares per group. The responsibilities (G, S K) stay in ``group_resp``."""
        s, k = self.num_starts, self.num_components
        joint = self._joint(torch.sub(logits, lse, out=self.w)).add_(log_weights)  # (G, S K)
        j3 = joint.view(-1, s, k)
        group_ll = torch.logsumexp(j3, 2)  # (G, S)
        r = j3.sub_(group_ll[:, :, None]).exp_().view(-1, s * k)  # responsibilities
        self.weight_sums, self.group_resp = column_sums(r), r
        w = self.w.zero_().index_add_(0, self.point_index, r[self.group_index].mul_(self.values))
        return column_sums(group_ll.to(torch.float64)), w

    def responsibilities(self, atoms, log_weights) -> torch.Tensor:
        """(G, K) P(component k | group g) at (atoms, log_weights)."""
        log_q = torch.log_softmax(self.logits(atoms), 0)
        return torch.softmax(self._joint(log_q) + log_weights, 1)


def user_start(init: Any, num_components: int, design: Design, z: torch.Tensor):
    """A given start (checked by ``warmstart.check_init``) in standardised coordinates:
    atoms (K, r) and log-weights (K,) in z's dtype and device."""
    if isinstance(init, Mapping):
        weights, atoms = init["weights"], init["atoms"]
    else:
        weights, atoms = init.weights, init.atoms
    w, a = check_mixing(weights, atoms, num_components, design.num_features, name="init")
    atoms_z = design.atoms_to_z(a.to(design.from_atoms.device)).to(device=z.device, dtype=z.dtype)
    return atoms_z, w.log().to(device=z.device, dtype=z.dtype)


@dataclass
class Setup:
    """Everything a fit starts from: the checked features (p, L), their standardised design,
    the EM engine on it (whose ``z`` and ``num_components`` it reads), the computation's dtype
    and device, the group ids (grouped data) and the prior's scale (MAP fits)."""

    features: torch.Tensor
    design: Design
    problem: EMProblem
    dtype: torch.dtype
    device: torch.device
    group_labels: torch.Tensor | None = None
    prior_scale: float | None = None
    #: The one-component fit (standardised atom (r,)) and the objective of a mixture with every
    #: atom there: the trivial fit every fit must beat (see warmstart.one_component_fit).
    centre: torch.Tensor | None = None
    reference: float | None = None
    #: The checked offset (p,) in the features' coordinates (None: no offset).
    offset: torch.Tensor | None = None
    #: Covariates of the groups (G, d), float64, for class shares softmax(Gamma c_g) (None: one
    #: set of weights for all groups; see :mod:`pyro_softmix.membership`).
    group_features: torch.Tensor | None = None
    #: The set-up on which ``fit_em`` makes its starts, runs EM and finds the one-component
    #: fit (:meth:`float32_twin`), or None: this one.
    search: Setup | None = None

    @property
    def z(self) -> torch.Tensor:
        return self.problem.z

    @property
    def num_components(self) -> int:
        return self.problem.num_components

    def float32_twin(self) -> Setup | None:
        """This set-up on its standardised design rounded to float32 (the same counts, offset
        and prior), where ``fit_em`` searches in float32 (see ``FLOAT32_SEARCH_BYTES``); None
        where it does not: a float32 design, grouped data, or a design outside that range."""
        problem = self.problem
        size = problem.z.numel() * 8
        if (problem.z.dtype != torch.float64 or type(problem) is not EMProblem
                or not FLOAT32_SEARCH_BYTES <= size <= PRECISE_MAX_BYTES):
            return None
        return replace(self, problem=problem.retyped(problem.z.float()), dtype=torch.float32,
                       centre=None, reference=None)


def prepare(features, counts, tokens, groups, num_components, dtype, device, chunk_size,
            prior_scale: float | None = None, offset=None) -> Setup:
    """Validate the data, build the standardised design and the EM engine (a MAP engine under
    the atoms' prior when ``prior_scale`` is given, see :func:`set_prior`; with a known
    per-point ``offset`` (p,) in every component's logits)."""
    x = check_features(features)
    p = x.shape[0]
    k = check_num_components(num_components, p)
    b = check_offset(offset, p)
    dtype = resolve_dtype(dtype, as_tensor(features, "features"))
    device = resolve_device(device, x)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    if groups is None:
        n = check_counts(counts, tokens, p)
        grouped = None
        total = float(ordered_sum(n.double()))
    else:
        grouped = check_groups(groups, counts, tokens, p)
        total = float(ordered_sum(grouped[2].double()))
    if total > 1e-6 * torch.finfo(dtype).max:
        raise ValueError(f"counts sum to {total:.3g}, beyond what {dtype} represents in sums "
                         "of counts: use dtype=torch.float64, or rescale the counts (the "
                         "estimate depends only on their proportions)")
    design = standardize(x, chunk_size=chunk_size)
    z = design.transform(x, dtype=dtype, device=device, chunk_size=chunk_size)
    # Softmax ignores a constant shift: centring keeps the logits' scale (float32) small.
    b_z = None if b is None else (b - b.double().mean()).to(device=device, dtype=dtype)
    if grouped is None:
        problem = EMProblem(z, n.to(device), k, chunk_size, offset=b_z)
        labels = None
    else:
        gi, pi, values, labels = grouped
        problem = GroupedEMProblem(z, gi, pi, values, int(labels.shape[0]), k, chunk_size,
                                   offset=b_z)
    setup = Setup(x, design, problem, dtype, device, labels, offset=b)
    setup.prior_scale = set_prior(problem, x, design, prior_scale)
    return setup


def set_prior(problem: EMProblem, x: torch.Tensor, design: Design,
               prior_scale: float | None) -> float | None:
    """Check ``prior_scale`` and, if given, make ``problem`` a MAP-EM problem under the atoms'
    Normal(0, prior_scale / sd(X[:, l])) prior; returns the checked scale."""
    if prior_scale is None:
        return None
    prior_scale = check_positive_float(prior_scale, "prior_scale")
    problem.penalty = prior_precision(x, design, prior_scale).to(problem.z)
    return prior_scale


def prior_precision(x: torch.Tensor, design: Design, prior_scale: float) -> torch.Tensor:
    """(r, r) precision in standardised coordinates of the atoms' prior N(0, diag(s / sd_l)^2).

    With theta = A t (``design.to_atoms``), sum_l sd_l^2 theta_l^2 / s^2 = t^T A^T D A t / s^2.
    """
    sd = feature_scales(x.to(torch.float64)).to(design.to_atoms.device)
    a = design.to_atoms.to(torch.float64)
    return (a.T * sd**2) @ a / prior_scale**2
