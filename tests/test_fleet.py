"""A client over several replicas, draining servers, and several devices in one server."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve.client.calls import Residual
from gradserve.client.fleet import parse_target, resolve
from gradserve.errors import DRAINING
from gradserve.server import Server, TorchEndpoint
from helpers import TARGETS, free_port, needs_shm, scrape, serve_process, series, wait_serving, \
    wait_until
from models import mlp



def local_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Output and parameter gradients of ``(model(x) ** 2).sum()``, by local autograd."""
    model.zero_grad()
    out = model(x)
    (out ** 2).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def forwards(client: gradserve.Client) -> dict[str, int]:
    return {r.address: r.forwards for r in client.replicas()}


# -- targets -------------------------------------------------------------------
def test_targets_name_replicas() -> None:
    assert parse_target("127.0.0.1:1") == (["127.0.0.1:1"], [])
    assert parse_target(["a:1", "b:2"]) == (["a:1", "b:2"], [])
    assert parse_target("ipv4:10.0.0.1:50051,10.0.0.2:50051") == (
        ["10.0.0.1:50051", "10.0.0.2:50051"], [])
    assert parse_target("ipv6:[::1]:5,[::2]:6") == (["[::1]:5", "[::2]:6"], [])
    assert parse_target("dns:///svc.ns.svc:50051") == ([], ["svc.ns.svc:50051"])
    assert parse_target("dns://8.8.8.8/svc:7") == ([], ["svc:7"])
    assert resolve("127.0.0.1:7") == ["127.0.0.1:7"]
    assert resolve("127.0.0.1") == ["127.0.0.1:50051"]
    for bad, message in ((["a:1", ""], "non-empty string"), ([], "at least one"),
                         ("dns:///", "names no address"), ("ipv4:,", "names no address"),
                         ("ipv6:", "names no address"), ("dns:///h:port", "must be a number")):
        with pytest.raises(gradserve.GradserveError, match=message):
            gradserve.Client(bad)
    with pytest.raises(ValueError, match="one address"):
        gradserve.Client(["a:1", "b:2"], channel=object())   # type: ignore[arg-type]


def test_a_dns_name_is_every_address_it_resolves_to() -> None:
    with Server("127.0.0.1", 0) as server:
        server.add_torch("double", lambda x: x * 2)
        with gradserve.connect(f"dns:///127.0.0.1:{server.port}", transport="grpc") as client:
            assert [r.address for r in client.replicas()] == [server.address]
            out = client.forward("double", (np.ones(3, np.float32),)).outputs
            np.testing.assert_array_equal(out, np.full(3, 2.0, np.float32))
            wait_until(lambda: client.replicas()[0].health == "SERVING")
    with pytest.raises(gradserve.GradserveError, match="cannot resolve"):
        gradserve.Client("dns:///no-such-host.invalid:1")


# -- routing over in-process replicas -------------------------------------------
@pytest.fixture
def replicas() -> Iterator[list[Server]]:
    servers = [Server("127.0.0.1", 0, workers=2) for _ in range(3)]
    for server in servers:
        server.add_torch("mlp", mlp())
        server.start()
    yield servers
    for server in servers:
        server.stop(grace=0)


def test_forwards_spread_and_each_vjp_goes_to_its_residual(replicas) -> None:
    model = mlp()
    with gradserve.connect([s.address for s in replicas], transport="grpc") as client:
        wait_until(lambda: all(r.health == "SERVING" for r in client.replicas()))
        f = client.torch("mlp")
        for i in range(30):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i),
                            requires_grad=True)
            out = f(x)
            (out ** 2).sum().backward()
            want = model(x.detach().requires_grad_())
            (want ** 2).sum().backward()
            torch.testing.assert_close(out.detach(), want.detach())
        seen = client.replicas()
        assert sum(r.forwards for r in seen) == 30 and min(r.forwards for r in seen) >= 6
        assert [r.vjps for r in seen] == [r.forwards for r in seen]   # where its residual is
        assert client.recomputes == 0
        assert {r.failures for r in seen} == {0} and {r.in_flight for r in seen} == {0}


