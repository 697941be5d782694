"""Consistency checks for deploy/: the Dockerfiles, the Kubernetes manifest and the CLI agree.

No Docker or Kubernetes is needed: these read the files as text (PyYAML is
not a dependency) and check the invariants that break deployments silently:
the entrypoint, one port everywhere, a default model that exists, CLI flags
that the CLI accepts, and the CPU torch pin matching the Makefile's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
MANIFEST = DEPLOY / "kubernetes" / "gradserve.yaml"
PORT = 50051
HEALTH_PORT = 50052
METRICS_PORT = 9090


def instruction(dockerfile: str, name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def exec_form(dockerfile: str, name: str) -> list[str]:
    (value,) = instruction(dockerfile, name)  # exactly one, in JSON (exec) form
    return json.loads(value)


def manifest_env() -> dict[str, str]:
    text = MANIFEST.read_text()
    return dict(re.findall(r"-\s+name:\s*(\w+)\s*\n\s+value:\s*\"?([^\"\n]*)\"?", text))


def manifest_args() -> list[str]:
    """The container's args, with Kubernetes' $(VAR) expansion from its env applied."""
    block = re.search(r"^(\s+)args:\s*\n((?:\1\s+(?:-.*|#.*)\n)+)", MANIFEST.read_text(), re.M)
    assert block, "no args: list in the manifest"
    env = manifest_env()
    args = [line.strip()[1:].strip() for line in block.group(2).splitlines()
            if line.strip().startswith("-")]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def module_file(module: str) -> Path:
    """Where a ``gradserve...`` module lives in the repo, per pyproject's package-dir."""
    package_dir = dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w/]+)"',
                                  re.search(r"package-dir\s*=\s*\{(.*)\}",
                                            (ROOT / "pyproject.toml").read_text()).group(1)))
    package = max((p for p in package_dir if module == p or module.startswith(p + ".")), key=len)
    rest = module[len(package):].lstrip(".").split(".")
    return ROOT / package_dir[package] / Path(*rest).with_suffix(".py")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_gradserve_serve_on_the_port(dockerfile):
    assert exec_form(dockerfile, "ENTRYPOINT") == ["gradserve", "serve"]
    cmd = exec_form(dockerfile, "CMD")
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert int(cmd[cmd.index("--port") + 1]) == PORT
    assert int(cmd[cmd.index("--health-port") + 1]) == HEALTH_PORT
    assert int(cmd[cmd.index("--metrics-port") + 1]) == METRICS_PORT
    assert [int(p) for p in " ".join(instruction(dockerfile, "EXPOSE")).split()] == \
        [PORT, HEALTH_PORT, METRICS_PORT]
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", (DEPLOY / dockerfile).read_text(), re.M)
    if dockerfile == "Dockerfile.gpu":
        assert cmd[cmd.index("--device") + 1].startswith("cuda")


def test_manifest_uses_the_same_port_everywhere():
    text = MANIFEST.read_text()
    assert [int(p) for p in re.findall(r"containerPort:\s*(\d+)", text)] == [
        PORT, HEALTH_PORT, METRICS_PORT]
    probes = re.findall(r"(readiness|liveness|startup)Probe:.*\n(?:\s*#.*\n)*\s+grpc:\s*\n"
                        r"\s+port:\s*(\d+)", text)
    assert {kind for kind, _ in probes} >= {"readiness", "liveness"}
    assert {int(port) for _, port in probes} == {HEALTH_PORT}   # probes have their own port
    service = text[text.index("kind: Service"):]
    assert int(re.search(r"\bport:\s*(\d+)", service).group(1)) == PORT
    assert re.search(r"targetPort:\s*grpc\b", service) and "appProtocol: grpc" in service
    assert "port: 50051" in text and f"--port={PORT}" in manifest_args()
    assert f"--health-port={HEALTH_PORT}" in manifest_args()
    assert f"--metrics-port={METRICS_PORT}" in manifest_args()
    assert f'prometheus.io/port: "{METRICS_PORT}"' in text


