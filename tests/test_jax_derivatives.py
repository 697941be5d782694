"""The JAX client to any order in either mode: jvp, jacfwd, linearize, hessian, grad of
grad, jacrev of jacrev, jacfwd of jacfwd, third and fourth derivatives, under jit and
vmap, through torch and JAX endpoints, equal to local JAX at 1e-8 (float64), with the
remote calls each needs counted; and what it refuses, by name."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from gradserve.server.jax_endpoint import JaxEndpoint
from gradserve.server.torch_endpoint import TorchEndpoint

TIGHT = dict(rtol=1e-8, atol=1e-8)
W = np.random.default_rng(7).standard_normal((4, 3))


def mix_torch(x, y, *, p):
    h = torch.tanh(x @ torch.as_tensor(W, dtype=x.dtype) + p)
    return {"h": h * y.sum(), "n": h.argmax(-1)}


def mix_jax(x, y, *, p):
    h = jnp.tanh(x @ W + p)
    return {"h": h * y.sum(), "n": jnp.argmax(h, -1)}


@pytest.fixture(params=["torch", "jax"])
def mix(request, serve, x64):
    """(server, client) serving ``mix`` from a torch or a JAX endpoint."""
    endpoint = TorchEndpoint(mix_torch) if request.param == "torch" else JaxEndpoint(mix_jax)
    return serve({"mix": endpoint})


def data(seed: int = 0) -> tuple[jax.Array, ...]:
    g = np.random.default_rng(seed)
    return tuple(jnp.asarray(g.standard_normal(s)) for s in ((2, 4), (5,), (3,)))


def loss(f):
    return lambda x, y, p: jnp.sum(jnp.sin(f(x, y, p=p)["h"]))


def assert_trees_close(got, want, *, scaled: bool = False) -> None:
    """Equal at 1e-8; ``scaled``: relative to the largest value (high derivatives grow)."""
    leaves_g, leaves_w = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves_g) == len(leaves_w)
    for a, b in zip(leaves_g, leaves_w):
        atol = 1e-8 * float(np.max(np.abs(b))) if scaled else 1e-8
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=atol)


def counting(server, name: str = "mix") -> collections.Counter:
    """Counts of the endpoint's forward, jvp, vjp and kept-vjp runs (recomputes included)."""
    endpoint = server.registry.get(name)
    counts: collections.Counter = collections.Counter()
    for kind in ("forward", "jvp", "vjp", "vjp_kept"):
        def run(*args, _run=getattr(endpoint, f"run_{kind}"), _kind=kind):
            counts[_kind] += 1
            return _run(*args)
        setattr(endpoint, f"run_{kind}", run)
    return counts


def test_forward_mode(mix) -> None:
    _, client = mix
    f = client.jax("mix")
    x, y, p = data()
    tx, ty, tp = data(1)
    h = lambda g: lambda a, b, c: g(a, b, p=c)["h"]  # noqa: E731
    assert_trees_close(jax.jvp(h(f), (x, y, p), (tx, ty, tp)),
                       jax.jvp(h(mix_jax), (x, y, p), (tx, ty, tp)))
    assert_trees_close(jax.jit(lambda a: jax.jvp(h(f), (a, y, p), (tx, ty, tp)))(x),
                       jax.jvp(h(mix_jax), (x, y, p), (tx, ty, tp)))
    assert_trees_close(jax.jacfwd(h(f), argnums=(0, 1, 2))(x, y, p),
                       jax.jacfwd(h(mix_jax), argnums=(0, 1, 2))(x, y, p))
    _, lin = jax.linearize(lambda a: h(f)(a, y, p), x)
    _, lin_l = jax.linearize(lambda a: h(mix_jax)(a, y, p), x)
    assert_trees_close(lin(tx), lin_l(tx))
    assert_trees_close(jax.vmap(lambda t: jax.jvp(h(f), (x, y, p), (t, ty, tp))[1])(jnp.stack([tx, x])),
                       jax.vmap(lambda t: jax.jvp(h(mix_jax), (x, y, p), (t, ty, tp))[1])(
                           jnp.stack([tx, x])))
    out, tangents = jax.jvp(lambda a: f(a, y, p=p), (x,), (tx,))
    assert jnp.issubdtype(out["n"].dtype, jnp.integer) and tangents["n"].dtype == jax.dtypes.float0


