"""The JAX client over shared memory: eager calls hand back jax arrays that alias the arena."""

from __future__ import annotations

import gc
import mmap
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import gradserve
from gradserve.client.jax import as_jax
from gradserve.transport import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs /dev/shm")

TOL = dict(rtol=1e-5, atol=1e-5)
W = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32) / 16
ROWS = 512   # 512 KiB per tensor: through the arenas


def layer(x):
    return torch.tanh(x @ torch.from_numpy(W))


def local(x):
    return jnp.tanh(x @ W)


def inputs(seed: int, rows: int = ROWS) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32))


def loss(f):
    return lambda x: jnp.sum(f(x) ** 2)


def shm_peer(client: gradserve.Client):
    """The client's shared-memory ``ClientPeer``."""
    session = client._session
    return session.shm


class ReplySlots:
    """Records each reply slot the client's transport hands out, as (address, nbytes)."""

    def __init__(self, client: gradserve.Client, monkeypatch: pytest.MonkeyPatch):
        self.handed: list[tuple[int, int]] = []
        peer = shm_peer(client)
        view = peer.view

        def recording(ref):
            out = view(ref)
            self.handed.append((np.frombuffer(out, np.uint8).ctypes.data, out.nbytes))
            return out

        monkeypatch.setattr(peer, "view", recording)

    def holds(self, x: jax.Array) -> bool:
        """Whether ``x``'s buffer is exactly one of the handed-out reply slots."""
        return (x.unsafe_buffer_pointer(), x.nbytes) in self.handed


def test_eager_outputs_and_gradients_alias_the_reply_arena(serve, monkeypatch) -> None:
    _, client = serve({"layer": layer})
    assert client.transport == "shm"
    slots = ReplySlots(client, monkeypatch)
    f = client.jax("layer")
    x = inputs(0)
    y = f(x)
    assert slots.holds(y)
    np.testing.assert_allclose(y, local(x), **TOL)
    value, grad = jax.value_and_grad(loss(f))(x)
    assert slots.holds(grad)
    want_value, want_grad = jax.value_and_grad(loss(local))(x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, **TOL)
    committed = jax.device_put(inputs(1), jax.devices()[0])
    out, pull = jax.vjp(f, committed)
    (g,) = pull(2 * out)
    assert slots.holds(out) and slots.holds(g)
    assert out.devices() == g.devices() == committed.devices()
    np.testing.assert_allclose(g, jax.grad(loss(local))(committed), **TOL)


def test_a_held_output_keeps_its_slot_until_collected(serve, monkeypatch) -> None:
    _, client = serve({"layer": layer})
    peer = shm_peer(client)
    slots = ReplySlots(client, monkeypatch)
    f = client.jax("layer")
    held = f(inputs(0))
    want = np.array(held)
    start, end = held.unsafe_buffer_pointer(), held.unsafe_buffer_pointer() + held.nbytes
    for seed in range(1, 41):
        out = f(inputs(seed))
        address, nbytes = slots.handed[-1]
        assert slots.holds(out) and (address + nbytes <= start or address >= end)
        del out
    np.testing.assert_array_equal(held, want)
    client.describe("layer")          # reports the slots collected so far
    assert not peer.freed
    del held
    gc.collect()
    assert len(peer.freed) == 1       # its slot, reported with the next request...
    client.describe("layer")
    assert not peer.freed
    assert f(inputs(0)).unsafe_buffer_pointer() == start   # ...which frees it on the server


