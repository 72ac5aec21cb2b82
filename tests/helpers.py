# SPDX-License-Identifier: Apache-2.0
"""Brute-force references used by several test modules."""

import itertools

import torch

import pyro_softmix as psm
from pyro_softmix._marginal import marginal_gradient
from pyro_softmix.engine import EMProblem


def brute_mixture_log_probs(features, atoms, weights):
    """log pi_j by explicit sums over components and points (p,)."""
    p, k = features.shape[0], atoms.shape[0]
    out = torch.empty(p, dtype=torch.float64)
    for j in range(p):
        total = 0.0
        for c in range(k):
            logits = [float(features[i] @ atoms[c]) for i in range(p)]
            m = max(logits)
            norm = sum(torch.tensor(v - m).exp().item() for v in logits)
            total += float(weights[c]) * torch.tensor(logits[j] - m).exp().item() / norm
        out[j] = torch.tensor(total).log()
    return out


def brute_loglik(features, counts, atoms, weights):
    return float((counts.double() * brute_mixture_log_probs(features, atoms, weights)).sum())


def best_permutation(est, ref):
    """Permutation of est's rows closest to ref (brute force over K!)."""
    k = ref.shape[0]
    return min(itertools.permutations(range(k)),
               key=lambda perm: float((est[list(perm)] - ref).norm()))


def brute_grouped_loglik(features, tokens, groups, atoms, weights):
    """sum_g log sum_k w_k prod_{i in g} q_k(y_i), by explicit loops over groups and draws."""
    total = 0.0
    for g in sorted(set(groups.tolist())):
        members = [int(t) for t, h in zip(tokens.tolist(), groups.tolist(), strict=True) if h == g]
        terms = []
        for c in range(atoms.shape[0]):
            q = torch.softmax(features @ atoms[c], 0)
            terms.append(float(weights[c]) * float(torch.prod(q[members])))
        total += float(torch.tensor(sum(terms)).log())
    return total


def simulated(p=300, L=4, K=3, N=50_000, seed=0, norm=3.0, tokens=False):
    return psm.simulate(num_points=p, num_features=L, num_components=K, num_obs=N,
                        atom_norm=norm, seed=seed, return_tokens=tokens)


def hessian_case(p=3000, L=10, K=3, seed=4):
    """A float64 problem with K L + K >= 32 coordinates (mixed-precision Hessians) at a point
    near its MLE; returns (problem, state, gradient pieces)."""

    d = simulated(p=p, L=L, K=K, N=200_000, seed=seed, norm=2.0)
    design = psm.standardize(d.features)
    problem = EMProblem(design.transform(d.features), d.counts, K)
    st = problem.start(design.atoms_to_z(d.atoms), d.weights.log())
    _, pieces = marginal_gradient(problem.z, problem.workspace.q, st.w, st.log_weights)
    return problem, st, pieces


def outlier_data():
    """A design with one extreme point that carries extra draws: the counts (fractional) are
    exactly 20,000 draws' worth from one component plus 3000 on the extreme point, so the
    empirical distribution is the limit of a two-component mixture whose second atom runs off to
    infinity towards that point; the likelihood has a supremum but no maximiser."""
    x = gaussian(400, 2, 7)
    x[0] = torch.tensor([4.0, 4.0], dtype=torch.float64)
    probs = torch.softmax(x @ torch.tensor([0.5, -0.5], dtype=torch.float64), 0)
    counts = 20_000 * probs
    counts[0] += 3000.0
    return x, counts


def gaussian(p, L, seed):
    return torch.randn(p, L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_counts(z, atoms, weights, total=1e7):
    """Counts proportional to the exact mixture probabilities (fractional counts are allowed)."""
    return total * (weights * torch.softmax(z @ atoms.T, 0)).sum(1)


def lbfgs(fn, init):
    v = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=1000, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -fn(v)
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    return v.detach()


def moe_free_vector(moe):
    parts = [moe.gate_weights[:-1].reshape(-1), moe.expert_weights.reshape(-1)]
    if moe.noise_scale is not None:
        parts.append(moe.noise_scale.log())
    return torch.cat(parts)


def moe_unpack(moe, v, dg, dx):
    k = moe.num_experts
    gate = torch.cat([v[: (k - 1) * dg].view(k - 1, dg), torch.zeros(1, dg)])
    experts = v[(k - 1) * dg: (k - 1) * dg + k * dx].view(k, dx)
    out = {"gate": gate, "experts": experts}
    if moe.expert == "linear":
        out["scale"] = v[(k - 1) * dg + k * dx:].exp()
    return out
