"""Gradients through a remote torch endpoint equal local autograd."""

from __future__ import annotations

import gc

import pytest
import torch

from models import ConvNet, MultiIO, mlp, pytree_fn

TOL = dict(rtol=1e-6, atol=1e-6)


def local_and_remote_grads(fn, remote, make_inputs, loss=lambda out: out.pow(2).sum()):
    """Input gradients of loss(fn(*inputs)) computed locally and through ``remote``."""
    local_in = make_inputs()
    remote_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in local_in]
    local_out, remote_out = fn(*local_in), remote(*remote_in)
    torch.testing.assert_close(remote_out, local_out, **TOL)
    loss(local_out).backward()
    loss(remote_out).backward()
    return [t.grad for t in local_in], [t.grad for t in remote_in]


def test_mlp_input_gradients(serve) -> None:
    model = mlp()
    _, client = serve({"mlp": model})
    local, remote = local_and_remote_grads(
        model, client.torch("mlp"), lambda: [torch.randn(8, 6, requires_grad=True)])
    torch.testing.assert_close(remote, local, **TOL)


def test_conv_net_input_gradients(serve) -> None:
    model = ConvNet()
    _, client = serve({"conv": model})
    local, remote = local_and_remote_grads(
        model, client.torch("conv"), lambda: [torch.randn(3, 2, 5, 5, requires_grad=True)])
    torch.testing.assert_close(remote, local, **TOL)