def test_a_draining_replica_gets_no_forwards_but_answers_its_vjps(replicas) -> None:
    first, second, third = replicas
    with gradserve.connect([s.address for s in replicas], transport="grpc") as client:
        x = np.arange(12, dtype=np.float32).reshape(2, 6)
        kept = []
        while len(kept) < 30 and any(not s.residuals.stats().count for s in replicas):
            kept.append(client.forward("mlp", (x,), need_vjp=True))   # residuals everywhere
        assert all(s.residuals.stats().count for s in replicas)
        drained = threading.Thread(target=first.drain, args=(30.0,))
        drained.start()
        wait_until(lambda: client.replicas()[0].health == "NOT_SERVING")
        before = forwards(client)
        for _ in range(6):
            client.forward("mlp", (x,))
        after = forwards(client)
        assert after[first.address] == before[first.address]
        assert client.replicas()[0].failures == 0    # its health said so: nothing was refused
        ct = np.ones((2, 4), np.float32)
        grads = [client.vjp(r.residual, ct) for r in kept]
        for g in grads[1:]:
            np.testing.assert_allclose(g.args[0], grads[0].args[0], rtol=1e-6)
        assert client.recomputes == 0                  # the draining one answered its own
        assert drained.is_alive()                      # it still holds that residual
        del kept, grads
        client.forward("mlp", (x,))                    # carries the release there
        drained.join(timeout=10)
        assert not drained.is_alive() and first.residuals.stats().count == 0


def test_a_forward_refused_as_draining_goes_to_another_replica(replicas) -> None:
    first, second, _ = replicas
    with gradserve.connect([first.address, second.address], transport="grpc") as client:
        wait_until(lambda: all(r.health == "SERVING" for r in client.replicas()))
        first.service.drain()        # refuses Forwards before its health says so
        x = np.ones((1, 6), np.float32)
        for _ in range(4):
            client.forward("mlp", (x,))
        seen = {r.address: r for r in client.replicas()}
        assert seen[first.address].failures == 1     # refused once, then passed over
        assert seen[first.address].health == "NOT_SERVING"
        assert seen[second.address].forwards == 4
        with gradserve.connect(first.address, transport="grpc") as alone:
            with pytest.raises(gradserve.Unavailable) as caught:
                alone.forward("mlp", (x,))
        assert caught.value.reason == DRAINING
        assert "shutting down" in caught.value.message


def test_a_vjp_whose_replica_is_gone_is_recomputed_elsewhere(replicas) -> None:
    first, second, _ = replicas
    model = mlp()
    with gradserve.connect([first.address, second.address], transport="grpc") as client:
        f = client.torch("mlp")
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out = f(x)
        holder = next(r.address for r in client.replicas() if r.forwards)
        next(s for s in replicas if s.address == holder).stop(grace=0)
        (out ** 2).sum().backward()
        xl = x.detach().requires_grad_()
        (model(xl) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, xl.grad)
        assert client.recomputes == 1
        gone = next(r for r in client.replicas() if r.address == holder)
        assert gone.health == "UNREACHABLE"


def test_drain_refuses_new_work_and_ends_when_nothing_is_held(serve) -> None:
    server, client = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    x = np.ones((2, 6), np.float32)
    ct = np.ones((2, 4), np.float32)
    kept = client.forward("mlp", (x,), need_vjp=True)
    done: list[bool] = []
    drained = threading.Thread(target=lambda: done.append(server.drain(30.0)))
    drained.start()
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status
               == health_pb2.HealthCheckResponse.NOT_SERVING)
    channel.close()
    with pytest.raises(gradserve.Unavailable, match="takes no new Forward calls"):
        client.forward("mlp", (x,))
    orphan = Residual(kept.residual.call)          # no id: its Vjp would recompute
    with pytest.raises(gradserve.Unavailable, match="recomputing backward calls"):
        client.vjp(orphan, ct, timeout=0.3)
    grads = client.vjp(kept.residual, ct)          # held here: answered
    assert grads.args[0].shape == (2, 6)
    assert drained.is_alive()
    client.release(kept.residual)
    drained.join(timeout=10)
    assert done == [True]


