"""PyTorch's OpInfo database through a remote endpoint: forward values and first-order
gradients of every op with float64 autograd support, Hessian-vector products (double
backward) and Jacobian-vector products (forward mode) of every op that supports them,
compared with local autograd.

``python tests/conformance.py [--ops N] [--samples K]`` runs the sweep and prints the
pass rate by category and every failure; tests/test_conformance.py runs it under pytest
(a fast subset in ``make test``, the whole database in ``make conformance``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

import gradserve
from gradserve.wire import pytree

#: Ops whose samples cannot travel by value: why, and what the caller is told (the sweep
#: checks that each of their samples is refused with it; "" where the op gives other values
#: by design instead).
EXCLUDED: dict[str, tuple[str, str]] = {
    "sparse.sampled_addmm": ("a sparse CSR input", "a sparse_csr tensor cannot be sent"),
    "sparse.mm.reduce": ("a sparse CSR input", "a sparse_csr tensor cannot be sent"),
    "to_sparse": ("a sparse output", "returned outputs: a sparse_coo tensor cannot be sent"),
    "chalf": ("a complex32 output", "returned outputs: torch dtype torch.complex32 cannot"),
    "nn.functional.linear_cross_entropy.chunked": (
        "an options object (a Python class instance) as an argument",
        "cannot send a torch.nn.modules.linear_cross_entropy_options"),
    "nn.functional.linear_cross_entropy.chunked_none": (
        "an options object (a Python class instance) as an argument",
        "cannot send a torch.nn.modules.linear_cross_entropy_options"),
    "nn.functional.triplet_margin_with_distance_loss": (
        "a module (a callable) as an argument", "cannot send a torch.nn.modules.distance"),
    "as_strided.partial_views": (
        "as_strided reads the storage behind a view: only the view's own values travel, so "
        "the server's copy has no storage around them (offsets past it fail, others read "
        "other values)", ""),
}

#: The report's rows for Hessian-vector products (second order) and Jacobian-vector
#: products (forward mode).
SECOND, FORWARD = "2nd-order", "forward"

#: (row, op): derivatives of that kind not compared for that op, and why.
DERIVATIVE_EXCLUDED: dict[tuple[str, str], str] = {
    (SECOND, "linalg.eig"): (
        "eigenvectors are defined up to a phase: OpInfo's wrapper fixes it on the client, so "
        "the server differentiates the eigenvectors' second-order cotangent without the "
        "wrapper's share of it, and linalg_eig_backward's gauge check refuses that part (the "
        "whole, summed on the client, is gauge-invariant; locally one graph sums it first)"),
    (FORWARD, "nn.functional.max_unpool2d"): (
        "samples with duplicate indices: which duplicate max_unpool writes is unspecified "
        "(torch says so), and forward AD may take a tangent from another one than the value"),
}

TOLERANCE = dict(rtol=1e-7, atol=1e-7, equal_nan=True)
#: How a sample that the local op itself refuses is reported (not a failure, not a pass).
SKIP = "skip:"
#: How a sample of an EXCLUDED op refused as expected is reported (not a failure).
REFUSED = "refused:"


def op_db() -> list[Any]:
    """Every OpInfo with float64 autograd support on the CPU (imports torch's test internals,
    which need the ``expecttest`` package)."""
    from torch.testing._internal.common_methods_invocations import op_db as ops
    return [o for o in ops if o.supports_autograd and torch.float64 in o.supported_dtypes("cpu")]


def key(op: Any) -> str:
    """The op's name as the tests and EXCLUDED use it: ``name`` or ``name.variant``."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def category(op: Any) -> str:
    """Where an op belongs in the report."""
    name, kind = op.name, type(op).__name__
    for prefix in ("linalg", "fft", "special", "nn.functional", "sparse"):
        if name.startswith(prefix + "."):
            return prefix
    if kind in ("UnaryUfuncInfo", "BinaryUfuncInfo"):
        return "elementwise"
    if kind == "ReductionOpInfo" or name in ("sum", "mean", "prod", "std", "var", "amax",
                                             "amin", "norm", "cumsum", "cumprod", "logsumexp"):
        return "reduction"
    if any(w in name for w in ("index", "gather", "scatter", "take", "select", "slice",
                               "masked", "put", "narrow")):
        return "indexing"
    return "other"


