"""The residual store's bounds, and correctness when residuals are gone."""

from __future__ import annotations

import gc

import numpy as np
import torch

from gradserve.server.residuals import RESIDUAL_OVERHEAD, ResidualStore
from gradserve.wire.codec import Arguments
from helpers import needs_shm, wait_until
from models import local_input_grad, mlp


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_eviction_by_bytes() -> None:
    store = ResidualStore(max_bytes=100, ttl=60, overhead=0)
    a = store.put("e", "A", 40)
    b = store.put("e", "B", 40)
    assert store.get(a) == ("e", "A")  # a is now most recently used
    c = store.put("e", "C", 40)        # over budget: evicts b, the least recently used
    assert store.get(b) is None
    assert store.get(a) == ("e", "A") and store.get(c) == ("e", "C")
    stats = store.stats("e")
    assert (stats.count, stats.bytes, stats.evictions, stats.endpoint_count) == (2, 80, 1, 2)


def test_oversized_residual_is_not_kept() -> None:
    store = ResidualStore(max_bytes=100, ttl=60, overhead=0)
    assert store.put("e", "big", 101) == ""
    assert store.stats().count == 0


def test_ttl_expiry_counts_from_last_use() -> None:
    clock = FakeClock()
    store = ResidualStore(max_bytes=1000, ttl=10, clock=clock, overhead=0)
    a, b = store.put("e", "A", 1), store.put("e", "B", 1)
    clock.now = 6
    assert store.get(a) is not None
    clock.now = 12                      # b unused for 12 s, a for 6 s
    assert store.get(b) is None and store.get(a) is not None
    clock.now = 30
    stats = store.stats()
    assert (stats.count, stats.bytes, stats.evictions) == (0, 0, 2)


def test_release_counts_only_held_ids() -> None:
    store = ResidualStore(max_bytes=1000, ttl=60, overhead=0)
    ids = [store.put("e", i, 10) for i in range(3)]
    assert store.release([ids[0], ids[1], "unknown"]) == 2
    assert store.release([ids[0]]) == 0
    assert store.stats().count == 1 and store.stats().bytes == 10


def test_ids_are_unguessable_and_unique() -> None:
    store = ResidualStore(max_bytes=1 << 20, ttl=60, overhead=0)
    ids = {store.put("e", None, 1) for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 20 for i in ids)


def test_residual_bytes_account_for_saved_activations(serve) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Tanh())
    _, client = serve({"wide": model})
    y = client.torch("wide")(torch.randn(64, 1000, requires_grad=True))
    stats = client.describe("wide").residuals
    # the input and the tanh output autograd saved, 64k floats each, and the fixed charge
    # for the graph; the weight is the endpoint's own (it outlives every residual) and is not
    assert (stats.count, stats.bytes) == (1, 4 * 2 * 64 * 1000 + RESIDUAL_OVERHEAD)
    del y


def test_static_values_a_residual_keeps_are_charged_to_it(serve) -> None:
    _, client = serve({"tagged": lambda x, tag="": x * len(tag)})
    x = np.ones((2, 3), np.float32)
    result = client.forward("tagged", (x,), {"tag": "t" * (1 << 20)}, need_vjp=True)
    np.testing.assert_array_equal(result.outputs, x * (1 << 20))
    stats = client.describe("tagged").residuals
    # the string (and the rest of the request's structure) instead of the fixed 8 KiB
    assert stats.count == 1 and (1 << 20) < stats.bytes < (1 << 20) + 4096
    client.release(result.residual)
    small = client.forward("tagged", (x,), {"tag": "t"}, need_vjp=True)
    assert client.describe("tagged").residuals.bytes == 2 * 4 * 6 + RESIDUAL_OVERHEAD
    client.release(small.residual)


def test_eviction_then_recompute_gives_right_gradients(serve) -> None:
    model = mlp()
    _, client = serve({"mlp": model}, max_residual_bytes=3 * RESIDUAL_OVERHEAD + 3000)
    f = client.torch("mlp")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 6, generator=g, requires_grad=True) for _ in range(10)]
    outs = [f(x) for x in xs]          # the store holds only the last few
    stats = client.describe("mlp").residuals
    assert stats.evictions > 0 and stats.bytes <= 3 * RESIDUAL_OVERHEAD + 3000
    cts = [torch.randn(8, 4, generator=g) for _ in xs]
    for x, out, ct in zip(xs, outs, cts):
        out.backward(ct)
        torch.testing.assert_close(x.grad, local_input_grad(model, x.detach(), ct), rtol=1e-6, atol=1e-6)


def test_residual_larger_than_budget_recomputes(serve) -> None:
    model = mlp()
    _, client = serve({"mlp": model}, max_residual_bytes=16)
    x = torch.randn(8, 6, requires_grad=True)
    ct = torch.randn(8, 4)
    client.torch("mlp")(x).backward(ct)
    assert client.describe("mlp").residuals.count == 0
    torch.testing.assert_close(x.grad, local_input_grad(model, x.detach(), ct), rtol=1e-6, atol=1e-6)