def test_manifest_turns_tls_tokens_and_metrics_on_from_mounted_secrets():
    cli = pytest.importorskip("gradserve.server.cli")
    args = cli.parser().parse_args(["serve", *manifest_args()])
    text = MANIFEST.read_text()
    mounts = dict(re.findall(r"- name: (\w+)\n\s+mountPath: (\S+)", text))
    secrets = dict(re.findall(r"- name: (\w+)\n\s+secret:\n\s+secretName: (\S+)", text))
    assert secrets == {"tls": "gradserve-tls", "tokens": "gradserve-tokens"}
    assert args.tls_cert == f"{mounts['tls']}/tls.crt" and args.tls_key == f"{mounts['tls']}/tls.key"
    assert args.auth_token_file == f"{mounts['tokens']}/tokens"
    assert args.metrics_port == METRICS_PORT and args.log_format == "json"


def test_default_target_exists_and_is_served_everywhere():
    targets = {exec_form(d, "CMD")[0] for d in DOCKERFILES} | {manifest_args()[0]}
    assert targets == {"gradserve.server.models.digits:endpoints"}
    module, _, attr = targets.pop().partition(":")
    path = module_file(module)
    assert path == ROOT / "server/gradserve/server/models/digits.py"
    assert path.is_file()
    assert re.search(rf"^def {attr}\(", path.read_text(), re.M)


@pytest.mark.parametrize("source", ["Dockerfile", "Dockerfile.gpu", "manifest"])
def test_cli_accepts_the_deployed_arguments(source):
    cli = pytest.importorskip("gradserve.server.cli")
    argv = manifest_args() if source == "manifest" else exec_form(source, "CMD")
    args = cli.parser().parse_args(["serve", *argv])  # SystemExit(2) on an unknown flag
    assert args.port == PORT and args.host == "0.0.0.0"
    assert args.metrics_port == METRICS_PORT   # metrics on in the container
    if source == "manifest":
        assert args.max_residual_bytes > 0 and args.residual_ttl > 0 and args.workers > 0


def test_cpu_torch_pin_matches_makefile():
    makefile_pin = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    (docker_pin,) = [a for a in instruction("Dockerfile", "ARG") if a.startswith("TORCH_SPEC=")]
    assert docker_pin.split("=", 1)[1].strip('"') == makefile_pin.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_ignores_local_state(dockerfile):
    ignored = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    assert {".git", ".venv", "**/__pycache__"} <= set(ignored)
    assert not {"client", "server", "pyproject.toml"} & set(ignored)  # what the image COPYs


def test_manifest_gives_shared_memory_sessions_room():
    text = MANIFEST.read_text()
    mount = re.search(r"volumeMounts:\s*\n\s*- name:\s*(\S+)\s*\n\s*mountPath:\s*/dev/shm", text)
    assert mount, "the server container must mount a volume at /dev/shm"
    volume = re.search(rf"- name:\s*{mount.group(1)}\s*\n\s*emptyDir:\s*\n\s*medium:\s*Memory", text)
    assert volume, "/dev/shm must be a memory-backed emptyDir"


def test_dockerfiles_install_extras_the_package_defines():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    for dockerfile in DOCKERFILES:
        text = (DEPLOY / dockerfile).read_text()
        for group in re.findall(r"gradserve-\*\.whl\)\[([^\]]+)\]", text):
            assert set(group.split(",")) <= extras, (dockerfile, group)
    assert "cuda" in re.search(r"gradserve-\*\.whl\)\[([^\]]+)\]",
                               (DEPLOY / "Dockerfile.gpu").read_text()).group(1)


def test_the_manifests_gradserve_variables_set_real_flags(monkeypatch):
    cli = pytest.importorskip("gradserve.server.cli")
    env = dict(re.findall(r"- name: (GRADSERVE_\w+)\n\s+value: \"([^\"]*)\"", MANIFEST.read_text()))
    assert set(env) >= {"GRADSERVE_WORKERS", "GRADSERVE_MAX_RESIDUAL_BYTES", "GRADSERVE_GRACE"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = vars(cli.parser().parse_args(["serve", *manifest_args()]))
    for name, value in env.items():
        dest = name.removeprefix("GRADSERVE_").lower()
        assert dest in args, f"{name} names no flag"
        assert str(args[dest]) == value or args[dest] == cli._byte_size(value)
