"""deploy/k8s: `kubectl kustomize` renders the cpu and gpu overlays (and the gpu overlay with
both optional components), `kubernetes-validate --strict` validates every built-in object
offline, and the rendered objects are wired as the README says.

CRDs (KEDA's ScaledObject, the Prometheus Operator's ServiceMonitor) have no schema in
kubernetes-validate (it warns "Couldn't find schema" and passes them). They are checked here
instead against a transcription of the fields these manifests use (unknown fields refused at
every level written), and by their references: the Deployment a ScaledObject scales, the
metric its query reads, the Services and port a ServiceMonitor selects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.tools import DEPLOY, REPO, require_tool

K8S = DEPLOY / "k8s"
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}
#: The newest schemas kubernetes-validate bundles, and the oldest release this targets
#: (gRPC probes are GA since 1.27).
K8S_VERSIONS = (None, "1.29.0")


def _render(target: Path) -> list[dict]:
    res = subprocess.run([require_tool("kubectl"), "kustomize", str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _with_components(tmp_path: Path) -> Path:
    root = tmp_path / "gpu-with-components"
    root.mkdir()
    rel = Path(os.path.relpath(K8S, root))  # kustomize wants relative paths
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "vlm-serve",
        "resources": [str(rel / "overlays" / "gpu")],
        "components": [str(rel / "components" / "keda"), str(rel / "components" / "servicemonitor")],
    }))
    return root


@pytest.fixture(scope="module", params=["cpu", "gpu", "gpu+components"])
def rendered(request, tmp_path_factory) -> tuple[str, list[dict]]:
    if request.param == "gpu+components":
        return request.param, _render(_with_components(tmp_path_factory.mktemp("k8s")))
    return request.param, _render(K8S / "overlays" / request.param)


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


# ------------------------------------------------------------------------------ validation


def _validate(path: Path, version: str | None, strict: bool = True) -> subprocess.CompletedProcess:
    cmd = [require_tool("kubernetes-validate"), *(["--strict"] if strict else []), str(path)]
    if version:
        cmd[1:1] = ["-k", version]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(rendered, version, tmp_path) -> None:
    name, docs = rendered
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    res = _validate(path, version)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert out.count(" passed for resource ") == len(builtin), out
    unvalidated = re.findall(r"Couldn't find schema for kind (\w+)", out)
    assert sorted(unvalidated) == sorted(d["kind"] for d in docs if d["kind"] in CRD_KINDS), out


def test_strict_validation_catches_unknown_fields(tmp_path) -> None:
    docs = _render(K8S / "overlays" / "gpu")
    _container(_one(docs, "Deployment", "model"))["resourcez"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert _validate(path, None).returncode != 0


# ------------------------------------------------------------------------------ wiring


def test_components_and_services(rendered) -> None:
    _, docs = rendered
    for component, port in (("model", 50052), ("preprocessor", 50051)):
        dep = _one(docs, "Deployment", component)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = _one(docs, "Service", component)
        assert svc["spec"]["selector"].items() <= labels.items()
        assert port in {p["port"] for p in svc["spec"]["ports"]}
        pdb = _one(docs, "PodDisruptionBudget", component)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        c = _container(dep)
        # Every $(VAR) in the arguments is defined in the container's environment.
        env = {e["name"] for e in c.get("env", [])}
        assert set(re.findall(r"\$\((\w+)\)", " ".join(c["args"]))) <= env
        # Scrape annotations name the metrics port the process listens on.
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == _flag(c["args"], "metrics-port")
        assert dep["metadata"]["namespace"] == "vlm-serve"
        sc = dep["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0


def test_model_probes_and_graceful_termination(rendered) -> None:
    _, docs = rendered
    dep = _one(docs, "Deployment", "model")
    c = _container(dep)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Native gRPC probes on the standard health service (service "" = the whole server).
        assert c[probe]["grpc"] == {"port": 50052}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "sized for model download + load"
    grace = float(_flag(c["args"], "grace"))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_gateway_reaches_every_model_replica_through_the_headless_service(rendered) -> None:
    _, docs = rendered
    pre = _one(docs, "Deployment", "preprocessor")
    c = _container(pre)
    target = _flag(c["args"], "model-target")
    host, port = target.rsplit(":", 1)
    headless = _one(docs, "Service", host)
    assert headless["spec"]["clusterIP"] == "None"
    assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
    model_labels = _one(docs, "Deployment", "model")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= model_labels.items()
    assert float(_flag(c["args"], "resolve-interval")) > 0
    grace = float(_flag(c["args"], "grace"))
    assert pre["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    # Ready end to end (gRPC health), alive without the model replicas (TCP).
    assert c["readinessProbe"]["grpc"] == {"port": 50051}
    assert "tcpSocket" in c["livenessProbe"]


def test_preprocessor_hpa_on_cpu(rendered) -> None:
    _, docs = rendered
    hpa = _one(docs, "HorizontalPodAutoscaler", "preprocessor")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "preprocessor"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in _container(_one(docs, "Deployment", "preprocessor"))["resources"]["requests"]


def test_overlays_accelerator(rendered) -> None:
    name, docs = rendered
    c = _container(_one(docs, "Deployment", "model"))
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vlm-config")]
    tp = config["data"]["TENSOR_PARALLEL_SIZE"]
    assert _flag(c["args"], "tensor-parallel-size") == "$(TENSOR_PARALLEL_SIZE)"
    if name.startswith("gpu"):
        assert c["image"].endswith(":gpu")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp
    else:
        assert c["image"].endswith(":cpu")
        assert "nvidia.com/gpu" not in str(c["resources"])
        assert {e["name"] for e in c["env"]} >= {"VLLM_CPU_KVCACHE_SPACE"}


def test_gpu_count_follows_tensor_parallel_size(tmp_path) -> None:
    """One knob: TENSOR_PARALLEL_SIZE in the gpu overlay sets --tensor-parallel-size (through
    the ConfigMap) and the nvidia.com/gpu request and limit (a kustomize replacement)."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "gpu" / "kustomization.yaml"
    text = overlay.read_text()
    assert text.count("TENSOR_PARALLEL_SIZE=1") == 1
    overlay.write_text(text.replace("TENSOR_PARALLEL_SIZE=1", "TENSOR_PARALLEL_SIZE=2"))
    docs = _render(overlay.parent)
    c = _container(_one(docs, "Deployment", "model"))
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["TENSOR_PARALLEL_SIZE"] == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    tp_env = [e for e in c["env"] if e["name"] == "TENSOR_PARALLEL_SIZE"]
    assert tp_env[0]["valueFrom"]["configMapKeyRef"]["name"] == config["metadata"]["name"]


