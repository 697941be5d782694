"""Many clients at once: threads sharing a client, and separate processes."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch

from models import local_input_grad, mlp

HERE = Path(__file__).resolve().parent


def run_threads(worker, count: int) -> None:
    """Run ``worker(i)`` in ``count`` threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            worker(i)
        except BaseException as err:  # surfaced in the calling thread below
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]


def test_eight_threads_get_their_own_gradients(serve) -> None:
    model = mlp()
    server, client = serve({"mlp": model}, workers=8)
    f = client.torch("mlp")
    checked = [0] * 8

    def worker(i: int) -> None:
        g = torch.Generator().manual_seed(100 + i)
        for _ in range(10):
            x = torch.randn(4 + i, 6, generator=g, requires_grad=True)
            ct = torch.randn(4 + i, 4, generator=g)
            f(x).backward(ct)
            torch.testing.assert_close(x.grad, local_input_grad(model, x, ct), rtol=1e-6, atol=1e-6)
            checked[i] += 1

    run_threads(worker, 8)
    assert checked == [10] * 8
    gc.collect()
    assert client.describe("mlp").residuals.count == 0


CHILD = textwrap.dedent("""
    import sys, torch, gradserve
    sys.path.insert(0, {here!r})
    from models import local_input_grad, mlp
    model = mlp()
    seed = int(sys.argv[1])
    with gradserve.connect({address!r}, timeout=60) as client:
        f = client.torch("mlp")
        g = torch.Generator().manual_seed(seed)
        for _ in range(10):
            x = torch.randn(5, 6, generator=g, requires_grad=True)
            ct = torch.randn(5, 4, generator=g)
            f(x).backward(ct)
            xl = x.detach().clone().requires_grad_()
            model(xl).backward(ct)
            torch.testing.assert_close(x.grad, xl.grad, rtol=1e-6, atol=1e-6)
    print("ok", seed)
""")


def test_two_client_processes(serve) -> None:
    server, _ = serve({"mlp": mlp()})
    code = CHILD.format(here=str(HERE), address=server.address)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seed)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err), seed in zip(procs, results, (1, 2)):
        assert proc.returncode == 0, err
        assert out.strip() == f"ok {seed}"


def test_concurrent_client_held_parameters_do_not_mix(serve) -> None:
    """Threads sending different parameters to one module each get their own result."""
    served = mlp()
    _, client = serve({"mlp": served}, workers=8)

    def worker(i: int) -> None:
        local = mlp(seed=10 + i)
        params = {n: p.detach() for n, p in local.named_parameters()}
        g = torch.Generator().manual_seed(i)
        for _ in range(10):
            x = torch.randn(3, 6, generator=g)
            out = client.torch("mlp").call((x,), {}, params)
            torch.testing.assert_close(out, local(x).detach(), rtol=1e-6, atol=1e-6)

    run_threads(worker, 6)
    x = torch.randn(2, 6)
    torch.testing.assert_close(client.torch("mlp")(x), served(x), rtol=0, atol=0)