def test_jacfwd_is_one_jvp_with_a_batch_of_tangents(mix) -> None:
    server, client = mix
    f = client.jax("mix")
    x, y, p = data()
    endpoint = server.registry.get("mix")
    batches, original = [], endpoint.run_jvp

    def counted(inputs, tangents, batched):
        batches.append(batched)
        return original(inputs, tangents, batched)

    endpoint.run_jvp = counted
    jax.jacfwd(lambda a: f(a, y, p=p)["h"])(x)
    assert batches == [True]


def test_each_derivative_sends_few_calls_and_recomputes_nothing(mix) -> None:
    """A residual serves every use of it: one Forward per derivative of any order, none
    recomputed, and each level's Vjps batched over a jacfwd's tangents."""
    server, client = mix
    f = client.jax("mix")
    x, y, p = data()
    counts = counting(server)
    h = lambda a: f(a, y, p=p)["h"]  # noqa: E731
    cases = [
        (lambda: jax.hessian(lambda a: loss(f)(a, y, p))(x),
         {"forward": 1, "jvp": 1, "vjp_kept": 1, "vjp": 2}),
        (lambda: jax.grad(lambda a: jnp.sum(jax.grad(lambda b: loss(f)(b, y, p))(a) ** 2))(x),
         {"forward": 1, "vjp_kept": 1, "vjp": 2}),
        (lambda: jax.jacfwd(jax.jacfwd(h))(x),   # kept Vjps: one at w = 0, one per tangent
         {"forward": 1, "jvp": 1, "vjp_kept": 1 + x.size, "vjp": x.size}),
        (lambda: jax.grad(lambda a: jnp.sum(jax.grad(lambda b: jnp.sum(
            jax.grad(lambda c: loss(f)(c, y, p))(b) ** 2))(a) ** 2))(x),
         {"forward": 1, "vjp_kept": 3, "vjp": 4}),
    ]
    for run, want in cases:
        counts.clear()
        before = client.recomputes
        run()
        assert dict(counts) == want
        assert client.recomputes == before


def test_second_order(mix) -> None:
    _, client = mix
    f = client.jax("mix")
    x, y, p = data()
    assert_trees_close(jax.hessian(loss(f), argnums=(0, 1, 2))(x, y, p),
                       jax.hessian(loss(mix_jax), argnums=(0, 1, 2))(x, y, p))
    assert_trees_close(jax.jit(jax.hessian(loss(f)))(x, y, p),
                       jax.hessian(loss(mix_jax))(x, y, p))
    grad_norm = lambda g: lambda a: jnp.sum(jax.grad(loss(g), argnums=(0, 2))(a, y, p)[1] ** 2)  # noqa: E731
    assert_trees_close(jax.grad(grad_norm(f))(x), jax.grad(grad_norm(mix_jax))(x))
    h = lambda g: lambda a: g(a, y, p=p)["h"]  # noqa: E731
    assert_trees_close(jax.jacrev(jax.jacrev(h(f)))(x), jax.jacrev(jax.jacrev(h(mix_jax)))(x))
    v = data(2)[0]
    hvp = lambda g: jax.jvp(jax.grad(lambda a: loss(g)(a, y, p)), (x,), (v,))[1]  # noqa: E731
    assert_trees_close(hvp(f), hvp(mix_jax))
    # forward over forward: the JVP's own derivative in x (and its transposes, grad of jvp)
    assert_trees_close(jax.jacfwd(jax.jacfwd(h(f)))(x), jax.jacfwd(jax.jacfwd(h(mix_jax)))(x))
    jvp2 = lambda g: jax.jvp(lambda a: jax.jvp(h(g), (a,), (v,))[1], (x,), (2 * v,))[1]  # noqa: E731
    assert_trees_close(jvp2(f), jvp2(mix_jax))
    grad_jvp = lambda g: jax.grad(lambda a: jnp.sum(jnp.sin(jax.jvp(h(g), (a,), (jnp.cos(a),))[1])))(x)  # noqa: E731
    assert_trees_close(grad_jvp(f), grad_jvp(mix_jax))
    xs = jnp.stack([x, 2 * x])
    assert_trees_close(jax.vmap(jax.hessian(lambda a: loss(f)(a, y, p)))(xs),
                       jax.vmap(jax.hessian(lambda a: loss(mix_jax)(a, y, p)))(xs))
    check_grads(lambda a, c: f(a, y, p=c)["h"], (x, p), order=1, modes=["fwd"])