def test_jax_inputs_in_the_request_arena_travel_without_a_copy(serve, monkeypatch) -> None:
    _, client = serve({"layer": layer})
    peer = shm_peer(client)
    placed = []
    place = peer.place

    def recording(data):
        out = place(data)
        placed.append((data.nbytes, out is not None and out[1]))
        return out

    monkeypatch.setattr(peer, "place", recording)
    x = client.as_shared(inputs(0))
    np.testing.assert_array_equal(x, inputs(0))
    f = client.jax("layer")
    value, grad = jax.value_and_grad(loss(f))(x)
    assert placed == [(x.nbytes, False),   # the input is sent from where it lies
                      (x.nbytes, True)]    # the cotangent, computed by JAX, is copied in
    want_value, want_grad = jax.value_and_grad(loss(local))(x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, **TOL)
    empty = client.empty((ROWS, 256), "float32", like="jax")
    assert isinstance(empty, jax.Array) and empty.shape == (ROWS, 256)
    placed.clear()
    f(empty)
    assert placed == [(empty.nbytes, False)]
    address = x.unsafe_buffer_pointer()
    del x, value, grad
    gc.collect()
    # the slot went with the array: the next allocation of that size takes it
    assert client.empty((ROWS, 256), "float32", like="jax").unsafe_buffer_pointer() == address


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_traced_and_mixed_calls_match_local_jax(serve, transport) -> None:
    _, client = serve({"layer": layer}, client_options={"transport": transport})
    assert client.transport == transport
    f = client.jax("layer")
    step = jax.jit(jax.value_and_grad(loss(f)))
    for seed in range(2):   # the second call reuses the compiled step
        x = inputs(seed)
        value, grad = step(x)
        want_value, want_grad = jax.value_and_grad(loss(local))(x)
        np.testing.assert_allclose(value, want_value, rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, **TOL)
    np.testing.assert_allclose(jax.grad(loss(f))(x), want_grad, **TOL)
    xs = jnp.stack([inputs(2, 8), inputs(3, 8)])
    # batched residuals with a concrete cotangent; then eager forward, batched cotangents
    np.testing.assert_allclose(jax.vmap(jax.grad(loss(f)))(xs), jax.vmap(jax.grad(loss(local)))(xs),
                               **TOL)
    np.testing.assert_allclose(jax.jacrev(f)(xs[0, :2]), jax.jacrev(local)(xs[0, :2]), **TOL)
    out, pull = jax.vjp(f, x)
    np.testing.assert_allclose(jax.jit(pull)(out)[0], jax.vjp(local, x)[1](out)[0], **TOL)


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("no backward here")


def test_an_eager_backward_failure_keeps_its_type(serve) -> None:
    _, client = serve({"bad": FailingBackward.apply})
    f = client.jax("bad")
    with pytest.raises(gradserve.Internal, match="endpoint 'bad' raised ValueError: no backward"):
        jax.grad(lambda v: jnp.sum(f(v)))(jnp.ones(3))


def test_as_jax_aliases_only_what_jax_can_import() -> None:
    mapping = mmap.mmap(-1, 1 << 16)   # page-aligned
    region = np.frombuffer(mapping, np.uint8)
    region[:] = 0x3F   # finite in every dtype below
    collected = []
    owner = np.frombuffer(mapping, np.uint8, 4096)   # as the transport makes slots' owners
    weakref.finalize(owner, collected.append, True)
    x = as_jax(owner.view(np.float32))
    assert x.unsafe_buffer_pointer() == owner.ctypes.data
    del owner
    gc.collect()
    assert not collected        # the jax array keeps the memory it aliases alive
    del x
    gc.collect()
    assert collected
    copied = {
        "unaligned": region[8:4104].view(np.float32),
        "strided": region[:8192].view(np.float32)[::2],
        "read-only": np.frombuffer(bytes(4096), np.float32),
        "bfloat16": region[:4096].view(ml_dtypes.bfloat16),
        "float64 without x64": region[:4096].view(np.float64),
    }
    for name, array in copied.items():
        x = as_jax(array)
        assert x.dtype == jax.dtypes.canonicalize_dtype(array.dtype), name
        assert x.unsafe_buffer_pointer() != array.ctypes.data, name
        np.testing.assert_array_equal(x, array.astype(x.dtype), err_msg=name)
    for array in (region[:64].view(np.bool_), region[:0].view(np.float32)):
        np.testing.assert_array_equal(as_jax(array), array)
