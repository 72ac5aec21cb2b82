# SPDX-License-Identifier: Apache-2.0
"""Standard errors of an EM fit: observed information, sandwich, bootstrap; the coefficient table.

Coordinates: the atoms in standardised coordinates t_k (K r) and the weight logits eta
(alpha = softmax(eta), eta_K held at 0): D = K r + K - 1 free coordinates, the ones EM and the
Newton finish use. The data are units u (draws, all n_j draws at point j sharing one form; or
groups) with multiplicity c_u, size N_u, summed design Z_u = sum_j n_uj z_j and
responsibilities r_uk. With m_k = z^T q_k, d_uk = Z_u - N_u m_k and a_uk = (d_uk in block
t_k, e_k - alpha in the eta block), the score of a unit is b_u = sum_k r_uk a_uk, and the
Hessian of the log-likelihood is

    H = sum_u c_u (sum_k r_uk a_uk a_uk^T - b_u b_u^T) - blockdiag_k(W_k Cov_{q_k}(z))
        - U (diag alpha - alpha alpha^T)  [eta block]

with W_k = sum_u c_u r_uk N_u and U = sum_u c_u (Louis's identity for mixtures: the complete-data
information minus the information lost to the unknown assignments). Ungrouped data are the case
N_u = 1, c_u = n_j; this is the Hessian of the Newton finish (:mod:`pyro_softmix._marginal`).

- ``"observed"``: Cov = (-H)^-1.
- ``"sandwich"``: Cov = H^-1 (sum_u c_u b_u b_u^T) H^-1, the robust form discrete-choice
  packages report for panels (units are groups when grouped).
- ``"bootstrap"``: multinomial resampling of the draws (or of the groups), each replicate
  refitted from the fit and matched to its labels (Hungarian); a replicate whose matching is not
  clear-cut (some atom closer to another fitted atom than half their separation) is counted
  and left out.

Atoms map to feature coordinates linearly (theta = A t), so their covariance is A Cov A^T; the
weights' by the delta method on the simplex, J = diag(alpha) - alpha alpha^T (first K - 1
columns).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ._chunks import rows_per_chunk
from ._gram import weighted_cov, weighted_gram
from ._matching import match_components
from .design import IdentifiabilityWarning
from .engine import GroupedEMProblem, Setup, prepare
from .membership import check_group_features, fit_membership

__all__ = ["CoefficientTable", "coefficient_table", "standard_errors"]

KINDS = ("observed", "sandwich", "bootstrap")
#: The largest information matrix formed, in bytes (float64 D x D).
MAX_INFORMATION_BYTES = 2 * 1024**3


def _setup(fit, counts=None, tokens=None, groups=None, features=None,
           group_features=None) -> Setup:
    x = fit.features if features is None else features
    if x is None:
        raise ValueError("this fit holds no features: pass features=")
    if (fit.membership_coef is None) != (group_features is None):
        raise ValueError("pass group_features= (the groups' covariates) exactly when the fit "
                         "has membership_coef")
    with warnings.catch_warnings():  # the fit has already said what is identified
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        setup = prepare(x, counts, tokens, groups, fit.num_components, torch.float64, "cpu",
                        None, offset=fit.offset)
    if group_features is not None:
        num_groups = None if setup.group_labels is None else int(setup.group_labels.shape[0])
        setup.group_features = check_group_features(group_features, num_groups)
    return setup


def _units(setup: Setup, atoms_z: torch.Tensor, log_shares: torch.Tensor):
    """Per unit: summed design Z_u (U, r), size N_u (U,), multiplicity c_u (U,),
    responsibilities R (U, K), class shares S (U, K) and covariates C (U, d) (a column of ones
    without covariates); and q (p, K) at the point. ``log_shares`` is (K,) or (G, K)."""
    problem, z = setup.problem, setup.z
    q = torch.softmax(problem.logits(atoms_z), 0)
    if isinstance(problem, GroupedEMProblem):
        gi, pi, values = problem.group_index, problem.point_index, problem.values[:, 0]
        g = problem.num_groups
        zu = z.new_zeros(g, z.shape[1]).index_add_(0, gi, z[pi] * values[:, None])
        size = z.new_zeros(g).index_add_(0, gi, values)
        resp = problem.responsibilities(atoms_z, log_shares)
        mult = torch.ones_like(size)
    else:
        support = torch.nonzero(problem.counts64 > 0).squeeze(1)
        resp = torch.softmax(torch.log(q[support]) + log_shares, 1)
        zu, mult = z[support], problem.counts64[support]
        size = torch.ones_like(mult)
    covariates = setup.group_features
    if covariates is None:
        covariates = z.new_ones(zu.shape[0], 1)
    shares = log_shares.exp().expand(zu.shape[0], -1)
    return zu, size, mult, resp, shares, covariates.to(z), q


def information(setup: Setup, atoms_z: torch.Tensor, log_shares: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, meat): the Hessian of the log-likelihood and sum_u c_u b_u b_u^T at atoms_z (K, r)
    and class shares ``log_shares`` ((K,), or (G, K) with covariates), in float64, over the
    D = K r + (K - 1) d free coordinates (atoms, then the class-share coefficients of classes
    1..K-1; d = 1 without covariates, where they are the weight logits)."""
    z = setup.z
    k, r = atoms_z.shape
    zu, size, mult, resp, shares, cov_u, q = _units(setup, atoms_z, log_shares)
    d = cov_u.shape[1]
    dim = k * r + k * d
    if dim * dim * 8 > MAX_INFORMATION_BYTES:
        raise ValueError(f"{k * r + (k - 1) * d} free coordinates: the information matrix "
                         f"would take {dim * dim * 8 / 1024**3:.1f} GB (more than 2 GB); use "
                         "kind='bootstrap'")
    mean = q.T @ z  # (K, r)
    cw = mult[:, None] * resp  # c_u r_uk (U, K)
    big_w = (cw * size[:, None]).sum(0)  # W_k
    # Atoms: sum_u c_u r_uk d_uk d_uk^T from sums over the units (no (U, K, r) temporary):
    # sum c r Z Z^T - m (sum c r N Z)^T - (sum c r N Z) m^T + (sum c r N^2) m m^T.
    szn = (cw * size[:, None]).T @ zu
    n2 = (cw * size[:, None] ** 2).sum(0)
    outer = weighted_gram(zu, cw) - mean[:, :, None] * szn[:, None, :] \
        - szn[:, :, None] * mean[:, None, :] + n2[:, None, None] * mean[:, :, None] * mean[:, None, :]
    cov = weighted_cov(z, q, mean)
    h = z.new_zeros(dim, dim)
    h[:k * r, :k * r] = torch.block_diag(*(outer - big_w[:, None, None] * cov))
    # Atoms x shares, block (k, l): sum_u c_u r_uk (delta_kl - s_ul) d_uk c_u^T.
    # One covariate at a time: no (U, K, K, r) temporary, only (U, K, K) weights.
    eye = torch.eye(k, dtype=z.dtype)
    wkl = (cw[:, :, None] * (eye - shares[:, None, :])).reshape(-1, k * k)  # (U, K K)
    cross = z.new_empty(k, r, k, d)
    for a in range(d):
        wa = wkl * cov_u[:, a:a + 1]
        cross[..., a] = ((wa.T @ zu).view(k, k, r)
                         - (wa.T @ size).view(k, k, 1) * mean[:, None, :]).transpose(1, 2)
    h[:k * r, k * r:] = cross.reshape(k * r, k * d)
    h[k * r:, :k * r] = h[:k * r, k * r:].T
    # Shares: sum_u c_u [sum_k r_uk (e_k - s)(e_k - s)^T - (diag s - s s^T)] (x) c_u c_u^T,
    # and sum_k r_k (e_k - s)(e_k - s)^T = diag r - r s^T - s r^T + s s^T.
    rs = resp[:, :, None] * shares[:, None, :]
    inner = (torch.diag_embed(resp - shares) - rs - rs.transpose(1, 2)
             + 2 * shares[:, :, None] * shares[:, None, :])
    shares_block = z.new_empty(k, d, k, d)
    inner = inner.reshape(-1, k * k)
    for a in range(d):
        for b in range(d):
            shares_block[:, a, :, b] = ((mult * cov_u[:, a] * cov_u[:, b]) @ inner).view(k, k)
    h[k * r:, k * r:] = shares_block.reshape(k * d, k * d)
    meat = z.new_zeros(dim, dim)
    chunk = rows_per_chunk(zu.shape[0], dim * 8, z.device, None)
    for s in range(0, zu.shape[0], chunk):
        sl = slice(s, s + chunk)
        dev = zu[sl, None, :] - size[sl, None, None] * mean  # (c, K, r)
        gate = (resp[sl] - shares[sl])[:, :, None] * cov_u[sl, None, :]  # (c, K, d)
        rows = torch.cat([(resp[sl, :, None] * dev).reshape(-1, k * r),
                          gate.reshape(-1, k * d)], 1)
        meat.addmm_(rows.T * mult[sl], rows)
    h -= meat
    keep = k * r + (k - 1) * d  # the last class's coefficients are held at 0
    return h[:keep, :keep], meat[:keep, :keep]