def test_multi_input_kwargs_dict_tuple_and_int_outputs(serve) -> None:
    model = MultiIO()
    _, client = serve({"multi": model})
    remote = client.torch("multi")
    g = torch.Generator().manual_seed(3)
    a, b, scale = (torch.randn(4, 5, generator=g) for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()

    def run(f):
        ins = [t.clone().requires_grad_() for t in (a, b, scale)]
        out = f(ins[0], ins[1], scale=ins[2], mask=mask, mode="mean")
        loss = out["out"].sum() + out["pair"][0].mean() + (out["pair"][1] ** 2).sum()
        loss.backward()
        return out, [t.grad for t in ins]

    local_out, local_grads = run(model)
    remote_out, remote_grads = run(remote)
    assert remote_out["mode"] == "mean"
    assert remote_out["argmax"].dtype == torch.int64 and not remote_out["argmax"].requires_grad
    assert torch.equal(remote_out["argmax"], local_out["argmax"])
    assert isinstance(remote_out["pair"], tuple)
    torch.testing.assert_close(remote_grads, local_grads, **TOL)
    assert remote_grads[2] is not None  # the tensor keyword argument got its gradient


def test_nested_pytree_inputs(serve) -> None:
    _, client = serve({"tree": pytree_fn})
    g = torch.Generator().manual_seed(4)
    x, y, w = torch.randn(3, 2, generator=g), torch.randn(4, generator=g), torch.randn(2, 2, generator=g)

    def run(f):
        xs = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        wt = w.clone().requires_grad_()
        out = f({"xs": xs}, weights={"w": wt})
        (out[0].sum() + out[1].sum()).backward()
        return [xs[0].grad, xs[1].grad, wt.grad]

    torch.testing.assert_close(run(client.torch("tree")), run(pytree_fn), **TOL)


def test_only_inputs_that_require_grad_are_differentiated(serve) -> None:
    seen = []

    def spy(a, b, *, c):
        seen.append((a.requires_grad, b.requires_grad, c.requires_grad))
        return a * b + c

    _, client = serve({"spy": spy})
    a = torch.randn(2, 5, requires_grad=True)
    b, c = torch.randn(2, 5), torch.randn(2, 5)
    client.torch("spy")(a, b, c=c).sum().backward()
    assert seen == [(True, False, False)]
    torch.testing.assert_close(a.grad, b, **TOL)
    assert b.grad is None and c.grad is None


def test_float64_gradcheck_through_remote(serve) -> None:
    model = mlp(dtype=torch.float64)
    _, client = serve({"mlp64": model, "fn": lambda x, y: (x * y.sin()).cumsum(0)})
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(client.torch("mlp64"), (x,))
    y = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(client.torch("fn"), (x, y))


def test_autograd_grad_and_retain_graph_second_backward(serve) -> None:
    model = mlp()
    server, client = serve({"mlp": model})
    x = torch.randn(5, 6, requires_grad=True)
    out = client.torch("mlp")(x).pow(2).sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    xl = x.detach().clone().requires_grad_()
    (gl,) = torch.autograd.grad(model(xl).pow(2).sum(), xl)
    torch.testing.assert_close(g1, gl, **TOL)
    torch.testing.assert_close(g2, gl, **TOL)


def test_double_backward_equals_local(serve) -> None:
    model = mlp()
    _, client = serve({"mlp": model})
    x = torch.randn(2, 6, requires_grad=True)
    (g,) = torch.autograd.grad(client.torch("mlp")(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    xl = x.detach().clone().requires_grad_()
    (gl,) = torch.autograd.grad(model(xl).pow(2).sum(), xl, create_graph=True)
    gl.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xl.grad, **TOL)


@pytest.fixture
def linear_in_outputs(serve):
    """An endpoint whose loss below is linear in its outputs: the second derivative comes
    only through the remote function (it was once silently zero)."""
    _, client = serve({"f": lambda v: v.sin() * v})
    return client.torch("f")


def second(x: torch.Tensor) -> torch.Tensor:
    """d2/dx2 of x sin x."""
    return 2 * x.cos() - x * x.sin()


def test_create_graph_gives_a_gradient_that_is_differentiated_remotely(linear_in_outputs) -> None:
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(linear_in_outputs(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g, x.detach().cos() * x.detach() + x.detach().sin())
    assert g.requires_grad              # it depends on x: autograd must know
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, second(x.detach()), rtol=1e-12, atol=1e-12)


def test_hessian_through_a_remote_node_equals_local(linear_in_outputs) -> None:
    x = torch.randn(4, dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda v: linear_in_outputs(v).sum(), x)
    torch.testing.assert_close(h, torch.diag(second(x)), rtol=1e-12, atol=1e-12)


def test_torch_func_grad_of_grad(linear_in_outputs) -> None:
    from torch.func import grad
    x = torch.randn(3, dtype=torch.float64)
    first = grad(lambda v: linear_in_outputs(v).sum())(x)
    torch.testing.assert_close(first, x.cos() * x + x.sin())
    twice = grad(lambda v: grad(lambda u: linear_in_outputs(u).sum())(v).sum())(x)
    torch.testing.assert_close(twice, second(x), rtol=1e-12, atol=1e-12)


def test_builtins_are_servable_as_they_are(serve) -> None:
    server, client = serve({"sin": torch.sin, "add": torch.add})
    x = torch.randn(4, requires_grad=True)
    client.torch("sin")(x).sum().backward()
    torch.testing.assert_close(x.grad, x.detach().cos())
    out = client.torch("add")(torch.ones(2), torch.ones(2), alpha=3)
    torch.testing.assert_close(out, torch.full((2,), 4.0))
    assert "sin(*args, **kwargs)" in [e.signature for e in client.endpoints()]


def test_zero_tensor_gradients_come_back_as_zeros(serve) -> None:
    _, client = serve({"sgn": torch.sgn})
    x = torch.randn(3, requires_grad=True)
    client.torch("sgn")(x).sum().backward()      # autograd's gradient of sgn is a ZeroTensor
    assert torch.equal(x.grad, torch.zeros(3))


def test_gradients_with_unusual_strides_travel(serve) -> None:
    def blocks(a, b):
        return torch.block_diag(a, b)

    _, client = serve({"blocks": blocks})
    a, b = torch.randn(1, 1, requires_grad=True), torch.randn(1, 1, requires_grad=True)
    client.torch("blocks")(a, b).sum().backward()
    assert torch.equal(a.grad, torch.ones(1, 1)) and torch.equal(b.grad, torch.ones(1, 1))
    x = torch.tensor(2.0).expand(1)                # one element behind a zero stride
    torch.testing.assert_close(client.torch("blocks")(x.reshape(1, 1), x.reshape(1, 1)),
                               torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_client_held_parameters_fine_tune_like_local_sgd(serve) -> None:
    local = mlp()
    served = mlp()  # same seed: identical weights
    _, client = serve({"mlp": served})
    remote = client.torch_module("mlp")
    assert [n for n, _ in remote.named_parameters()] == [n for n, _ in local.named_parameters()]
    opt_l = torch.optim.SGD(local.parameters(), lr=0.1)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, target = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
        for module, opt in ((local, opt_l), (remote, opt_r)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(module(x), target).backward()
            opt.step()
    for (name, p_local), (_, p_remote) in zip(local.named_parameters(), remote.named_parameters()):
        torch.testing.assert_close(p_remote, p_local, rtol=1e-5, atol=1e-6, msg=name)
    # the server's own weights are untouched: the client holds the trained copy
    torch.testing.assert_close(served[0].weight, mlp()[0].weight, rtol=0, atol=0)


def test_seed_example_linear_parameter_gradients(serve) -> None:
    """PyCallChainRules' TorchModuleWrapper example, with the model remote."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    _, client = serve({"linear": linear})
    remote = client.torch_module("linear")
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    (remote(x) - target).sum().backward()
    local = torch.nn.Linear(32, 16)
    local.load_state_dict(linear.state_dict())
    (local(x) - target).sum().backward()
    torch.testing.assert_close(remote.weight.grad, local.weight.grad, **TOL)
    torch.testing.assert_close(remote.bias.grad, local.bias.grad, **TOL)


def test_no_grad_calls_keep_no_residual(serve) -> None:
    _, client = serve({"mlp": mlp()})
    x = torch.randn(2, 6, requires_grad=True)
    with torch.no_grad():
        y = client.torch("mlp")(x)
    assert not y.requires_grad
    assert client.describe("mlp").residuals.count == 0


def test_released_when_graph_is_freed(serve) -> None:
    _, client = serve({"mlp": mlp()})
    f = client.torch("mlp")
    x = torch.randn(2, 6, requires_grad=True)
    outs = [f(x) for _ in range(5)]
    assert client.describe("mlp").residuals.count == 5
    outs[0].sum().backward()
    del outs
    gc.collect()
    stats = client.describe("mlp").residuals
    assert (stats.count, stats.bytes) == (0, 0)


def test_forward_without_backward_does_not_leak(serve) -> None:
    _, client = serve({"mlp": mlp()})
    f = client.torch("mlp")
    x = torch.randn(2, 6, requires_grad=True)
    for _ in range(20):
        f(x).sum()  # graph dropped at once
    gc.collect()
    assert client.describe("mlp").residuals.count == 0


def test_low_level_forward_vjp_release_on_numpy(serve) -> None:
    model = mlp()
    _, client = serve({"mlp": model})
    x = torch.randn(3, 6)
    res = client.forward("mlp", (x.numpy(),), need_vjp=True)
    assert res.outputs.shape == (3, 4)
    ct = torch.randn(3, 4)
    grads = client.vjp(res.residual, ct.numpy())
    xl = x.clone().requires_grad_()
    model(xl).backward(ct)
    torch.testing.assert_close(torch.from_numpy(grads.args[0]), xl.grad, **TOL)
    assert client.describe("mlp").residuals.count == 1
    assert client.release(res.residual) == 1
    assert client.describe("mlp").residuals.count == 0
    # a released residual is recomputed from the kept inputs
    again = client.vjp(res.residual, ct.numpy())
    torch.testing.assert_close(torch.from_numpy(again.args[0]), xl.grad, **TOL)


def test_serving_leaves_the_callers_module_untouched(serve) -> None:
    model = mlp()
    model.train()
    server, client = serve({"mlp": model})
    assert model.training and all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 6)
    with torch.no_grad():
        model[0].weight.mul_(2)          # in-place updates show through: storage is shared
        expected = model(x)
    torch.testing.assert_close(client.torch("mlp")(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already registered as 'mlp'"):
        server.add("again", server.registry.get("mlp"))
