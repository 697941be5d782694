"""jax.numpy/jax.nn/jax.lax functions through a JAX endpoint and a torch endpoint
(tests/jax_conformance.py): grad, jit(grad), hessian, jvp, jacfwd and vmap of the remote
function equal the same transforms of the local JAX function, in float64; exclusions are
listed there with their reasons.

``make test`` runs the fast subset (``jax_conformance.fast``); ``GRADSERVE_CONFORMANCE=all``
every transform of every function.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("jax")

import jax_conformance  # noqa: E402


@pytest.mark.filterwarnings("ignore")   # torch's warnings on read-only numpy inputs and the like
@pytest.mark.timeout(1800)              # every transform of every function takes minutes
def test_jax_transforms_of_remote_functions_equal_local_jax(x64: None) -> None:
    every = os.environ.get("GRADSERVE_CONFORMANCE") == "all"
    plan = jax_conformance.TRANSFORMS if every else jax_conformance.fast
    results = list(jax_conformance.sweep(jax_conformance.CASES, plan))
    print("\n" + jax_conformance.report(results))
    assert len({r.case for r in results}) >= 60 and len(jax_conformance.CASES) >= 60
    assert {r.framework for r in results} == set(jax_conformance.FRAMEWORKS)
    assert {r.transform for r in results} == set(jax_conformance.TRANSFORMS)
    categories = {r.category for r in results}
    assert {"elementwise", "reduction", "linalg", "indexing", "conv/pooling", "normalisation",
            "loss", "activation"} <= categories
    if every:   # each case under each transform through each framework
        assert len(results) == (len(jax_conformance.CASES) * len(jax_conformance.TRANSFORMS)
                                * len(jax_conformance.FRAMEWORKS))
    assert not jax_conformance.failures(results), jax_conformance.report(results)