@dataclass
class Result:
    """One sample of one op: passed, or why not."""

    op: str
    category: str
    sample: int
    problem: str = ""


def serve(ops: Iterable[Any]) -> tuple[gradserve.Server, gradserve.Client]:
    """A server with one endpoint, "op", calling the op named by its first argument."""
    table = {key(op): op for op in ops}

    def call_op(name: str, *args: Any, **kwargs: Any) -> Any:
        return table[name](*args, **kwargs)

    server = gradserve.Server("127.0.0.1", 0, workers=2)
    server.add_torch("op", call_op)
    server.start()
    return server, gradserve.connect(server.address, transport="grpc", timeout=60)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return pytree.flatten(tree, lambda x: isinstance(x, torch.Tensor))[0]


def check(f: Any, op: Any, sample: Any) -> str:
    """Why the remote op differs from the local one on ``sample`` ("" when it does not)."""
    args = (sample.input, *sample.args)

    def remote(*a: Any, **k: Any) -> Any:
        return f(key(op), *a, **k)

    # OpInfo's own wrapper makes gauge-dependent outputs (eigenvectors' phases) well defined
    wrap, keep = op.gradcheck_wrapper, sample.output_process_fn_grad
    torch.manual_seed(0)
    try:
        want = keep(wrap(op, *args, **sample.kwargs))
    except Exception as err:   # the op itself refuses the sample: nothing to compare
        return f"{SKIP} local forward raised {type(err).__name__}"
    torch.manual_seed(0)
    try:
        got = keep(wrap(remote, *args, **sample.kwargs))
    except Exception as err:   # reported as the sample's problem
        return _raised("forward", err)
    want_leaves, want_def = pytree.flatten(want, lambda x: isinstance(x, torch.Tensor))
    got_leaves, got_def = pytree.flatten(got, lambda x: isinstance(x, torch.Tensor))
    if want_def != got_def:
        return f"structure: {got_def} != {want_def}"
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        if w.dtype != g.dtype or w.shape != g.shape:
            return f"output {i}: {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}"
        try:
            torch.testing.assert_close(g.detach(), w.detach(), **TOLERANCE)
        except AssertionError as err:
            return f"output {i} values: {str(err).splitlines()[0]}"
    inputs = [t for t in _tensors((args, sample.kwargs)) if t.requires_grad]
    outs = [(w, g) for w, g in zip(want_leaves, got_leaves)
            if w.requires_grad and (w.is_floating_point() or w.is_complex())]
    if not inputs or not outs:
        return ""
    gen = torch.Generator().manual_seed(1)
    cts = [torch.randn(w.shape, dtype=w.dtype, generator=gen) for w, _ in outs]
    try:
        want_grads = torch.autograd.grad([w for w, _ in outs], inputs, cts, allow_unused=True,
                                         retain_graph=True)
    except Exception as err:   # ill-defined locally too (e.g. a gauge-dependent loss)
        return f"{SKIP} local backward raised {type(err).__name__}"
    try:
        got_grads = torch.autograd.grad([g for _, g in outs], inputs, cts, allow_unused=True)
    except Exception as err:   # reported as the sample's problem
        return _raised("backward", err)
    return _compare("gradient", want_grads, got_grads)