def _covariance(kind: str, h: torch.Tensor, meat: torch.Tensor) -> torch.Tensor:
    neg = -0.5 * (h + h.T)
    chol, info = torch.linalg.cholesky_ex(neg)
    if int(info) != 0:
        raise ValueError("the observed information is not positive definite at this fit: it "
                         "is not at a maximum of the likelihood (refit to convergence), or a "
                         "component is at infinity or empty")
    inv = torch.cholesky_inverse(chol)
    return inv if kind == "observed" else inv @ meat @ inv


def _to_features(setup: Setup, cov: torch.Tensor, log_shares: torch.Tensor, k: int
                 ) -> dict[str, torch.Tensor]:
    """Standard errors of the atoms (K, L), the weights (K,) (the shares averaged over the
    units, by the delta method) and, with covariates, the coefficients (K, d)."""
    a = setup.design.to_atoms.to(torch.float64).cpu()  # (L, r)
    r = a.shape[1]
    atoms_se = torch.stack([((a @ cov[i * r:(i + 1) * r, i * r:(i + 1) * r]) * a).sum(1)
                            for i in range(k)]).clamp_min(0).sqrt()
    block = cov[k * r:, k * r:]
    shares = log_shares.exp()
    if setup.group_features is None:  # weights alpha = softmax(eta)
        jac = (torch.diag(shares) - shares[:, None] * shares)[:, :k - 1]
        return {"atoms": atoms_se, "weights": ((jac @ block) * jac).sum(1).clamp_min(0).sqrt()}
    c = setup.group_features.to(cov)
    d = c.shape[1]
    # alpha = mean_g softmax(Gamma c_g): d alpha / d Gamma_l = mean_g (diag s - s s^T)_{:, l} c_g
    ds = torch.diag_embed(shares) - shares[:, :, None] * shares[:, None, :]  # (G, K, K)
    jac = torch.einsum("gkl,ga->kla", ds[:, :, :k - 1], c).reshape(k, -1) / c.shape[0]
    coef_se = torch.cat([block.diagonal().clamp_min(0).sqrt().reshape(k - 1, d),
                         cov.new_zeros(1, d)])
    return {"atoms": atoms_se, "weights": ((jac @ block) * jac).sum(1).clamp_min(0).sqrt(),
            "membership_coef": coef_se}


