# SPDX-License-Identifier: Apache-2.0
"""Bit-level fingerprints of a fixed set of fits, to check that a refactor changes no result.

Each case runs one public entry point on fixed data with fixed seeds (float64, one thread) and
hashes everything it returns that a user could read: weights, atoms, log-likelihood, history,
iteration count, convergence, the start's label. Run it before and after a change and compare:

    python benchmarks/fingerprint.py --json before.json
    # ... change the code ...
    python benchmarks/fingerprint.py --json after.json --compare before.json

A differing hash names the case; ``--verbose`` prints the numbers behind each hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings

import numpy as np
import torch

import pyro_softmix as psm


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _fit_parts(fit):
    return (fit.weights, fit.atoms, fit.loglik, list(fit.history), fit.n_iter, fit.converged,
            fit.init, tuple(fit.diverging))


def _moe_parts(moe):
    return (moe.gate_weights, moe.expert_weights, moe.noise_scale, moe.loglik, moe.objective,
            list(moe.history), moe.n_iter, moe.converged, moe.init)


def _summary(parts) -> str:
    """The readable numbers behind a hash: the log-likelihood (or first scalar) and the
    iteration count where the case has them."""
    scalars = [p for p in parts if isinstance(p, float)]
    ints = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    return (f"{scalars[0]:.12g}" if scalars else "-") + (f" n={ints[0]}" if ints else "")


def cases():
    """(name, thunk returning a tuple of parts) for every fixed case."""
    d = psm.simulate(num_points=2000, num_features=6, num_components=3, num_obs=200_000,
                     atom_norm=2.5, seed=1, dtype=torch.float64)
    big = psm.simulate(num_points=3000, num_features=12, num_components=3, num_obs=300_000,
                       atom_norm=2.0, seed=2, dtype=torch.float64)
    weak = psm.simulate(num_points=1500, num_features=4, num_components=4, num_obs=100_000,
                        atom_norm=1.5, seed=3, dtype=torch.float64)
    wide = psm.simulate(num_points=3000, num_features=40, num_components=2, num_obs=100_000,
                        atom_norm=2.0, seed=4, dtype=torch.float64)
    toks = psm.simulate(num_points=300, num_features=3, num_components=2, num_obs=6000,
                        atom_norm=2.5, seed=5, return_tokens=True, dtype=torch.float64)
    groups = torch.arange(6000) // 30

    def fit(data, **kw):
        return _fit_parts(psm.fit_em(data.features, counts=data.counts, **kw))

    out = [
        ("default", lambda: fit(d, num_components=3, seed=0)),
        ("default-K4-weak", lambda: fit(weak, num_components=4, seed=1)),
        ("default-L12-mixed-hessian", lambda: fit(big, num_components=3, seed=0)),
        ("default-L40-cov-reuse", lambda: fit(wide, num_components=2, seed=0)),
        ("plain-em", lambda: fit(d, num_components=3, seed=0, accelerate=False)),
        ("float32", lambda: _fit_parts(psm.fit_em(d.features.float(), counts=d.counts,
                                                  num_components=3, seed=0))),
        ("map", lambda: fit(d, num_components=3, seed=0, prior_scale=1.0)),
        ("from-truth", lambda: fit(d, num_components=3, init={"weights": d.weights,
                                                               "atoms": d.atoms})),
        ("grouped", lambda: _fit_parts(psm.fit_em(toks.features, tokens=toks.tokens,
                                                  groups=groups, num_components=2, seed=0))),
        ("chunked", lambda: fit(d, num_components=3, seed=0, chunk_size=300)),
    ]
    for method in ("projection", "tensor", "subspace", "random"):
        out.append((f"init-{method}",
                    lambda m=method: fit(d, num_components=3, init=m, seed=0)))
        out.append((f"init-{method}-race",
                    lambda m=method: fit(weak, num_components=4, init=m, num_inits=3, seed=2)))
    for method in ("auto", "projection", "tensor", "subspace", "random"):
        def start(m=method):
            s = psm.warm_start(d.features, counts=d.counts, num_components=3, method=m, seed=0)
            return (s.weights, s.atoms, s.atoms_z, s.loglik)
        out.append((f"warm_start-{method}", start))

    lin = psm.simulate_moe(num_obs=1500, num_features=3, num_experts=3, seed=0,
                           dtype=torch.float64)
    log = psm.simulate_moe(num_obs=1500, num_features=3, num_experts=2, expert="logistic",
                           seed=1, dtype=torch.float64)

    def moe(data, k, expert, **kw):
        m = psm.MixtureOfExperts(k, expert)
        return _moe_parts(m.fit(data.x, data.y, seed=0, **kw))

    out += [
        ("moe-linear", lambda: moe(lin, 3, "linear")),
        ("moe-logistic", lambda: moe(log, 2, "logistic")),
        ("moe-linear-adam", lambda: moe(lin, 3, "linear", method="adam", max_iter=300,
                                        init="random", num_inits=1)),
        ("moe-logistic-msteps", lambda: moe(log, 2, "logistic", m_steps=3)),
    ]

    def pyro_em():
        import pyro

        pyro.clear_param_store()
        sm = psm.SoftmaxMixtureModel(d.features, num_components=3)
        em = psm.EM(sm.model, seed=0)
        losses = [em.step(counts=d.counts) for _ in range(12)]
        f = em.fit
        return (losses, em.converged) + _fit_parts(f)

    out.append(("pyro-EM", pyro_em))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {case: hash} here")
    parser.add_argument("--compare", help="a JSON written earlier: report every difference")
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    only = None if args.only is None else set(args.only.split(","))
    result, values = {}, {}
    for name, thunk in cases():
        if only is not None and name not in only:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = thunk()
        result[name] = _digest(*parts)
        summary = _summary(parts)
        values[name] = summary
        print(f"{name:<28} {result[name]}  {summary}")
        if args.verbose:
            print("   ", [p.tolist() if isinstance(p, torch.Tensor) else p for p in parts][:4])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        with open(args.json.replace(".json", "") + ".values.json", "w") as f:
            json.dump(values, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
        diff = [k for k in result if k in ref and ref[k] != result[k]]
        missing = [k for k in ref if k not in result and (only is None or k in only)]
        print(f"\n{len(result) - len(diff)} of {len(result)} cases identical"
              + (f"; differ: {diff}" if diff else "") + (f"; missing: {missing}" if missing else ""))
        return 1 if diff or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