def test_server_losing_everything_still_gives_right_gradients(serve) -> None:
    model = mlp()
    server, client = serve({"mlp": model})
    x = torch.randn(4, 6, requires_grad=True)
    ct = torch.randn(4, 4)
    out = client.torch("mlp")(x)
    server.residuals.clear()           # as after a restart or on another replica
    out.backward(ct, retain_graph=True)
    torch.testing.assert_close(x.grad, local_input_grad(model, x.detach(), ct), rtol=1e-6, atol=1e-6)
    x.grad = None
    out.backward(ct)                   # the second backward recomputes again
    torch.testing.assert_close(x.grad, local_input_grad(model, x.detach(), ct), rtol=1e-6, atol=1e-6)
    del out
    gc.collect()
    assert client.describe("mlp").residuals.count == 0


def test_ttl_expiry_on_a_live_server(serve) -> None:
    model = mlp()
    server, client = serve({"mlp": model}, residual_ttl=0.0)
    x = torch.randn(4, 6, requires_grad=True)
    ct = torch.randn(4, 4)
    out = client.torch("mlp")(x)
    assert client.describe("mlp").residuals.count == 0  # expired at once
    out.backward(ct)
    torch.testing.assert_close(x.grad, local_input_grad(model, x.detach(), ct), rtol=1e-6, atol=1e-6)


def test_a_released_torch_graph_is_freed() -> None:
    """Ops that save their own output (tanh, exp) must not pin the graph after release."""
    import weakref

    from gradserve.server.torch_endpoint import TorchEndpoint
    endpoint = TorchEndpoint(lambda x: x.tanh().exp())
    endpoint.name = "f"
    x = torch.randn(100, requires_grad=True)
    made = endpoint.forward(Arguments((x,), {}), need_vjp=True)
    ref = weakref.ref(made.outputs)
    assert made.nbytes == 3 * 400   # x, tanh(x) and exp(tanh(x))
    endpoint.vjp(made.residual, torch.ones(100))
    del made
    gc.collect()
    assert ref() is None


def test_jax_residual_bytes_count_params_once_not_twice() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradserve.server.jax_endpoint import JaxEndpoint, _Leaf
    params = {"w": jnp.ones((512, 512))}               # 1 MiB, the endpoint's own
    endpoint = JaxEndpoint(jax.jit(lambda p, x: jnp.tanh(x @ p["w"])), params=params)
    endpoint.name = "f"
    x = _Leaf(np.ones((4, 512), np.float32), True)
    nbytes = endpoint.forward(Arguments((x,), {}), need_vjp=True).nbytes
    # jit hands the vjp closure its own copy of w (1 MiB, really held per residual) plus
    # 8 KiB each for x, tanh(x @ w), its derivative and the output; the endpoint's own w
    # (another 1 MiB) is shared by every residual and not charged
    assert nbytes == (512 * 512 + 4 * 4 * 512) * 4


def test_expired_residuals_go_even_when_no_call_arrives(serve) -> None:
    server, client = serve({"mlp": mlp()}, residual_ttl=0.2)
    y = client.torch("mlp")(torch.randn(2, 6, requires_grad=True))
    assert server.residuals.held_bytes > 0
    # not stats(): any call would expire them too
    wait_until(lambda: server.residuals.held_bytes == 0, timeout=5)
    del y


def test_small_residuals_are_charged_what_they_hold_and_counted() -> None:
    store = ResidualStore(max_bytes=1 << 20, ttl=60, max_count=3)
    ids = [store.put("e", i, 100) for i in range(5)]
    stats = store.stats()
    assert (stats.count, stats.bytes) == (3, 3 * (100 + RESIDUAL_OVERHEAD))   # oldest two evicted
    assert store.get(ids[0]) is None and store.get(ids[4]) == ("e", 4)
    assert ResidualStore(max_bytes=RESIDUAL_OVERHEAD, ttl=60).put("e", 0, 1) == ""


@needs_shm
def test_residuals_viewing_a_session_go_with_it(serve) -> None:
    import numpy as np

    model = mlp()
    server, client = serve({"mlp": model})
    x = np.ones((8192, 6), np.float32)                    # 192 KiB: through a request slot
    kept = client.forward("mlp", (x,), need_vjp=True)
    small = client.forward("mlp", (x[:2],), need_vjp=True)   # inline: views no session memory
    assert client.describe("mlp").residuals.count == 2
    server.sessions.close(client.session_info().id)      # the session ends (lease, close)
    assert client.describe("mlp").residuals.count == 1
    grads = client.vjp(kept.residual, np.ones((8192, 4), np.float32))   # recomputed
    want = local_input_grad(model, torch.from_numpy(x), torch.ones(8192, 4))
    torch.testing.assert_close(torch.from_numpy(grads.args[0]), want, rtol=1e-6, atol=1e-6)
    del small