def standard_errors(fit, kind: str = "observed", *, counts=None, tokens=None, groups=None,
                    features=None, group_features=None, num_replicates: int = 200, seed=None,
                    ) -> dict[str, torch.Tensor]:
    """Standard errors of a fit's weights (K,) and atoms (K, L), in feature coordinates.

    Args:
        fit: a :class:`~pyro_softmix.SoftmaxMixtureFit` (its offset is used).
        kind: ``"observed"`` (inverse observed information), ``"sandwich"`` (robust, with
            per-unit scores: groups when grouped, else draws) or ``"bootstrap"``.
        counts, tokens, groups: the data the fit was made on.
        features: the features, if the fit holds none.
        group_features: the groups' covariates, for a fit with ``membership_coef``.
        num_replicates, seed: for ``"bootstrap"``.

    Returns:
        ``{"weights": (K,), "atoms": (K, L)}`` in float64 on the CPU, and
        ``"membership_coef"`` (K, d) for a fit with covariates (the weights are then the
        shares averaged over the groups); ``"bootstrap"`` adds ``"replicates"`` (used) and
        ``"unaligned"`` (left out: labels not clear-cut).

    The likelihood's information is used also for a MAP fit (``prior_scale``): the prior is
    not counted. See the module docstring for the formulas.

    Example:
        >>> import pyro_softmix as psm
        >>> data = psm.simulate(num_points=200, num_features=2, num_components=2,
        ...                     num_obs=20_000, atom_norm=3.0, seed=0)
        >>> fit = psm.fit_em(data.features, counts=data.counts, num_components=2, seed=0)
        >>> se = fit.standard_errors(counts=data.counts)
        >>> tuple(se["weights"].shape), tuple(se["atoms"].shape)
        ((2,), (2, 2))
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    setup = _setup(fit, counts, tokens, groups, features, group_features)
    if kind == "bootstrap":
        return _bootstrap(fit, setup, counts, tokens, groups, num_replicates, seed)
    atoms_z = setup.design.atoms_to_z(fit.atoms.detach().cpu().double())
    log_shares = _log_shares(fit, setup)
    h, meat = information(setup, atoms_z, log_shares)
    cov = _covariance(kind, h, meat)
    return _to_features(setup, cov, log_shares, fit.num_components)


def _log_shares(fit, setup: Setup) -> torch.Tensor:
    """log class shares: (K,) log weights, or (G, K) log softmax(Gamma c_g) with covariates."""
    if fit.membership_coef is None:
        return fit.weights.detach().cpu().double().log()
    gamma = fit.membership_coef.detach().cpu().double()
    return torch.log_softmax(setup.group_features @ gamma.T, 1)


def _bootstrap(fit, setup: Setup, counts, tokens, groups, num_replicates, seed):
    from ._checks import check_positive_int, make_generator
    from .accelerate import run
    from .simulation import _multinomial_counts
    from .stopping import default_tol

    num_replicates = check_positive_int(num_replicates, "num_replicates", minimum=2)
    gen = make_generator(seed)
    x = setup.features
    problem = setup.problem
    ref_z = setup.design.atoms_to_z(fit.atoms.detach().cpu().double())
    ref_w = fit.weights.detach().cpu().double().log()
    sep = torch.cdist(ref_z, ref_z) + torch.diag(torch.full((fit.num_components,), math.inf))
    half_gap = 0.5 * sep.min(1).values  # (K,)
    weights, atoms, coefs, unaligned = [], [], [], 0
    grouped = isinstance(problem, GroupedEMProblem)
    tol = default_tol(torch.float64)
    if grouped:  # the triplets in group order, once: group g's rows are starts[g]..+sizes[g]
        gi, pi, values = (t.cpu() for t in problem.triplets)
        order = torch.argsort(gi, stable=True)
        gi, pi, values = gi[order], pi[order], values[order].long()
        sizes = torch.bincount(gi, minlength=problem.num_groups)
        starts = torch.cumsum(sizes, 0) - sizes
    for _ in range(num_replicates):
        if grouped:
            pick = torch.randint(problem.num_groups, (problem.num_groups,), generator=gen)
            lengths = sizes[pick]
            first = torch.cumsum(lengths, 0) - lengths  # each copy's first row among the rows
            within = torch.arange(int(lengths.sum())) - first.repeat_interleave(lengths)
            rows = starts[pick].repeat_interleave(lengths) + within
            new_g = torch.arange(problem.num_groups).repeat_interleave(lengths)
            data = {"tokens": pi[rows].repeat_interleave(values[rows]),
                    "groups": new_g.repeat_interleave(values[rows])}
            covariates = None if setup.group_features is None else setup.group_features[pick]
        else:
            n = problem.counts64
            data = {"counts": _multinomial_counts(n / n.sum(), int(round(float(n.sum()))), gen)}
            covariates = None
        # Each replicate is refitted from the fit by the engine (the same standardised design).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = _setup(fit, features=x, group_features=covariates, **data)
            if fit.membership_coef is None:
                state = run(rep.problem, ref_z, ref_w, 1000, tol).state
                rep_z, rep_w, gamma = state.atoms, state.log_weights.exp(), None
            else:
                rep_z, gamma, log_shares, _, _ = fit_membership(rep.problem, ref_z, ref_w,
                                                                covariates, 1000, tol)
                rep_w = log_shares.exp().mean(0)
        perm = match_components(rep_z, ref_z)
        if bool(((rep_z[perm] - ref_z).norm(dim=1) >= half_gap).any()):
            unaligned += 1
            continue
        weights.append(rep_w[perm])
        atoms.append(setup.design.atoms_from_z(rep_z[perm]))
        if gamma is not None:  # relabelled, then measured against the last class again
            coefs.append(gamma[perm] - gamma[perm][-1])
    if len(weights) < 2:
        raise ValueError(f"only {len(weights)} of {num_replicates} bootstrap replicates could "
                         "be matched to the fit's components: the components are not "
                         "separated enough for bootstrap standard errors")
    out = {"weights": torch.stack(weights).std(0), "atoms": torch.stack(atoms).std(0),
           "replicates": len(weights), "unaligned": unaligned}
    if coefs:
        out["membership_coef"] = torch.stack(coefs).std(0)
    return out


@dataclass
class CoefficientTable:
    """Weights and atoms with standard errors, z-values and Wald intervals.

    Attributes:
        rows: one dict per coefficient: ``name`` ("weight[k]", "atom[k, l]", or
            "membership[k, l]" for the class-membership coefficients), ``estimate``,
            ``se``, ``z`` (estimate / se), ``lo``, ``hi`` (the ``level`` interval).
        kind, level: how the errors were computed and the intervals' level.
    """

    rows: list[dict]
    kind: str
    level: float

    def __str__(self) -> str:
        pct = f"{100 * self.level:g}%"
        lines = [f"{'coefficient':<18}{'estimate':>12}{'se':>12}{'z':>10}"
                 f"{pct + ' lo':>12}{pct + ' hi':>12}"]
        for row in self.rows:
            lines.append(f"{row['name']:<18}{row['estimate']:>12.5f}{row['se']:>12.5f}"
                         f"{row['z']:>10.2f}{row['lo']:>12.5f}{row['hi']:>12.5f}")
        lines.append(f"standard errors: {self.kind}")
        return "\n".join(lines)


def coefficient_table(fit, kind: str = "observed", *, level: float = 0.95, **data
                      ) -> CoefficientTable:
    """The fit's weights and atoms (feature coordinates) with standard errors
    (:func:`standard_errors` of ``kind``; ``data`` are its data keywords), z-values and Wald
    intervals at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    se = standard_errors(fit, kind, **data)
    crit = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    rows = []

    def add(name, est, err):
        rows.append({"name": name, "estimate": est, "se": err,
                     "z": est / err if err > 0 else math.nan,
                     "lo": est - crit * err, "hi": est + crit * err})

    w = fit.weights.detach().cpu().double()
    a = fit.atoms.detach().cpu().double()
    for k in range(fit.num_components):
        add(f"weight[{k}]", float(w[k]), float(se["weights"][k]))
    for k in range(fit.num_components):
        for col in range(fit.num_features):
            add(f"atom[{k}, {col}]", float(a[k, col]), float(se["atoms"][k, col]))
    if fit.membership_coef is not None:  # the last class is the reference (row 0)
        gamma = fit.membership_coef.detach().cpu().double()
        for k in range(fit.num_components - 1):
            for col in range(gamma.shape[1]):
                add(f"membership[{k}, {col}]", float(gamma[k, col]),
                    float(se["membership_coef"][k, col]))
    return CoefficientTable(rows, kind, level)