def test_lost_residuals_are_recomputed(serve, x64) -> None:
    _, client = serve({"mix": TorchEndpoint(mix_torch)})
    f = client.jax("mix", residuals_kept=0)   # every token is forgotten at once
    x, y, p = data()
    before = client.recomputes
    assert_trees_close(jax.hessian(loss(f))(x, y, p), jax.hessian(loss(mix_jax))(x, y, p))
    assert_trees_close(jax.grad(loss(f))(x, y, p), jax.grad(loss(mix_jax))(x, y, p))
    assert client.recomputes > before
    # a level lost is remade from the inputs and every level's cotangents, in one call
    grad3 = jax.grad(lambda a: jnp.sum(jax.grad(lambda b: jnp.sum(
        jax.grad(lambda c: loss(f)(c, y, p))(b) ** 2))(a) ** 2))
    local3 = jax.grad(lambda a: jnp.sum(jax.grad(lambda b: jnp.sum(
        jax.grad(lambda c: loss(mix_jax)(c, y, p))(b) ** 2))(a) ** 2))
    assert_trees_close(grad3(x), local3(x), scaled=True)


def test_forward_mode_alone_leaves_a_bounded_number_of_residuals(serve, x64) -> None:
    """A Forward under jax.jvp keeps a residual in case reverse mode follows (forward over
    reverse); with none following, the server holds no more than SEEN_KEPT of them."""
    from gradserve.client.jax import SEEN_KEPT
    _, client = serve({"mix": TorchEndpoint(mix_torch)})
    f = client.jax("mix")
    x, y, p = data()
    for _ in range(SEEN_KEPT + 4):
        jax.jvp(lambda a: f(a, y, p=p)["h"], (x,), (x,))
    f(x, y, p=p)   # releases go with the next call
    assert client.describe("mix").residuals.count == SEEN_KEPT


def test_third_and_fourth_order(mix) -> None:
    _, client = mix
    f = client.jax("mix")
    x, y, p = data()
    h = lambda g: lambda a: g(a, y, p=p)["h"]  # noqa: E731
    sq = lambda g: lambda a: jnp.sum(g(a) ** 2)  # noqa: E731
    grad3 = lambda g: jax.grad(sq(jax.grad(sq(jax.grad(lambda a: loss(g)(a, y, p))))))  # noqa: E731
    assert_trees_close(grad3(f)(x), grad3(mix_jax)(x), scaled=True)
    assert_trees_close(jax.jit(grad3(f))(x), grad3(mix_jax)(x), scaled=True)
    assert_trees_close(jax.grad(sq(grad3(f)))(x), jax.grad(sq(grad3(mix_jax)))(x), scaled=True)
    row = lambda g: lambda a: h(g)(jnp.concatenate([a, x[1:]]))  # noqa: E731
    assert_trees_close(jax.jacfwd(jax.jacfwd(jax.jacfwd(row(f))))(x[:1]),
                       jax.jacfwd(jax.jacfwd(jax.jacfwd(row(mix_jax))))(x[:1]))
    hess_sum = lambda g: jax.grad(lambda a: jnp.sum(jnp.sin(  # noqa: E731
        jax.hessian(lambda b: loss(g)(b, y, p))(a))), argnums=0)
    assert_trees_close(hess_sum(f)(x), hess_sum(mix_jax)(x))
    v = data(2)[0]
    jvp3 = lambda g: jax.jvp(lambda a: jax.jvp(lambda b: jax.jvp(  # noqa: E731
        h(g), (b,), (v,))[1], (a,), (v,))[1], (x,), (jnp.cos(x),))[1]
    assert_trees_close(jvp3(f), jvp3(mix_jax))
    xs = jnp.stack([x, 2 * x])
    assert_trees_close(jax.vmap(grad3(f))(xs), jax.vmap(grad3(mix_jax))(xs), scaled=True)


def test_what_the_jax_client_refuses(serve, x64) -> None:
    _, client = serve({"cplx": JaxEndpoint(lambda z: jnp.sin(z) * z)})
    z = jnp.asarray([1 + 2j, 0.5 - 1j])
    c = client.jax("cplx")
    with pytest.raises(NotImplementedError, match="complex inputs or outputs"):
        jax.jvp(jax.grad(lambda u: jnp.sum(jnp.abs(c(u)) ** 2)), (z,), (z,))
