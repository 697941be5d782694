"""PyTorch's OpInfo database through a remote endpoint (tests/conformance.py): forward
values and first-order gradients equal local autograd for every float64 sample that can
travel by value, and so do Hessian-vector products (double backward) and Jacobian-vector
products (forward mode) for every op that has them; the rest are refused with the error
EXCLUDED lists.

``make test`` checks 3 samples of each op (the first of them to second order and in
forward mode); ``make conformance`` every sample, each to second order and forward.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("expecttest")   # torch's OpInfo database imports it

import conformance  # noqa: E402


@pytest.mark.filterwarnings("ignore")   # the ops' own deprecation and experimental warnings
@pytest.mark.timeout(1800)              # every sample (make conformance) takes minutes
def test_opinfo_ops_through_a_remote_endpoint_equal_local_autograd() -> None:
    every = os.environ.get("GRADSERVE_CONFORMANCE") == "all"
    results = list(conformance.sweep(conformance.op_db(), samples=0 if every else 3,
                                     second=0 if every else 1))
    print("\n" + conformance.report(results))
    ops = {r.op for r in results}
    assert len(ops) >= 500 and len(results) >= 1400          # the database, not a corner
    second = {r.op for r in results if r.category == conformance.SECOND and not r.problem}
    assert len(second) >= 500                                 # Hessian-vector products too
    forward = {r.op for r in results if r.category == conformance.FORWARD and not r.problem}
    assert len(forward) >= 480                                # and Jacobian-vector products
    assert not conformance.failures(results), conformance.report(results)
    refused = {r.op for r in results if r.problem.startswith(conformance.REFUSED)}
    listed = {op for op, (_, told) in conformance.EXCLUDED.items() if told}
    assert refused == listed                                   # each exclusion still applies