# ------------------------------------------------------------------------------ CRDs

_SCALED_OBJECT = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "prometheus"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "metadata": {"type": "object", "additionalProperties": False,
                                     "required": ["serverAddress", "query", "threshold"],
                                     "properties": {"serverAddress": {"type": "string", "pattern": "^https?://"},
                                                    "query": {"type": "string"},
                                                    "threshold": {"type": "string", "pattern": r"^\d+(\.\d+)?$"},
                                                    "activationThreshold": {"type": "string"}}},
                    }}},
            },
        },
    },
}

_SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": r"^\d+(s|m)$"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                           "targetLabel": {"type": "string"}}}},
                    }}},
            },
        },
    },
}


def test_crds_by_hand(tmp_path) -> None:
    docs = _render(_with_components(tmp_path))
    so = _one(docs, "ScaledObject", "model")
    jsonschema.validate(so, _SCALED_OBJECT)
    target = so["spec"]["scaleTargetRef"]
    assert _one(docs, target.get("kind", "Deployment"), target["name"])
    (trigger,) = so["spec"]["triggers"]
    metrics = set(re.findall(r"vlm_\w+", trigger["metadata"]["query"]))
    assert metrics == {"vlm_num_requests_waiting"}
    assert 'f"{P}_num_requests_waiting"' in (REPO / "model_svc" / "metrics.py").read_text()
    # The query's labels are the ones the ServiceMonitor gives the model's series.
    assert 'component="model"' in trigger["metadata"]["query"]

    sm = _one(docs, "ServiceMonitor", "vlm-serve")
    jsonschema.validate(sm, _SERVICE_MONITOR)
    selected = [d for d in docs if d["kind"] == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    with_port = {d["metadata"]["name"] for d in selected
                 if any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in d["spec"]["ports"])}
    assert with_port == {"model", "preprocessor"}  # the headless Service has no metrics port
    (relabel,) = sm["spec"]["endpoints"][0]["relabelings"]
    assert relabel["targetLabel"] == "component"
    assert all(so["metadata"]["namespace"] == sm["metadata"]["namespace"] == d["metadata"].get("namespace", "vlm-serve")
               for d in docs if d["kind"] != "Namespace")