# -- several devices in one server -----------------------------------------------
def in_threads(threads: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for i < ``threads`` at once, each in its own thread; re-raise the
    first failure."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as err:   # reported below
            errors.append(err)

    started = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    if errors:
        raise errors[0]


def steps_match(f: Any, models: list[torch.nn.Module], seed: int, steps: int) -> None:
    """``steps`` Forward+Vjp through remote ``f``: each step's output is one of ``models``'
    (the instance that ran it) and its input gradient that model's, by local autograd."""
    for i in range(steps):
        g = torch.Generator().manual_seed(seed * 100 + i)
        x = torch.randn(4, 6, generator=g, requires_grad=True)
        out = f(x)
        ran = [m for m in models if torch.allclose(out, m(x).detach())]
        assert len(ran) == 1
        (out ** 2).sum().backward()
        xl = x.detach().requires_grad_()
        (ran[0](xl) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, xl.grad)


def test_two_instances_share_the_calls_of_eight_threads_and_pin_each_vjp(serve) -> None:
    server = Server("127.0.0.1", 0, workers=4, metrics_port=0)
    server.add_torch("mlp", mlp(), devices=["cpu", "cpu"])
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            f, model = client.torch("mlp"), mlp()
            in_threads(8, lambda seed: steps_match(f, [model], seed, 8))
            info = client.describe("mlp")
            assert info.devices == ("cpu", "cpu")
            assert [i.device for i in info.instances] == ["cpu", "cpu"]
            calls = [i.forward_calls for i in info.instances]
            assert sum(calls) == 64 and min(calls) > 0
            assert [i.vjp_calls for i in info.instances] == calls   # each Vjp where it began
            assert [i.in_flight for i in info.instances] == [0, 0]
            found = scrape(server.metrics_port)
            for i, n in enumerate(calls):
                where = {"endpoint": "mlp", "instance": str(i), "device": "cpu"}
                assert found[series("gradserve_instance_calls_total", kind="forward",
                                    **where)] == n
                assert found[series("gradserve_instance_calls_total", kind="vjp", **where)] == n
                assert found[series("gradserve_instance_in_flight", **where)] == 0
    finally:
        server.stop(grace=0)


def test_devices_build_one_instance_per_device_and_refuse_what_cannot_be() -> None:
    server = Server("127.0.0.1", 0)
    try:
        first = server.add_torch("m", mlp(), devices=["cpu", "cpu"])
        assert [e.instance for e in server.registry.instances("m").endpoints] == [0, 1]
        assert first.name == "m"
        with pytest.raises(TypeError, match="an Endpoint has its device"):
            server.add("e", first, devices=["cpu"])
        with pytest.raises(ValueError, match="names no device"):
            server.add_torch("n", mlp(), devices=[])
        with pytest.raises(TypeError, match="not both"):
            server.add_torch("n", mlp(), devices=["cpu"], device="cpu")
        with pytest.raises(TypeError, match="a list of devices, e.g. \\['cpu'\\]"):
            server.add_torch("n", mlp(), devices="cpu")
        other = TorchEndpoint(mlp())
        with pytest.raises(ValueError, match="already registered as 'm'"):
            server.add("n", [other, first])      # refused whole: nothing of it changes
        assert first.instance == 0 and other.instance == 0 and not server.registry.has("n")
    finally:
        server.stop(grace=0)


def test_jax_instances_on_two_devices(serve) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    server = Server("127.0.0.1", 0)
    server.add_jax("sin", jnp.sin, devices=["cpu", "cpu"])
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            f = client.jax("sin")
            x = jnp.linspace(0.0, 1.0, 5)
            for _ in range(4):
                g = jax.grad(lambda v: f(v).sum())(x)
                np.testing.assert_allclose(np.asarray(g), np.cos(np.asarray(x)), rtol=1e-6)
            assert [i.forward_calls for i in client.describe("sin").instances] == [2, 2]
    finally:
        server.stop(grace=0)


# -- the fleet, as processes -----------------------------------------------------
def start_replica(port: int, grace: float, *flags: str) -> subprocess.Popen[str]:
    return serve_process("fleet", port, "--workers", "2", "--grace", str(grace), *flags)


def health(address: str) -> tuple[int, str]:
    """``gradserve health ADDRESS``: its exit status and what it printed."""
    done = subprocess.run([sys.executable, "-m", "gradserve.server.cli", "health", address,
                           "--timeout", "2"], capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


def test_fine_tuning_survives_a_killed_and_a_draining_replica() -> None:
    ports = [free_port() for _ in range(3)]
    health_port = free_port()
    procs = [start_replica(ports[0], 5.0, "--devices", "cpu,cpu", "--health-port",
                           str(health_port)),
             *(start_replica(port, 5.0) for port in ports[1:])]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        for address in addresses:
            wait_serving(address).close()
        assert health(f"127.0.0.1:{health_port}") == (0, "SERVING")
        with gradserve.connect(addresses[0], transport="grpc") as one:
            assert one.describe("mlp").devices == ("cpu", "cpu")   # two instances in it
        with gradserve.connect(addresses, transport="grpc", timeout=60) as client:
            wait_until(lambda: all(r.health == "SERVING" for r in client.replicas()))
            remote = client.torch_module("mlp")
            local = mlp()
            assert remote.state_dict().keys() == local.state_dict().keys()
            opt_remote = torch.optim.SGD(remote.parameters(), lr=0.05)
            opt_local = torch.optim.SGD(local.parameters(), lr=0.05)
            g = torch.Generator().manual_seed(0)
            phases: list[dict[str, int]] = [forwards(client)]
            killed = drained = ""
            for step in range(75):
                x = torch.randn(8, 6, generator=g)
                before = forwards(client)
                opt_remote.zero_grad()
                out = remote(x)
                holder = next(a for a, n in forwards(client).items() if n > before[a])
                if step == 30:      # the replica holding this step's residual dies
                    killed = holder
                    procs[addresses.index(holder)].kill()
                    phases.append(forwards(client))
                if step == 50:      # the one holding this one is told to stop
                    drained = holder
                    procs[addresses.index(holder)].send_signal(signal.SIGTERM)
                    phases.append(forwards(client))
                (out ** 2).sum().backward()
                want, grads = local_step(local, x)
                torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
                for p, gl in zip(remote.parameters(), grads):
                    torch.testing.assert_close(p.grad, gl, rtol=1e-5, atol=1e-6)
                opt_remote.step()
                opt_local.step()
            phases.append(forwards(client))
            # Forwards spread over the healthy replicas of each phase
            for (start, end), healthy in zip(zip(phases, phases[1:]), (
                    addresses, [a for a in addresses if a != killed], [])):
                total = sum(end[a] - start[a] for a in addresses)
                for address in healthy:
                    assert end[address] - start[address] >= 0.2 * total, (phases, address)
            last = {a: phases[-1][a] - phases[-2][a] for a in addresses}
            assert last[killed] == 0 and last[drained] == 0
            assert 1 <= client.recomputes <= 2   # the killed replica's residual, at least
            seen = {r.address: r.health for r in client.replicas()}
            assert seen[killed] == "UNREACHABLE"
            assert seen[drained] in ("NOT_SERVING", "UNREACHABLE")
        assert procs[addresses.index(drained)].wait(timeout=30) == 0   # drained, then exited
        code, said = health(killed)
        assert code == 1 and "UNAVAILABLE" in said
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


def watching() -> int:
    return sum(t.name in ("gradserve-watch", "gradserve-resolve") and t.is_alive()
               for t in threading.enumerate())


def test_close_or_dropping_the_client_ends_its_watches(replicas) -> None:
    before = watching()
    targets = [[s.address for s in replicas], f"dns:///{replicas[0].address}"]
    for target in targets:
        client = gradserve.connect(target, transport="grpc")
        client.forward("mlp", (np.ones((1, 6), np.float32),))
        assert watching() > before
        client.close()
        assert watching() == before
    client = gradserve.connect(targets[0], transport="grpc")
    assert watching() == before + 3
    del client                      # no close(): its threads must end by themselves
    wait_until(lambda: watching() == before)


def test_closing_a_client_releases_its_live_residuals_so_a_drain_ends_at_once(serve) -> None:
    server, _ = serve({"mlp": mlp()}, client_options={"transport": "grpc"})
    client = gradserve.connect(server.address, transport="grpc")
    kept = client.forward("mlp", (np.ones((2, 6), np.float32),), need_vjp=True)
    assert server.residuals.stats().count == 1
    client.close()                      # the handle is alive, but no Vjp can use it now
    assert server.residuals.stats().count == 0 and kept.residual.id == ""
    assert server.drain(30.0) is True   # nothing held, nothing open: no wait for the grace


def test_instances_with_different_weights_pin_each_vjp_to_its_forward() -> None:
    models = [mlp(0), mlp(1)]          # a Vjp on the other instance would give other gradients
    server = Server("127.0.0.1", 0, workers=4)
    server.add("mlp", [TorchEndpoint(m) for m in models])
    server.start()
    try:
        with gradserve.connect(server.address, transport="grpc") as client:
            f = client.torch("mlp")
            in_threads(6, lambda seed: steps_match(f, models, seed, 6))
            assert min(i.forward_calls for i in client.describe("mlp").instances) > 0
    finally:
        server.stop(grace=0)


def test_a_transient_refusal_passes_a_replica_over_only_for_a_while(replicas) -> None:
    first, second, _ = replicas
    with gradserve.connect([first.address, second.address], transport="grpc") as client:
        wait_until(lambda: all(r.health == "SERVING" for r in client.replicas()))
        first.service.drain()                    # refuses, but its health still says SERVING
        x = np.ones((1, 6), np.float32)
        while not client.replicas()[0].failures:
            client.forward("mlp", (x,))
        assert client.replicas()[0].health == "NOT_SERVING"
        first.service.draining = False           # it was not leaving after all
        wait_until(lambda: client.replicas()[0].health == "SERVING", timeout=5)
        before = client.replicas()[0].forwards
        for _ in range(10):
            client.forward("mlp", (x,))
        assert client.replicas()[0].forwards > before


def test_re_resolving_adds_and_retires_replicas_and_a_retired_one_answers_its_vjps(
        replicas) -> None:
    a, b, c = (s.address for s in replicas)
    answer = [a, b]
    with gradserve.connect("dns:///fleet.test:1", transport="grpc", resolve_seconds=0.2,
                           resolver=lambda name: list(answer)) as client:
        assert [r.address for r in client.replicas()] == [a, b]
        x = np.ones((2, 6), np.float32)
        kept = []
        while not replicas[0].residuals.stats().count:
            kept.append(client.forward("mlp", (x,), need_vjp=True))
        answer[:] = [b, c]                       # a leaves the name, c joins it
        wait_until(lambda: [r.address for r in client.replicas()] == [b, c])
        for _ in range(6):
            client.forward("mlp", (x,))
        assert replicas[0].residuals.stats().count >= 1   # still held there, for its Vjps
        ct = np.ones((2, 4), np.float32)
        grads = [client.vjp(k.residual, ct).args[0] for k in kept]
        for g in grads[1:]:
            np.testing.assert_allclose(g, grads[0], rtol=1e-6)
        assert client.recomputes == 0            # each Vjp where its residual is, a's too
        del kept, grads
        client.forward("mlp", (x,))              # carries the releases out
        wait_until(lambda: not replicas[0].residuals.stats().count)


@needs_shm
def test_same_host_replicas_each_get_their_own_session(replicas) -> None:
    first, second, _ = replicas
    with gradserve.connect([first.address, second.address], transport="auto") as client:
        assert [r.transport for r in client.replicas()] == ["shm", "shm"]
        assert first.sessions.count() == second.sessions.count() == 1
        big = np.ones((8192, 6), np.float32)        # 192 KiB: through a request slot
        for _ in range(4):
            out = client.forward("mlp", (big,)).outputs
            assert out.shape == (8192, 4)
        assert all(r.forwards for r in client.replicas())
    assert first.sessions.count() == second.sessions.count() == 0


def test_a_failure_prompts_a_resolution_before_its_period(replicas) -> None:
    a, b, c = (s.address for s in replicas)
    answer = [a, b]
    with gradserve.connect("dns:///fleet.test:1", transport="grpc", resolve_seconds=300,
                           resolver=lambda name: list(answer)) as client:
        wait_until(lambda: all(r.health == "SERVING" for r in client.replicas()))
        answer[:] = [b, c]
        replicas[0].stop(grace=0)                   # a fails: the name is asked again now
        wait_until(lambda: [r.address for r in client.replicas()] == [b, c], timeout=10)
        client.forward("mlp", (np.ones((1, 6), np.float32),))


def test_devices_all_without_a_gpu_is_the_cpu() -> None:
    from gradserve.server.cli import all_devices, parser
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert all_devices() == ["cpu"]
    args = parser().parse_args(["serve", "m:x", "--devices", "all"])
    assert args.devices == ["all"]
    for bad in ("all,cpu", ","):
        with pytest.raises(SystemExit):
            parser().parse_args(["serve", "m:x", "--devices", bad])
