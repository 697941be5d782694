"""The committed protobuf stubs are exactly what `make proto` generates."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ["gradserve_pb2.py", "gradserve_pb2.pyi", "gradserve_pb2_grpc.py"]


def test_committed_stubs_match_make_proto(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    subprocess.run(["make", "-s", "proto", f"PROTO_OUT={tmp_path}", f"PY={sys.executable}"],
                   cwd=ROOT, check=True)
    for name in STUBS:
        fresh = tmp_path / "gradserve" / "v1" / name
        committed = ROOT / "client" / "gradserve" / "v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), \
            f"{committed} is stale: run `make proto` and commit the result"


def test_no_pickle_in_package() -> None:
    for path in (ROOT / "client").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, path
    for path in (ROOT / "server").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, path