def _compare(kind: str, want: Sequence[torch.Tensor | None],
             got: Sequence[torch.Tensor | None]) -> str:
    """Where ``got`` differs from ``want`` ("" nowhere): values within ``TOLERANCE``, and a
    zero against none is no difference."""
    if len(want) != len(got):
        return f"{kind}: {len(got)} tensors != {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if (w is None) != (g is None):
            if w is not None and not w.any() or g is not None and not g.any():
                continue
            return f"{kind} {i}: {'none' if g is None else 'some'} != " \
                   f"{'none' if w is None else 'some'}"
        if w is not None and g is not None:
            try:
                torch.testing.assert_close(g, w, **TOLERANCE)
            except AssertionError as err:
                return f"{kind} {i}: {str(err).splitlines()[0]}"
    return ""


def _raised(what: str, err: Exception) -> str:
    """A remote step's failure, as a sample's problem."""
    return f"{what} raised {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def check_second(f: Any, op: Any, sample: Any) -> str:
    """Why the remote op's Hessian-vector product (the first gradient kept with
    ``create_graph``, then differentiated along random directions) differs from the local
    one on ``sample`` ("" when it does not)."""
    args = (sample.input, *sample.args)
    wrap, keep = op.gradcheck_wrapper, sample.output_process_fn_grad
    inputs = [t for t in _tensors((args, sample.kwargs)) if t.requires_grad]

    differentiated: list[bool] = []   # which outputs the local op differentiates

    def hvp(fn: Any) -> tuple[torch.Tensor | None, ...] | None:
        torch.manual_seed(0)
        out = _tensors(keep(wrap(fn, *args, **sample.kwargs)))
        if not differentiated:
            differentiated.extend(t.requires_grad and (t.is_floating_point() or t.is_complex())
                                  for t in out)
        outs = [t for t, d in zip(out, differentiated) if d]
        if not inputs or not outs:
            return None
        gen = torch.Generator().manual_seed(1)
        cts = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in outs]
        grads = torch.autograd.grad(outs, inputs, cts, allow_unused=True, create_graph=True)
        dirs = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in inputs]
        terms = [(g.conj() * u).real.sum() if g.is_complex() else (g * u).sum()
                 for g, u in zip(grads, dirs) if g is not None and g.requires_grad]
        if not terms:
            return None       # the gradient does not depend on the inputs: no second order
        return torch.autograd.grad(sum(terms), inputs, allow_unused=True)

    try:
        want = hvp(lambda *a, **k: op(*a, **k))
    except Exception as err:
        return f"{SKIP} local double backward raised {type(err).__name__}"
    try:
        got = hvp(lambda *a, **k: f(key(op), *a, **k))
    except Exception as err:
        return _raised("double backward", err)
    if want is None or got is None:   # no second order on one side: none on the other
        other = got if want is None else want
        if other is None or all(t is None or not t.any() for t in other):
            return ""
        return f"second order: {'none' if got is None else 'some'} != " \
               f"{'none' if want is None else 'some'}"
    return _compare("hvp", want, got)


