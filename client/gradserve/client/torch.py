"""Remote endpoints as torch autograd nodes.

``RemoteFunction`` calls an endpoint on torch tensors; when any input requires
grad, the call is recorded as one autograd node (``_RemoteForward``) whose
backward sends a Vjp. The backward is itself an autograd function
(``_RemoteBackward``) so that differentiating a gradient fails with a clear
message instead of silently returning wrong numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from gradserve import pytree
from gradserve.client.core import Call, Client, Residual
from gradserve.frameworks import WireTensor
from gradserve.frameworks.torch import ADAPTER, is_differentiable


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _torch_leaf(wire: WireTensor, path: str) -> torch.Tensor:
    return ADAPTER.from_wire(wire)


def _leaf_maker(leaves: list[torch.Tensor]) -> Any:
    """Decode outputs onto the device of the caller's first non-CPU input, if any."""
    device = next((t.device for t in leaves if t.device.type != "cpu"), None)
    if device is None:
        return _torch_leaf
    return lambda wire, path: ADAPTER.from_wire(wire).to(device, non_blocking=True)


class _State:
    """What one remote call's forward hands its backward."""

    def __init__(self, fn: "RemoteFunction", treedef: pytree.TreeDef, make_leaf: Any):
        self.fn = fn
        self.treedef = treedef
        self.make_leaf = make_leaf
        self.out_def: pytree.TreeDef | None = None
        self.residual: Residual | None = None


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, state: _State, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wants = [ctx.needs_input_grad[1 + i] for i in range(len(leaves))]
        flagged = {id(leaf) for leaf, want in zip(leaves, wants) if want}
        outputs, residual = state.fn.invoke(state.treedef, list(leaves), state.make_leaf,
                                            lambda x: id(x) in flagged, need_vjp=True)
        out_leaves, state.out_def = pytree.flatten(outputs, _is_tensor)
        state.residual = residual
        ctx.state = state
        ctx.devices = [(leaf.device, leaf.dtype) for leaf in leaves]
        ctx.save_for_backward(*leaves)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*[o for o in out_leaves if not is_differentiable(o)])
        return tuple(out_leaves)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018  (raises if an input was modified in place)
        in_grads = _RemoteBackward.apply(ctx.state, ctx.devices, *grads)
        return (None, *in_grads)


class _RemoteBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, state: _State, devices: list, *grads: torch.Tensor | None) -> tuple:
        ctx.endpoint = state.fn.name
        if all(g is None for g in grads):
            return tuple(None for _ in devices)
        cotangents = pytree.unflatten(state.out_def, list(grads))
        result = state.fn.client.call_vjp(state.residual, cotangents, _torch_leaf,
                                          timeout=state.fn.timeout)
        tree = (result.args, result.kwargs, result.parameters)
        in_grads = pytree.flatten_up_to(state.treedef, tree)
        return tuple(None if g is None else g.to(device=dev, dtype=dt)
                     for g, (dev, dt) in zip(in_grads, devices))

    @staticmethod
    def backward(ctx: Any, *_: Any) -> None:
        raise RuntimeError(
            f"gradserve: differentiating the gradient of remote endpoint {ctx.endpoint!r} "
            "(double backward, grad of grad) is not supported")


class RemoteFunction:
    """A remote endpoint called on torch tensors, differentiable with torch autograd.

    Inputs and outputs are pytrees (tuples, lists, dicts of tensors and static
    values); keyword arguments may be tensors and are differentiable too.
    """

    def __init__(self, client: Client, name: str, *, timeout: float | None = None):
        self.client = client
        self.name = name
        self.timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(args, kwargs)

    def call(self, args: tuple, kwargs: dict, parameters: dict | None = None) -> Any:
        """Run the endpoint; ``parameters`` replace the endpoint's own by name."""
        leaves, treedef = pytree.flatten((tuple(args), dict(kwargs), parameters), _is_tensor)
        make_leaf = _leaf_maker(leaves)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves)):
            outputs, _ = self.invoke(treedef, leaves, make_leaf, None, need_vjp=False)
            return outputs
        state = _State(self, treedef, make_leaf)
        out_leaves = _RemoteForward.apply(state, *leaves)
        return pytree.unflatten(state.out_def, out_leaves)

    def invoke(self, treedef: pytree.TreeDef, leaves: list, make_leaf: Any, requires_grad: Any,
               *, need_vjp: bool) -> tuple[Any, Residual | None]:
        """Send one Forward for flattened inputs."""
        args, kwargs, parameters = pytree.unflatten(treedef, leaves)
        call = Call(self.name, args, kwargs, parameters, requires_grad)
        return self.client.call_forward(call, make_leaf, need_vjp=need_vjp, timeout=self.timeout)


class RemoteModule(torch.nn.Module):
    """An endpoint's parameters as local ``nn.Parameter``s, trained through the remote model.

    Each call sends the current parameter values and receives their gradients,
    so any torch optimizer over ``module.parameters()`` fine-tunes the model.
    """

    def __init__(self, client: Client, name: str, *, timeout: float | None = None):
        super().__init__()
        self._remote = RemoteFunction(client, name, timeout=timeout)
        values = client.parameters(name, _torch_leaf, timeout=timeout)
        if not values:
            raise ValueError(f"endpoint {name!r} has no parameters to hold locally")
        for qualified, value in values.items():
            owner: torch.nn.Module = self
            *path, leaf = qualified.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(value.clone()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote.call(args, kwargs, dict(self.named_parameters()))
