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
from gradserve.frameworks.jax import as_jax
from helpers import needs_shm

pytestmark = needs_shm

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


def in_reply_region(client: gradserve.Client, x: jax.Array) -> bool:
    """Whether ``x``'s buffer lies inside one of the session's reply regions (no copy)."""
    start = x.unsafe_buffer_pointer()
    return any(r.direction == "reply" and r.address <= start and start + x.nbytes <= r.address + r.size
               for r in client.session_info().regions)


def test_eager_outputs_and_gradients_alias_the_reply_arena(serve) -> None:
    _, client = serve({"layer": layer})
    assert client.transport == "shm"
    f = client.jax("layer")
    x = inputs(0)
    y = f(x)
    assert in_reply_region(client, y)
    np.testing.assert_allclose(y, local(x), **TOL)
    value, grad = jax.value_and_grad(loss(f))(x)
    assert in_reply_region(client, grad)
    want_value, want_grad = jax.value_and_grad(loss(local))(x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, **TOL)
    committed = jax.device_put(inputs(1), jax.devices()[0])
    out, pull = jax.vjp(f, committed)
    (g,) = pull(2 * out)
    assert in_reply_region(client, out) and in_reply_region(client, g)
    assert out.devices() == g.devices() == committed.devices()
    np.testing.assert_allclose(g, jax.grad(loss(local))(committed), **TOL)


def test_a_held_output_keeps_its_slot_until_collected(serve) -> None:
    _, client = serve({"layer": layer})
    f = client.jax("layer")
    held = f(inputs(0))
    want = np.array(held)
    start, end = held.unsafe_buffer_pointer(), held.unsafe_buffer_pointer() + held.nbytes
    for seed in range(1, 41):
        out = f(inputs(seed))
        address, nbytes = out.unsafe_buffer_pointer(), out.nbytes
        assert in_reply_region(client, out) and (address + nbytes <= start or address >= end)
        del out
    np.testing.assert_array_equal(held, want)
    client.describe("layer")          # reports the slots collected so far
    assert client.session_info().pending_frees == 0
    del held
    gc.collect()
    assert client.session_info().pending_frees == 1   # its slot, reported with the next request...
    client.describe("layer")
    assert client.session_info().pending_frees == 0
    assert f(inputs(0)).unsafe_buffer_pointer() == start   # ...which frees it on the server


def test_jax_inputs_in_the_request_arena_travel_without_a_copy(serve) -> None:
    _, client = serve({"layer": layer})

    def sent() -> tuple[int, int]:
        info = client.session_info()
        return info.in_place, info.copied

    x = client.as_shared(inputs(0))
    np.testing.assert_array_equal(x, inputs(0))
    f = client.jax("layer")
    value, grad = jax.value_and_grad(loss(f))(x)
    assert sent() == (1,    # the input is sent from where it lies
                      1)    # the cotangent, computed by JAX, is copied in
    want_value, want_grad = jax.value_and_grad(loss(local))(x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, **TOL)
    empty = client.empty((ROWS, 256), "float32", like="jax")
    assert isinstance(empty, jax.Array) and empty.shape == (ROWS, 256)
    f(empty)
    assert sent() == (2, 1)
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
