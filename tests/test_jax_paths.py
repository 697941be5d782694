"""JAX endpoints' own behaviour, the Signature RPC, and the JAX client's residual handling."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gradserve
from frameworks_impl import MODEL_PARAMS, endpoints, model_jax
from gradserve.server.jax_endpoint import JaxEndpoint
from gradserve.server.torch_endpoint import TorchEndpoint
from gradserve.wire.specs import TensorType

TOL = dict(rtol=2e-5, atol=2e-5)


def test_signature_of_torch_endpoint_uses_fake_tensors_and_is_cached(serve) -> None:
    calls = []

    def big(x, *, k):
        calls.append(type(x).__name__)
        return {"y": x @ x.T, "n": x.sum(-1).long(), "k": k}

    _, client = serve({"big": big})
    spec = TensorType((20_000, 30_000), "float32")   # 2.4 GB if it really ran
    out = client.signature("big", (spec,), {"k": 3})
    assert out == {"y": TensorType((20_000, 20_000), "float32"),
                   "n": TensorType((20_000,), "int64"), "k": 3}
    assert calls == ["FakeTensor"]
    client.signature("big", (spec,), {"k": 3})
    assert calls == ["FakeTensor"]          # served from the server's cache


def test_signature_falls_back_to_one_dry_run(serve) -> None:
    def via_numpy(x):
        return torch.from_numpy(np.asarray(x.numpy()) * 2)   # fake tensors have no data

    _, client = serve({"np": via_numpy})
    assert client.signature("np", (TensorType((3, 2), "float64"),)) == TensorType((3, 2), "float64")


def test_signature_of_jax_endpoint_and_errors(serve) -> None:
    _, client = serve(endpoints("jax"))
    assert client.signature("model", (TensorType((7, 5), "float32"),)) == TensorType((7, 3), "float32")
    out = client.signature("multi", (TensorType((2, 5), "float32"), TensorType((2, 4), "float32")),
                           {"scale": TensorType((2, 3), "float32")})
    assert out["argmax"] == TensorType((2,), "int32")
    with pytest.raises(gradserve.InvalidArgument, match="missing a required argument: 'x'"):
        client.signature("model", ())
    with pytest.raises(gradserve.Internal, match="endpoint 'model' raised TypeError"):
        client.signature("model", (TensorType((7, 4), "float32"),))


def test_signature_of_arrays_sends_their_types_only(serve) -> None:
    _, client = serve(endpoints("jax"))
    big = np.zeros((1 << 18, 5), np.float32)       # 5 MiB: past a chunk, and a message
    assert client.signature("model", (big,)) == TensorType((1 << 18, 3), "float32")


def test_jax_backwards_keep_their_compilation_and_signatures_compile_nothing(serve) -> None:
    endpoint = JaxEndpoint(lambda x: jnp.sin(x) * 3, compile_cache=1)
    _, client = serve({"f": endpoint})
    x = np.linspace(0, 1, 5, dtype=np.float32)
    res = client.forward("f", (x,), need_vjp=True)
    assert endpoint.compiles == 1
    client.forward("f", (np.ones(7, np.float32),), need_vjp=True)   # evicts the first
    assert client.signature("f", (TensorType((3,), "float32"),)) == TensorType((3,), "float32")
    assert endpoint.compiles == 2
    (grad,) = client.vjp(res.residual, np.ones(5, np.float32)).args
    np.testing.assert_allclose(grad, 3 * np.cos(x), rtol=1e-6)
    assert endpoint.compiles == 2                   # the backward used its forward's own


def test_jax_endpoint_bad_inputs(serve) -> None:
    _, client = serve(endpoints("jax"))
    x = np.ones((2, 5), np.float32)
    with pytest.raises(gradserve.InvalidArgument, match="float64 input, but this server's JAX runs "
                                                        "without 64-bit types"):
        client.forward("model", (np.ones((2, 5)),))
    with pytest.raises(gradserve.InvalidArgument, match=r"parameters\['bias'\]: expected float32\[3\]"):
        client.forward("model", (x,), parameters={"weight": MODEL_PARAMS["weight"],
                                                  "bias": np.ones(4, np.float32)})
    with pytest.raises(gradserve.InvalidArgument, match="expected a dict with keys"):
        client.forward("model", (x,), parameters={"weight": MODEL_PARAMS["weight"]})
    with pytest.raises(gradserve.InvalidArgument, match="endpoint 'wave' takes no parameters"):
        client.forward("wave", (x, x), parameters={})
    res = client.forward("model", (x,), need_vjp=True)
    with pytest.raises(gradserve.InvalidArgument, match=r"cotangent for output tensor #0: expected "
                                                        r"float32\[2, 3\], got float32\[2, 4\]"):
        client.vjp(res.residual, np.ones((2, 4), np.float32))


def test_jax_endpoint_batched_cotangents_low_level(serve) -> None:
    _, client = serve(endpoints("jax"))
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    res = client.forward("model", (x,), need_vjp=True)
    basis = np.eye(6, dtype=np.float32).reshape(6, 2, 3)
    grads = client.vjp(res.residual, basis, batched=True)
    params = jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    jac = jax.jacrev(lambda v: model_jax(params, v))(x).reshape(6, 2, 5)
    np.testing.assert_allclose(grads.args[0], jac, **TOL)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_jax_client_survives_forgotten_tokens_and_lost_residuals(serve, framework) -> None:
    server, client = serve(endpoints(framework))
    f = client.jax("model")
    params = jax.tree_util.tree_map(jnp.asarray, MODEL_PARAMS)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32))
    want = jax.grad(lambda v: jnp.sum(model_jax(params, v) ** 2))(x)
    out, pull = jax.vjp(f, x)
    server.residuals.clear()                       # the server lost it
    np.testing.assert_allclose(pull(2 * out)[0], want, **TOL)
    forgetful = client.jax("model", residuals_kept=0)   # keeps no token for its backward
    out, pull = jax.vjp(forgetful, x)
    np.testing.assert_allclose(pull(2 * out)[0], want, **TOL)
    np.testing.assert_allclose(pull(2 * out)[0], want, **TOL)   # a vjp_fn used twice
    out, pull = jax.vjp(f, x)
    np.testing.assert_allclose(pull(2 * out)[0], want, **TOL)
    np.testing.assert_allclose(pull(2 * out)[0], want, **TOL)   # its token was consumed


def test_jax_client_releases_what_it_forgets(serve) -> None:
    _, client = serve(endpoints("jax"))
    f = client.jax("model", residuals_kept=3)
    x = jnp.ones((2, 5))
    for _ in range(10):
        jax.grad(lambda v: jnp.sum(f(v)))(x)     # each backward consumes its residual
    gc.collect()
    assert client.describe("model").residuals.endpoint_count == 0
    pulls = [jax.vjp(f, x)[1] for _ in range(10)]  # forwards whose backward never runs
    gc.collect()
    assert client.describe("model").residuals.endpoint_count == 3
    assert len(pulls) == 10


def test_cli_serves_a_dict_mixing_torch_and_jax(tmp_path) -> None:
    from gradserve.server.cli import build_endpoints, load_target
    from pathlib import Path

    name, obj = load_target(f"{Path(__file__).parent / 'cli_targets.py'}:jax_targets")
    eps = build_endpoints(name, obj, None)
    assert {n: type(e) for n, e in eps.items()} == {"jsin": JaxEndpoint, "tsq": TorchEndpoint}


ISOLATED = textwrap.dedent("""
    import sys
    sys.modules[{missing!r}] = None          # importing it now fails
    import numpy as np
    import gradserve
    client = gradserve.connect(sys.argv[1])
