"""compose.yaml, statically: `docker-compose config` (Debian's docker-compose) validates both
profiles, and the wiring the README promises holds: which services each profile brings up,
one variable for tensor parallelism, MODEL switching both services, only the APIs and the
metrics (plus the Prometheus and Grafana UIs) published, on loopback, healthchecks with
`vlm health`, `depends_on` conditions. test_compose_stack.py runs the cpu profile."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.deploy.compose_local import _as_list, _depends_on, interpolate, load
from tests.deploy.tools import REPO, require_tool

COMPOSE = REPO / "compose.yaml"


def _services(profile: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    if env is None:
        return load(COMPOSE, profile)
    import yaml

    doc = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    return {n: s for n, s in doc["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def _flag(spec: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in _as_list(spec["command"]) if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, spec["command"])
    return values[0]


@pytest.mark.parametrize("env", [{}, {"MODEL": "Qwen/Qwen2-VL-2B-Instruct", "TENSOR_PARALLEL_SIZE": "2"}])
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_docker_compose_config_validates(profile: str, env: dict[str, str]) -> None:
    compose = require_tool("docker-compose")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MODEL", "TENSOR_PARALLEL_SIZE", "DTYPE", "MAX_MODEL_LEN")}
    res = subprocess.run([compose, "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
                         capture_output=True, text=True, cwd=REPO, env={**clean, **env})
    assert res.returncode == 0, res.stderr


def test_profiles_bring_up_the_documented_services() -> None:
    assert set(_services("cpu")) == {"init", "preprocessor", "model-cpu", "prometheus", "grafana"}
    assert set(_services("gpu")) == {"init", "preprocessor", "model", "prometheus", "grafana"}


def test_gpu_model_tensor_parallelism_is_one_variable() -> None:
    for tp in ("1", "4"):
        model = _services("gpu", {"TENSOR_PARALLEL_SIZE": tp} if tp != "1" else {})["model"]
        (device,) = model["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert str(device["count"]) == tp
        assert _flag(model, "tensor-parallel-size") == tp


def test_model_variable_switches_both_services() -> None:
    default = _services("cpu")
    assert _flag(default["preprocessor"], "model") == _flag(default["model-cpu"], "model") == "/models/tiny-llava"
    assert _as_list(default["init"]["command"])[-1] == "/models/tiny-llava"
    for profile, model_service in (("cpu", "model-cpu"), ("gpu", "model")):
        real = _services(profile, {"MODEL": "HuggingFaceTB/SmolVLM-256M-Instruct"})
        assert _flag(real["preprocessor"], "model") == _flag(real[model_service], "model") \
            == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_preprocessor_reaches_the_model_of_either_profile_as_model() -> None:
    cpu, gpu = _services("cpu"), _services("gpu")
    assert _flag(cpu["preprocessor"], "model-target") == "model:50052"
    assert "model" in cpu["model-cpu"]["networks"]["default"]["aliases"]
    assert _flag(cpu["model-cpu"], "port") == _flag(gpu["model"], "port") == "50052"


def test_only_apis_and_metrics_are_published_on_loopback() -> None:
    expected = {
        "preprocessor": {50051, 8000, 9101},  # gRPC, OpenAI HTTP, metrics
        "model-cpu": {9102}, "model": {9102},  # metrics (its gRPC stays on the compose network)
        "prometheus": {9090}, "grafana": {3000},  # the UIs
    }
    services = {**_services("cpu"), **_services("gpu")}
    for name, spec in services.items():
        published = set()
        for entry in spec.get("ports") or []:
            host_ip, host_port, container_port = str(entry).split(":")
            assert host_ip == "127.0.0.1" and host_port == container_port, entry
            published.add(int(container_port))
        assert published == expected.get(name, set()), name
    pre = services["preprocessor"]
    assert {int(_flag(pre, f)) for f in ("port", "http-port", "metrics-port")} == expected["preprocessor"]
    for name in ("model-cpu", "model"):
        assert int(_flag(services[name], "metrics-port")) == 9102


def test_healthchecks_and_depends_on() -> None:
    services = {**_services("cpu"), **_services("gpu")}
    for name, port in (("preprocessor", 50051), ("model-cpu", 50052), ("model", 50052)):
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "vlm", "health", "--target", f"127.0.0.1:{port}"], name
        assert _depends_on(services[name]) == {"init": "service_completed_successfully"}
    assert _depends_on(services["grafana"]) == {"prometheus": "service_healthy"}
    assert services["prometheus"]["healthcheck"]["test"][:2] == ["CMD", "/bin/promtool"]


def test_models_and_hf_cache_are_volumes() -> None:
    services = _services("cpu")
    for name in ("preprocessor", "model-cpu"):
        volumes = services[name]["volumes"]
        assert "models:/models:ro" in volumes and "cache:/cache" in volumes
        assert services[name]["environment"]["HF_HOME"].startswith("/cache/")
    assert services["init"]["volumes"] == ["models:/models"]