def check_forward(f: Any, op: Any, sample: Any) -> str:
    """Why the remote op's Jacobian-vector product (``torch.func.jvp`` along random tangents
    of its differentiable inputs) differs from the local one on ``sample`` ("" when it
    does not)."""
    tree = ((sample.input, *sample.args), sample.kwargs)
    is_tensor = lambda x: isinstance(x, torch.Tensor)   # noqa: E731
    leaves, treedef = pytree.flatten(tree, is_tensor)
    where = [i for i, t in enumerate(leaves) if t.requires_grad]
    if not where:
        return ""
    gen = torch.Generator().manual_seed(2)
    primals = tuple(leaves[i].detach() for i in where)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    wrap, keep = op.gradcheck_wrapper, sample.output_process_fn_grad

    def outputs_of(fn: Any) -> Any:
        def run(*diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
            values = list(leaves)
            for i, d in zip(where, diff):
                values[i] = d
            args, kwargs = pytree.unflatten(treedef, values)
            torch.manual_seed(0)
            return tuple(t for t in _tensors(keep(wrap(fn, *args, **kwargs)))
                         if t.is_floating_point() or t.is_complex())
        return run

    try:
        _, want = torch.func.jvp(outputs_of(op), primals, tangents)
    except Exception as err:
        return f"{SKIP} local jvp raised {type(err).__name__}"
    try:
        _, got = torch.func.jvp(outputs_of(lambda *a, **k: f(key(op), *a, **k)), primals,
                                tangents)
    except Exception as err:
        return _raised("jvp", err)
    return _compare("jvp", want, got)


def verdict(op: Any, problem: str) -> str:
    """A sample's problem judged against EXCLUDED: an excluded op refused as listed passes
    (its category reports it as refused); one that is not refused so is a failure."""
    if key(op) not in EXCLUDED or problem.startswith(SKIP):
        return problem
    why, told = EXCLUDED[key(op)]
    if not told:
        return f"{SKIP} excluded: {why}"
    if told in problem:
        return f"{REFUSED} {why}"
    return f"expected a refusal saying {told!r} ({why}), got: {problem or 'a pass'}"


def sweep(ops: list[Any], samples: int = 3, second: int = 1) -> Iterator[Result]:
    """Check up to ``samples`` float64 samples of each op (0: all of them), and the
    Hessian-vector and Jacobian-vector products of the first ``second`` of them (0: all)
    where the op supports double backward or forward AD (the ``SECOND`` and ``FORWARD``
    rows)."""
    server, client = serve(ops)
    try:
        f = client.torch("op")
        for op in ops:
            made = op.sample_inputs("cpu", torch.float64, requires_grad=True)
            for i, sample in enumerate(made):
                if samples and i >= samples:
                    break
                problem = verdict(op, check(f, op, sample))
                yield Result(key(op), category(op), i, problem)
                for row, supported, derivative in (
                        (SECOND, op.supports_gradgrad, check_second),
                        (FORWARD, op.supports_forward_ad, check_forward)):
                    if supported and (not second or i < second) and not problem:
                        excluded = DERIVATIVE_EXCLUDED.get((row, key(op)))
                        yield Result(key(op), row, i, f"{SKIP} excluded: {excluded}"
                                     if excluded else derivative(f, op, sample))
    finally:
        client.close()
        server.stop(grace=0)


def failures(results: list[Result]) -> list[Result]:
    """The samples that neither passed, nor were refused as listed, nor skipped."""
    return [r for r in results
            if r.problem and not r.problem.startswith((SKIP, REFUSED))]


def report(results: list[Result]) -> str:
    """Pass rates by category, then every failure."""
    by: dict[str, list[Result]] = collections.defaultdict(list)
    for r in results:
        by[r.category].append(r)
    lines = [f"{'category':<14} {'samples':>8} {'passed':>8} {'rate':>7} {'refused':>8} "
             f"{'skipped':>8}"]
    for name in [*sorted(by), "all"]:
        rs = by[name] if name != "all" else results
        skipped = sum(r.problem.startswith(SKIP) for r in rs)
        refused = sum(r.problem.startswith(REFUSED) for r in rs)
        ok = sum(not r.problem for r in rs)
        counted = len(rs) - skipped - refused
        lines.append(f"{name:<14} {counted:>8} {ok:>8} {ok / max(counted, 1):>7.1%} "
                     f"{refused:>8} {skipped:>8}")
    lines += [f"FAIL {r.op} sample {r.sample}: {r.problem}" for r in failures(results)]
    return "\n".join(lines)


def main() -> int:
    """Run the sweep from the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=0, help="only the first N ops (0: all)")
    p.add_argument("--samples", type=int, default=3, help="samples per op (0: all)")
    p.add_argument("--second", type=int, default=1,
                   help="samples per op whose Hessian-vector products are checked (0: all)")
    args = p.parse_args()
    ops = op_db()
    ops = ops[:args.ops] if args.ops else ops
    start = time.monotonic()
    results = list(sweep(ops, args.samples, args.second))
    print(report(results))
    print(f"{len(ops)} ops, {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