""")
JAX_BODY = textwrap.dedent("""
    import jax, jax.numpy as jnp
    f = client.jax("wave")
    x = jnp.ones((2, 3))
    print(jax.grad(lambda v: jnp.sum(f(v, x)))(x).shape)""")
TORCH_BODY = textwrap.dedent("""
    import torch
    x = torch.ones(2, 3, requires_grad=True)
    client.torch("wave")(x, x).sum().backward()
    print(tuple(x.grad.shape))""")


@pytest.mark.parametrize("missing, body, endpoint_framework", [
    ("torch", JAX_BODY, "jax"), ("jax", TORCH_BODY, "torch"), ("torch", JAX_BODY, "torch"),
], ids=["jax-client-no-torch", "torch-client-no-jax", "jax-client-no-torch-to-torch-endpoint"])
def test_each_client_runs_without_the_other_framework(serve, missing, body, endpoint_framework) -> None:
    server, _ = serve(endpoints(endpoint_framework))
    code = ISOLATED.format(missing=missing) + body + "\nclient.close()\n"
    out = subprocess.run([sys.executable, "-c", code, server.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 3)"


def test_jax_client_errors_keep_their_type_or_at_least_their_text(serve) -> None:
    def fails(x):
        if x.shape[0] == 3:
            raise ValueError("three rows")
        return x * 2

    _, client = serve({"fails": fails})
    f = client.jax("fails")
    np.testing.assert_allclose(f(jnp.ones(2)), 2 * np.ones(2))
    with pytest.raises(gradserve.Internal, match="endpoint 'fails' raised ValueError: three rows"):
        f(jnp.ones(3))
    with pytest.raises(Exception, match="(?s)endpoint 'fails' raised ValueError: three rows"):
        jax.jit(jax.grad(lambda v: jnp.sum(f(v))))(jnp.ones(3))
    with pytest.raises(gradserve.NotFound):
        client.jax("missing")(jnp.ones(2))   # fails at the Signature call, before any callback


def test_the_jax_client_asks_for_each_signature_once(serve) -> None:
    server, client = serve(endpoints("jax"))
    endpoint = server.registry.get("wave")
    asked, original = [], endpoint.signature
    endpoint.signature = lambda *a: asked.append(1) or original(*a)
    service_cache = server.service.signatures
    f = client.jax("wave")
    x = jnp.ones((2, 3))
    for _ in range(3):
        jax.grad(lambda v: jnp.sum(f(v, x)))(x)
    jax.jit(lambda v: f(v, x))(x)
    assert len(asked) == 1               # one server-side evaluation...
    service_cache.clear()
    f(jnp.ones((2, 3)), x)
    assert len(asked) == 1               # ...and no further request from the client's cache
    f(jnp.ones((4, 3)), jnp.ones((4, 3)))
    assert len(asked) == 2               # a new input signature is asked for once
