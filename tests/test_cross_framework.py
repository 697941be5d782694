"""Every pairing {torch client, JAX client} x {torch endpoint, JAX endpoint},
each compared against the same computation done locally in the client's framework."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from frameworks_impl import MODEL_PARAMS, ModelTorch, endpoints, model_jax, multi_jax, multi_torch, \
    wave_jax, wave_torch

ENDPOINTS = ["torch", "jax"]
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(params=ENDPOINTS)
def remote(request, serve):
    """(endpoint framework, server, client) for each endpoint framework."""
    server, client = serve(endpoints(request.param))
    return request.param, server, client


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return tuple(g.standard_normal(shape).astype(np.float32) for shape in ((4, 5), (4, 6), (4, 3)))


def count_forwards(server, name: str) -> list:
    """Record the input shapes of every Forward the endpoint runs."""
    endpoint = server.registry.get(name)
    seen, original = [], endpoint.run_forward

    def counting(inputs, need_vjp):
        seen.append(tuple(endpoint.leaf_type(a).shape for a in inputs.args))
        return original(inputs, need_vjp)

    endpoint.run_forward = counting
    return seen


# -- torch client ------------------------------------------------------------------
def test_torch_client_multi_io_kwargs_and_int_output(remote) -> None:
    framework, _, client = remote
    a, b, s = inputs()

    def run(f):
        ins = [torch.from_numpy(v).requires_grad_() for v in (a, b, s)]
        out = f(ins[0], ins[1], scale=ins[2])
        loss = out["out"][0].sum() + out["out"][1].pow(2).mean()
        loss.backward()
        return out, [t.grad for t in ins]

    out_r, grads_r = run(client.torch("multi"))
    out_l, grads_l = run(multi_torch)
    # the endpoint's own integer type: JAX without x64 computes argmax in int32
    argmax_dtype = torch.int64 if framework == "torch" else torch.int32
    assert isinstance(out_r["out"], tuple) and out_r["argmax"].dtype == argmax_dtype
    assert not out_r["argmax"].requires_grad
    assert torch.equal(out_r["argmax"].long(), out_l["argmax"])
    torch.testing.assert_close(grads_r, grads_l, **TOL)


def test_torch_client_held_parameters(remote) -> None:
    _, _, client = remote
    module = client.torch_module("model")
    assert sorted(n for n, _ in module.named_parameters()) == ["bias", "weight"]
    local = ModelTorch()
    x = torch.from_numpy(inputs()[0])
    for m in (module, local):
        m(x).pow(2).sum().backward()
    torch.testing.assert_close(module.weight.grad, local.weight.grad, **TOL)
    torch.testing.assert_close(module.bias.grad, local.bias.grad, **TOL)


def test_torch_client_float64_gradcheck(remote, x64) -> None:
    _, _, client = remote
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(client.torch("wave"), (x, y), fast_mode=True)


def test_torch_client_higher_order(remote, x64) -> None:
    """Hessians, Hessian-vector products and a third derivative through either framework's
    endpoint equal local torch at 1e-8 (float64)."""
    _, _, client = remote
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(2))
    f = client.torch("wave")
    assert client.describe("wave").reverse_order == 0
    tight = dict(rtol=1e-8, atol=1e-8)

    def remote_f(a, b):
        return f(a, b).sum()

    def local(a, b):
        return wave_torch(a, b).sum()

    torch.testing.assert_close(torch.autograd.functional.hessian(remote_f, (x, y)),
                               torch.autograd.functional.hessian(local, (x, y)), **tight)
    v = tuple(torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(2))
    torch.testing.assert_close(torch.autograd.functional.hvp(remote_f, (x, y), v)[1],
                               torch.autograd.functional.hvp(local, (x, y), v)[1], **tight)
    # forward over reverse through torch.func: Hessian-vector products and, for a scalar
    # function, the Hessian as jacfwd of grad
    loss_r = lambda a, b: torch.tanh(f(a, b)).sum()  # noqa: E731
    loss_l = lambda a, b: torch.tanh(wave_torch(a, b)).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.jvp(torch.func.grad(loss_r, argnums=(0, 1)), (x, y), v)[1],
                               torch.func.jvp(torch.func.grad(loss_l, argnums=(0, 1)), (x, y), v)[1],
                               **tight)
    torch.testing.assert_close(torch.func.jacfwd(torch.func.grad(loss_r))(x, y),
                               torch.func.jacfwd(torch.func.grad(loss_l))(x, y), **tight)
    F = torch.func
    for transform in (lambda h: F.hessian(h, argnums=(0, 1)), lambda h: F.jacrev(F.jacrev(h))):
        torch.testing.assert_close(transform(loss_r)(x, y), transform(loss_l)(x, y), **tight)
    torch.testing.assert_close(F.jacrev(F.jacrev(f))(x, y), F.jacrev(F.jacrev(wave_torch))(x, y),
                               **tight)
    # grad of grad where the inner cotangent depends on x (tanh' of f): that path too
    outer = lambda fn: F.grad(lambda a: F.grad(lambda b: torch.tanh(fn(b, y)).sum())(a).pow(2).sum())  # noqa: E731
    torch.testing.assert_close(outer(f)(x), outer(wave_torch)(x), **tight)
    xr = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(f(xr, y).sum(), xr, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), xr, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), xr)
    torch.testing.assert_close(g3, -torch.cos(x) * y.cos(), **tight)   # d3/dx3 sin(x) cos(y)


def test_torch_client_forward_mode(remote, x64) -> None:
    """torch.func.jvp, jacfwd and forward_ad's dual tensors through either framework's
    endpoint equal local torch at 1e-8 (float64)."""
    import torch.autograd.forward_ad as fwad

    _, _, client = remote
    g = torch.Generator().manual_seed(1)
    x, y, tx, ty = (torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(4))
    f = client.torch("wave")
    assert client.describe("wave").forward_mode
    tight = dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(torch.func.jvp(f, (x, y), (tx, ty))[1],
                               torch.func.jvp(wave_torch, (x, y), (tx, ty))[1], **tight)
    torch.testing.assert_close(torch.func.jacfwd(f, argnums=(0, 1))(x, y),
                               torch.func.jacfwd(wave_torch, argnums=(0, 1))(x, y), **tight)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(f(fwad.make_dual(x, tx), y)).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(lambda a: wave_torch(a, y), (x,),
                                                       (tx,))[1], **tight)


def test_torch_func_transforms(remote) -> None:
    _, server, client = remote
    from torch.func import grad, jacrev, vjp, vmap

    f, local = client.torch("batch"), ModelTorch()
    x = torch.from_numpy(inputs()[0])
    xs = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32))

    def loss(m):
        return lambda v: m(v).pow(2).sum()

    torch.testing.assert_close(grad(loss(f))(x), grad(loss(local))(x), **TOL)
    out, pull = vjp(f, x)
    torch.testing.assert_close(pull(torch.ones_like(out))[0], vjp(local, x)[1](torch.ones_like(out))[0], **TOL)
    torch.testing.assert_close(jacrev(f)(x), jacrev(local)(x), **TOL)
    seen = count_forwards(server, "batch")
    torch.testing.assert_close(vmap(f)(xs), vmap(local)(xs), **TOL)
    assert seen == [((12, 5),)]   # one merged call, not a Python loop
    torch.testing.assert_close(vmap(grad(loss(f)))(xs), vmap(grad(loss(local)))(xs), **TOL)


def test_torch_func_vmap_of_non_batchable_and_per_sample_parameter_grads(remote) -> None:
    _, server, client = remote
    from torch.func import functional_call, grad, vmap

    module, local = client.torch_module("model"), ModelTorch()
    xs = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 2, 5)).astype(np.float32))
    seen = count_forwards(server, "model")
    torch.testing.assert_close(vmap(module)(xs), vmap(local)(xs), **TOL)
    assert seen == [((2, 5),)] * 3        # not batchable: one call per element

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        loss = lambda p, x: functional_call(m, p, (x,)).pow(2).sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, xs)

    remote_grads, local_grads = per_sample(module), per_sample(local)
    assert remote_grads["weight"].shape == (3, 3, 5)
    torch.testing.assert_close(remote_grads, local_grads, **TOL)


# -- JAX client --------------------------------------------------------------------
def jax_loss(f):
    def loss(a, b, s):
        out = f(a, b, scale=s)
        return out["out"][0].sum() + jnp.mean(out["out"][1] ** 2)
    return loss


def test_jax_client_multi_io_kwargs_and_int_output(remote) -> None:
    _, _, client = remote
    a, b, s = map(jnp.asarray, inputs())
    f = client.jax("multi")
    out = f(a, b, scale=s)
    assert out["argmax"].dtype == jnp.int32
    np.testing.assert_array_equal(out["argmax"], multi_jax(a, b, scale=s)["argmax"])
    grads_r = jax.grad(jax_loss(f), argnums=(0, 1, 2))(a, b, s)
    grads_l = jax.grad(jax_loss(multi_jax), argnums=(0, 1, 2))(a, b, s)
    for r, l in zip(grads_r, grads_l):
        np.testing.assert_allclose(r, l, **TOL)
    value_r, _ = jax.value_and_grad(jax_loss(f))(a, b, s)
    np.testing.assert_allclose(value_r, jax_loss(multi_jax)(a, b, s), **TOL)


def test_jax_client_under_jit(remote) -> None:
    _, _, client = remote
    a, b, s = map(jnp.asarray, inputs())
    f = client.jax("multi")
    step = jax.jit(jax.value_and_grad(jax_loss(f)))
    for seed in range(3):   # the second and third calls reuse the compiled step
        a = jnp.asarray(inputs(seed)[0])
        value, g = step(a, b, s)
        lv, lg = jax.value_and_grad(jax_loss(multi_jax))(a, b, s)
        np.testing.assert_allclose(value, lv, **TOL)
        np.testing.assert_allclose(g, lg, **TOL)
    only_grad = jax.jit(jax.grad(jax_loss(f)))(a, b, s)   # forward outputs unused
    np.testing.assert_allclose(only_grad, jax.grad(jax_loss(multi_jax))(a, b, s), **TOL)


def test_jax_client_held_parameters(remote) -> None:
    _, _, client = remote
    f = client.jax("model")
    params = client.jax_params("model")
    assert sorted(params) == ["bias", "weight"]
    x = jnp.asarray(inputs()[0])
    g_r = jax.grad(lambda p: jnp.sum(f.apply(p, x) ** 2))(params)
    local = jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    g_l = jax.grad(lambda p: jnp.sum(model_jax(p, x) ** 2))(local)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(g_r[k], g_l[k], **TOL)


def test_jax_client_vmap_is_one_batched_call(remote) -> None:
    _, server, client = remote
    f, params = client.jax("batch"), jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32))
    seen = count_forwards(server, "batch")
    np.testing.assert_allclose(jax.vmap(f)(xs), jax.vmap(lambda x: model_jax(params, x))(xs), **TOL)
    assert seen == [((12, 5),)]
    loss_r = lambda x: jnp.sum(f(x) ** 2)  # noqa: E731
    loss_l = lambda x: jnp.sum(model_jax(params, x) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(loss_r)))(xs),
                               jax.vmap(jax.grad(loss_l))(xs), **TOL)
    np.testing.assert_allclose(jax.jacrev(f)(xs[0]), jax.jacrev(lambda x: model_jax(params, x))(xs[0]), **TOL)


def test_jax_client_vmap_of_non_batchable_runs_per_element(remote) -> None:
    _, server, client = remote
    f = client.jax("model")
    params = jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    xs = jnp.asarray(np.random.default_rng(3).standard_normal((3, 2, 5)).astype(np.float32))
    seen = count_forwards(server, "model")
    np.testing.assert_allclose(jax.vmap(f)(xs), jax.vmap(lambda x: model_jax(params, x))(xs), **TOL)
    assert seen == [((2, 5),)] * 3


def test_jax_client_float64_check_grads(remote, x64) -> None:
    _, _, client = remote
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 4)))
    y = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4)))
    assert x.dtype == jnp.float64
    check_grads(client.jax("wave"), (x, y), order=1, modes=["rev"])


def test_jax_client_higher_order(remote, x64) -> None:
    """jax.hessian, grad of grad and a Hessian-vector product through either framework's
    endpoint equal local JAX at 1e-8 (float64)."""
    _, _, client = remote
    g = np.random.default_rng(6)
    x, y, v = (jnp.asarray(g.standard_normal((3, 4))) for _ in range(3))
    f = client.jax("wave")
    loss_r = lambda a, b: jnp.sum(jnp.tanh(f(a, b)))  # noqa: E731
    loss_l = lambda a, b: jnp.sum(jnp.tanh(wave_jax(a, b)))  # noqa: E731
    tight = dict(rtol=1e-8, atol=1e-8)
    for r, l in zip(jax.tree.leaves(jax.hessian(loss_r, argnums=(0, 1))(x, y)),
                    jax.tree.leaves(jax.hessian(loss_l, argnums=(0, 1))(x, y))):
        np.testing.assert_allclose(r, l, **tight)
    np.testing.assert_allclose(jax.grad(lambda a: jnp.sum(jax.grad(loss_r)(a, y) ** 2))(x),
                               jax.grad(lambda a: jnp.sum(jax.grad(loss_l)(a, y) ** 2))(x), **tight)
    np.testing.assert_allclose(jax.jvp(jax.grad(loss_r), (x, y), (v, v))[1],
                               jax.jvp(jax.grad(loss_l), (x, y), (v, v))[1], **tight)


def test_jax_client_forward_mode(remote, x64) -> None:
    """jax.jvp and jax.jacfwd through either framework's endpoint equal local JAX at 1e-8."""
    _, _, client = remote
    g = np.random.default_rng(7)
    x, y, tx, ty = (jnp.asarray(g.standard_normal((3, 4))) for _ in range(4))
    f = client.jax("wave")
    tight = dict(rtol=1e-8, atol=1e-8)
    for r, l in zip(jax.jvp(f, (x, y), (tx, ty)), jax.jvp(wave_jax, (x, y), (tx, ty))):
        np.testing.assert_allclose(r, l, **tight)
    for r, l in zip(jax.jacfwd(f, argnums=(0, 1))(x, y), jax.jacfwd(wave_jax, argnums=(0, 1))(x, y)):
        np.testing.assert_allclose(r, l, **tight)


