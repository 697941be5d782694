"""jax.numpy/jax.nn/jax.lax functions through a JAX endpoint and a torch endpoint
(tests/jax_conformance.py): grad, jit(grad), hessian, jvp, jacfwd and vmap of the remote
function equal the same transforms of the local JAX function, in float64; exclusions are
listed there with their reasons.

``make test`` runs the fast subset (``jax_conformance.FAST``: two dozen of the functions,
each under grad and jvp and one more transform, about a minute on 2 cores);
``GRADSERVE_CONFORMANCE=all`` every transform of every function (over 150 of them, about
13 minutes on 2 cores).
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
    functions = {r.case for r in results}
    assert len(jax_conformance.CASES) >= 60   # the table; the fast subset checks some of them
    assert len(functions) >= (60 if every else 20)
    assert {r.framework for r in results} == set(jax_conformance.FRAMEWORKS)
    assert {r.transform for r in results} == set(jax_conformance.TRANSFORMS)
    assert {r.category for r in results} == {c.category for c in jax_conformance.CASES}
    assert {"elementwise", "reduction", "linalg", "indexing", "conv/pooling", "normalisation",
            "loss", "activation"} <= {c.category for c in jax_conformance.CASES}
    if every:   # each case under each transform through each framework
        assert len(results) == (len(jax_conformance.CASES) * len(jax_conformance.TRANSFORMS)
                                * len(jax_conformance.FRAMEWORKS))
    assert not jax_conformance.failures(results), jax_conformance.report(results)
