"""What the autograd front-ends share: the remote endpoint handle, the flattened call,
the rule for merging a vmap into one call, and the refusal of higher derivatives.

Each framework's front-end (``gradserve.client.torch``, ``gradserve.client.jax``)
keeps only what its autograd system needs on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from gradserve import frameworks
from gradserve.client.calls import Call, Residual
from gradserve.client.core import Client
from gradserve.wire import pytree
from gradserve.wire.codec import Arguments, MakeLeaf
from gradserve.wire.specs import EndpointInfo


@dataclass(frozen=True)
class CallDef:
    """The structure of a call ``(args, kwargs, parameters)`` with its array leaves out;
    the last ``n_params`` leaves are the parameters'."""

    treedef: pytree.TreeDef
    n_params: int

    def unflatten(self, leaves: Sequence[Any]) -> Arguments:
        """The call's parts with ``leaves`` put back."""
        args, kwargs, parameters = pytree.unflatten(self.treedef, list(leaves))
        return Arguments(args, kwargs, parameters)

    def grads(self, grads: Arguments) -> list[Any]:
        """Gradients (mirroring the call) in leaf order, None where there are none."""
        return pytree.flatten_up_to(self.treedef, grads.tree)


def flatten_call(inputs: Arguments, is_leaf: Callable[[Any], bool]) -> tuple[list[Any], CallDef]:
    """The array leaves of a call and its structure."""
    leaves, treedef = pytree.flatten(inputs.tree, is_leaf)
    return leaves, CallDef(treedef, treedef.children[2].num_leaves)


def mergeable(batchable: bool, input_ranks: Sequence[int], params_batched: bool,
              params_flagged: bool) -> bool:
    """Whether a vmap over one call can go as one call with the batch merged into axis 0:
    the endpoint maps over axis 0, every input (batch axis aside) has one, and the
    parameters are neither batched nor differentiated."""
    return (batchable and all(rank >= 1 for rank in input_ranks)
            and not params_batched and not params_flagged)


def higher_order_refusal(name: str, why: str) -> str:
    """The error for differentiating a gradient through endpoint ``name``, and ``why``."""
    return (f"gradserve: the gradient of remote endpoint {name!r} cannot be differentiated "
            f"(double backward, grad of grad, hessian): {why}")


class RemoteEndpoint:
    """One endpoint of a client, as the front-ends call it (``framework``: whose dtypes,
    devices and named tuples the replies' static leaves become)."""

    framework = "numpy"

    def __init__(self, client: Client, name: str, *, timeout: float | None = None):
        self.client = client
        self.name = name
        self.timeout = timeout
        self._info: EndpointInfo | None = None

    @property
    def info(self) -> EndpointInfo:
        """The endpoint's ``Describe``, asked once."""
        if self._info is None:
            self._info = self.client.describe(self.name, timeout=self.timeout)
        return self._info

    @property
    def batchable(self) -> bool:
        """Whether the endpoint maps over axis 0 (then a vmap sends one merged call)."""
        return self.info.batchable

    def make_call(self, call_def: CallDef, leaves: Sequence[Any],
             flagged: Sequence[bool] | None = None) -> Call:
        """The call of ``leaves`` differentiating those ``flagged`` (None: none)."""
        if flagged is None:
            return Call(self.name, call_def.unflatten(leaves))
        ids = {id(x) for x, flag in zip(leaves, flagged) if flag}
        return Call(self.name, call_def.unflatten(leaves), lambda x: id(x) in ids)

    def forward(self, call: Call, make_leaf: MakeLeaf, *,
                need_vjp: bool) -> tuple[Any, Residual | None]:
        """Send a Forward for ``call``."""
        return self.client.call_forward(call, make_leaf, need_vjp=need_vjp, timeout=self.timeout,
                                        statics=frameworks.adapter(self.framework))

    def jvp(self, call: Call, tangents: Arguments, make_leaf: MakeLeaf, *,
            batched: bool = False) -> tuple[Any, Any]:
        """Send a Jvp for ``call``: its outputs and their tangents."""
        return self.client.call_jvp(call, tangents, make_leaf, batched=batched,
                                    timeout=self.timeout,
                                    statics=frameworks.adapter(self.framework))

    def vjp_kept(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
                 requires_grad: Callable[[Any], bool] | None = None,
                 batched: bool = False) -> tuple[Arguments, Residual]:
        """Send a Vjp that keeps its graph: the gradients and their residual."""
        return self.client.call_vjp_kept(residual, cotangents, make_leaf,
                                         requires_grad=requires_grad, batched=batched,
                                         timeout=self.timeout,
                                         statics=frameworks.adapter(self.framework))

    def vjp(self, residual: Residual, cotangents: Any, make_leaf: MakeLeaf, *,
            batched: bool = False) -> Arguments:
        """Send a Vjp for a residual (recomputing if the server lost it)."""
        return self.client.call_vjp(residual, cotangents, make_leaf, batched=batched,
                                    timeout=self.timeout,
                                    statics=frameworks.adapter(self.framework))
