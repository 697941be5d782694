"""`gradserve bench` and ``gradserve.loadgen``: many callers in worker processes."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
import torch

from gradserve import loadgen
from gradserve.server.cli import main
from gradserve.server.torch_endpoint import TorchEndpoint
from gradserve.wire.specs import TensorSpec
from models import MultiIO

#: Short levels: each spawns its worker processes afresh, which dominates.
QUICK = ["--duration", "0.5", "--warmup", "0.2"]


class Counted:
    """A function of ``x`` that counts the calls it gets with real data (not the ones
    ``Signature`` makes with fake tensors or zeros) and remembers their shapes."""

    def __init__(self, fails: bool = False):
        self.fails = fails
        self.calls = 0
        self.shapes: set[tuple[int, ...]] = set()
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() > 0):   # a fake tensor raises here: it has no data
            with self.lock:
                self.calls += 1
                self.shapes.add(tuple(x.shape))
        if self.fails:
            raise ValueError("boom")
        return torch.tanh(x) * 2


def check_numbers(level: loadgen.Level, rows: int) -> None:
    assert level.calls > 0 and level.errors == {} and level.error_messages == {}
    assert level.rows == level.calls * rows
    assert level.duration >= 0.5
    assert level.calls_per_s == pytest.approx(level.calls / level.duration)
    assert level.rows_per_s == pytest.approx(level.calls_per_s * rows)
    assert level.p50_ms is not None and level.p90_ms is not None and level.p99_ms is not None
    assert 0 < level.p50_ms <= level.p90_ms <= level.p99_ms


def test_split_spreads_callers_over_processes() -> None:
    assert loadgen.split(3, None) == [1, 1, 1]
    assert loadgen.split(5, 2) == [3, 2]
    assert loadgen.split(2, 8) == [1, 1]
    assert loadgen.split(16, 1) == [16]
    with pytest.raises(ValueError):
        loadgen.split(0, None)


def test_cotangents_mirror_the_outputs() -> None:
    outputs = {"y": np.ones((2, 3), np.float32), "i": np.zeros(2, np.int64),
               "pair": (np.ones(4, np.float64), "static")}
    ct = loadgen.cotangents_like(outputs)
    assert ct["i"] is None and ct["pair"][1] == "static"
    assert ct["y"].dtype == np.float32 and ct["y"].shape == (2, 3)
    assert np.all(ct["y"] == np.float32(0.01)) and ct["pair"][0].dtype == np.float64


def test_run_measures_forward_and_vjp(serve) -> None:
    fn = Counted()
    server, _ = serve({"f": fn})
    levels = loadgen.run(server.address, "f", concurrency=[1, 2], processes=1, duration=0.5,
                         warmup=0.2, shape=(4, 8), backward=True)
    assert [(lv.concurrency, lv.processes) for lv in levels] == [(1, 1), (2, 1)]
    for level in levels:
        check_numbers(level, rows=4)
    assert fn.shapes == {(4, 8)}
    # the server saw every counted call, and the warm-up's besides
    assert fn.calls >= sum(lv.calls for lv in levels)
    text = loadgen.render(levels)
    lines = text.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[0].split()[:3] == ["concurrency", "procs", "calls/s"]


def test_cli_json(serve, capsys) -> None:
    server, _ = serve({"f": Counted()})
    code = main(["bench", server.address, "f", "--shape", "3,5", "--concurrency", "2",
                 "--json", *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["config"]["endpoint"] == "f" and doc["config"]["shape"] == [3, 5]
    (level,) = doc["levels"]
    assert level["concurrency"] == 2 and level["processes"] == 2
    for key in ("calls", "rows", "errors", "duration", "calls_per_s", "rows_per_s", "p50_ms",
                "p90_ms", "p99_ms", "mean_batch", "mean_queue_ms"):
        assert key in level
    check_numbers(loadgen.Level(**level), rows=3)


def test_inputs_from_declared_specs(serve, capsys) -> None:
    fn = Counted()
    endpoint = TorchEndpoint(fn, inputs={"x": TensorSpec((None, 8), "float32")})
    server, _ = serve({"declared": endpoint})
    code = main(["bench", server.address, "declared", "--rows", "5", "--concurrency", "1",
                 "--backward", *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    assert fn.shapes == {(5, 8)}
    header, table = out.splitlines()[0], out.splitlines()[1:]
    assert "Forward+Vjp" in header and len(table) == 2
    assert table[1].split()[:2] == ["1", "1"] and table[1].split()[7] == "0"


def test_several_declared_inputs_go_by_name(serve) -> None:
    seen: list[tuple[tuple[int, ...], ...]] = []

    class Recorded(MultiIO):
        def forward(self, a, b, *, scale, mask=None, mode="sum"):
            seen.append((tuple(a.shape), tuple(b.shape), tuple(scale.shape)))
            return super().forward(a, b, scale=scale, mask=mask, mode=mode)

    endpoint = TorchEndpoint(Recorded(), inputs={
        "a": TensorSpec((None, 5), "float32"), "b": TensorSpec((None, None)),
        "scale": TensorSpec((1,), None)})
    server, _ = serve({"multi": endpoint})
    (level,) = loadgen.run(server.address, "multi", concurrency=[1], duration=0.5, warmup=0.2,
                           rows=3, backward=True)
    check_numbers(level, rows=3)
    assert set(seen) == {((3, 5), (3, 1), (1,))}


def said(capsys: Any) -> str:
    """What the command wrote to stderr, less the access-log lines of the server that runs
    in this test's process (a real client has none)."""
    return "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                     if " gradserve.access " not in line)