# -- the seed library's examples -------------------------------------------------
def test_seed_example_stax_dense_params_gradient(serve) -> None:
    """PyCallChainRules' JaxFunctionWrapper example: stax.Dense(16) on (64, 32), remote."""
    from jax.example_libraries import stax

    init, apply = stax.Dense(16)
    _, params = init(jax.random.PRNGKey(0), (-1, 32))
    from gradserve.server.jax_endpoint import JaxEndpoint
    _, client = serve({"dense": JaxEndpoint(jax.jit(apply), params=params)})
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 32))
    y = jax.random.normal(jax.random.PRNGKey(2), (64, 16))
    remote = client.jax("dense")
    p = client.jax_params("dense")
    grad_r = jax.grad(lambda p: jnp.sum(remote.apply(p, x) - y))(p)
    grad_l = jax.grad(lambda p: jnp.sum(apply(p, x) - y))(params)
    for r, l in zip(jax.tree_util.tree_leaves(grad_r), jax.tree_util.tree_leaves(grad_l)):
        np.testing.assert_allclose(r, l, rtol=1e-6, atol=1e-5)


def test_complex_gradients_agree_across_every_pairing(serve) -> None:
    """The wire carries torch's complex convention; the JAX sides convert."""
    from gradserve.server.jax_endpoint import JaxEndpoint
    from gradserve.server.torch_endpoint import TorchEndpoint

    coef = np.complex64(1 + 2j)
    _, client = serve({"torch": TorchEndpoint(lambda z: z * torch.tensor(coef) + z.conj() ** 2),
                       "jax": JaxEndpoint(jax.jit(lambda z: z * coef + jnp.conj(z) ** 2))})
    z = np.array([1 + 0.5j, -2 + 3j], np.complex64)
    zt = torch.from_numpy(z.copy()).requires_grad_()
    (zt * torch.tensor(coef) + zt.conj() ** 2).abs().pow(2).sum().backward()
    jax_local = jax.grad(lambda v: jnp.sum(jnp.abs(v * coef + jnp.conj(v) ** 2) ** 2))(jnp.asarray(z))
    for name in ("torch", "jax"):
        zr = torch.from_numpy(z.copy()).requires_grad_()
        client.torch(name)(zr).abs().pow(2).sum().backward()
        torch.testing.assert_close(zr.grad, zt.grad, **TOL)
        remote = client.jax(name)
        g = jax.grad(lambda v, f=remote: jnp.sum(jnp.abs(f(v)) ** 2))(jnp.asarray(z))
        np.testing.assert_allclose(g, jax_local, **TOL)


def test_jax_client_with_a_numpy_float64_argument_and_x64_off(remote) -> None:
    _, _, client = remote
    f = client.jax("wave")
    x = jnp.ones(3)
    grad = jax.grad(lambda v: jnp.sum(f(v, np.ones(3))))(x)   # numpy float64: JAX narrows it
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, np.cos(1.0) * np.cos(1.0) + 1.0, **TOL)


def test_static_arguments_that_compare_equal_are_not_confused(serve) -> None:
    from gradserve.server.jax_endpoint import JaxEndpoint
    _, client = serve({"full": JaxEndpoint(lambda n: jnp.full((2,), n))})
    assert [client.forward("full", (v,)).outputs.dtype.name for v in (1, 1.0, True)] == \
        ["int32", "float32", "bool"]
