"""The client core needs only grpcio, protobuf and numpy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from models import mlp

NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None   # any import of torch now fails
    sys.modules["jax"] = None
    import numpy as np
    import gradserve
    with gradserve.connect(sys.argv[1]) as client:
        names = [e.name for e in client.endpoints()]
        res = client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
        grads = client.vjp(res.residual, np.ones((2, 4), np.float32))
        params = client.parameters("mlp")
    print(names, res.outputs.shape, grads.args[0].shape, sorted(params))
""")


def test_describe_tells_a_server_in_this_process(serve) -> None:
    _, client = serve({"mlp": mlp()})
    assert client.describe("mlp").same_process    # in another: test_cli's serve test


def test_client_works_without_torch(serve) -> None:
    server, client = serve({"mlp": mlp()})
    out = subprocess.run([sys.executable, "-c", NO_TORCH, server.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == \
        "['mlp'] (2, 4) (2, 6) ['0.bias', '0.weight', '2.bias', '2.weight']"