def test_wrong_shape_is_one_line_before_any_load(serve, capsys) -> None:
    fn = Counted()
    server, _ = serve({"declared": TorchEndpoint(fn, inputs={"x": TensorSpec((None, 8),
                                                                             "float32")})})
    code = main(["bench", server.address, "declared", "--shape", "16,9", *QUICK])
    err = said(capsys)
    assert code == 1 and fn.calls == 0
    assert len(err.splitlines()) == 1
    assert err.startswith("gradserve: ") and "16, 9" in err and "(*, 8)" in err


def test_unknown_endpoint_and_missing_shape(serve, capsys) -> None:
    server, _ = serve({"f": Counted()})
    assert main(["bench", server.address, "nope", *QUICK]) == 1
    err = said(capsys)
    assert len(err.splitlines()) == 1 and "'nope'" in err
    assert main(["bench", server.address, "f", *QUICK]) == 1
    err = said(capsys)
    assert len(err.splitlines()) == 1 and "--shape" in err


def test_unreachable_server(capsys) -> None:
    from helpers import free_port
    assert main(["bench", f"127.0.0.1:{free_port()}", "f", "--timeout", "5", *QUICK]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UNAVAILABLE" in err


def test_bad_arguments_are_argparse_errors(capsys) -> None:
    for bad in (["--concurrency", "0"], ["--shape", "a,b"], ["--dtype", "float7"],
                ["--transport", "pigeon"], ["--duration", "0"], ["--duration", "nan"],
                ["--warmup", "nan"], ["--duration", "inf"], ["--timeout", "nan"]):
        with pytest.raises(SystemExit) as exit:
            main(["bench", "127.0.0.1:1", "f", *bad])
        assert exit.value.code == 2
    capsys.readouterr()


def test_model_errors_are_counted_not_fatal(serve) -> None:
    fn = Counted(fails=True)
    server, _ = serve({"bad": fn})
    (level,) = loadgen.run(server.address, "bad", concurrency=[2], processes=1, duration=0.5,
                           warmup=0, shape=(2, 3))
    # with no warm-up every call made is in the window: each failed, and is counted once
    assert level.calls == 0 and level.rows == 0 and level.p50_ms is None
    assert set(level.errors) == {"INTERNAL"}, level.error_messages
    assert level.errors["INTERNAL"] == fn.calls > 0
    assert "boom" in level.error_messages["INTERNAL"]
    assert "-" in loadgen.render([level]).splitlines()[1]


def test_a_level_where_no_call_worked_exits_1(serve, capsys) -> None:
    server, _ = serve({"bad": Counted(fails=True)})
    assert main(["bench", server.address, "bad", "--shape", "2,3", "--concurrency", "1",
                 "--processes", "1", "--duration", "0.3", "--warmup", "0"]) == 1
    assert "x INTERNAL, first:" in capsys.readouterr().out


def test_client_tls_settings_that_cannot_be_used_are_one_line(tmp_path, capsys) -> None:
    for argv, message in (
            (["list", "127.0.0.1:1", "--tls-ca", str(tmp_path / "none.pem")],
             f"gradserve: TLS CA '{tmp_path / 'none.pem'}' cannot be read: No such file"),
            (["health", "127.0.0.1:1", "--tls-ca", str(tmp_path), "--tls-cert", "c.pem"],
             "gradserve: a TLS client certificate needs both cert and key"),
            (["bench", "127.0.0.1:1", "f", "--tls-ca", str(tmp_path), *QUICK],
             f"gradserve: TLS CA '{tmp_path}' cannot be read: Is a directory")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.splitlines()) == 1, err
