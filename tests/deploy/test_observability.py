"""Prometheus and Grafana files, statically: `promtool check config` and `promtool check rules`
pass; the rules cover the alerts the README lists; Grafana's provisioning (datasource,
dashboard provider) and the dashboard parse, point at each other and at compose.yaml's mounts,
and every panel expression is valid PromQL (checked by promtool as a rule). Grafana itself is
not installable here, so it is never started; the live checks — every panel and rule
expression returning data from a real Prometheus — are in test_compose_stack.py."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.deploy.tools import DEPLOY, REPO, require_tool

PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"


def _promtool(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, **kw)


def test_promtool_check_config() -> None:
    res = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 rule files found" in res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert len(files) == 2
    res = _promtool("check", "rules", *files)
    assert res.returncode == 0, res.stdout + res.stderr


def test_alerts_cover_the_listed_conditions() -> None:
    def rules(name: str) -> list[dict]:
        return [r for g in yaml.safe_load((PROM / "rules" / name).read_text())["groups"] for r in g["rules"]]

    alerts = {r["alert"]: r["expr"] for r in rules("vlm-alerts.yml")}
    recorded = {r["record"]: r["expr"] for r in rules("vlm-recording.yml")}

    def uses(alert: str, metric: str) -> bool:
        expr = alerts[alert]
        return metric in expr or any(metric in recorded[name] for name in recorded if name in expr)

    assert uses("VlmEngineUnhealthy", "vlm_engine_healthy")
    assert uses("VlmNoReplicaHealthy", "vlm_gateway_replica_up")
    assert uses("VlmTimeToFirstTokenHigh", "vlm_time_to_first_token_seconds_bucket")
    assert uses("VlmPreprocessQueueNearLimit", "vlm_preprocess_queue_depth")
    assert uses("VlmPreprocessQueueNearLimit", "vlm_preprocess_max_queue")
    assert uses("VlmErrorRatioHigh", "vlm_grpc_requests_total")


def _dashboard() -> dict:
    (path,) = GRAFANA.joinpath("dashboards").glob("*.json")
    return json.loads(path.read_text())


def test_grafana_datasource_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy"
    assert ds["url"] == "http://prometheus:9090"  # the compose service and its port
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    assert "--web.listen-address=0.0.0.0:9090" in compose["prometheus"]["command"]
    uids = {t["datasource"]["uid"] for p in _dashboard()["panels"] for t in [p, *p["targets"]]}
    assert uids == {ds["uid"]}


def test_grafana_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vlm.yml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    mounts = dict(v.split(":")[:2] for v in
                  yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


def test_dashboard_has_the_required_panels() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    required = {
        "TTFT p50/p95": ("vlm_time_to_first_token_seconds_bucket", "0.5", "0.95"),
        "inter-token latency p50/p95": ("vlm_inter_token_latency_seconds_bucket", "0.5", "0.95"),
        "tokens/s": ("rate(vlm_generation_tokens_total",),
        "running and waiting": ("vlm_num_requests_running", "vlm_num_requests_waiting"),
        "KV usage": ("vlm_kv_cache_usage_perc",),
        "preprocessing latency by modality": ("vlm_preprocess_duration_seconds_bucket", "modality"),
        "queue depth": ("vlm_preprocess_queue_depth",),
        "cache hit ratios": ("vlm_feature_store_hits_total", "vlm_processor_cache_hits_total"),
        "errors by code": ("vlm_grpc_requests_total", 'code!="OK"', "code)"),
        "per-replica traffic": ("vlm_gateway_replica_requests_total", "by (replica)"),
        "OpenAI HTTP status": ("vlm_http_requests_total", "status)"),
        "OpenAI HTTP latency": ("vlm_http_request_duration_seconds_bucket", "0.95"),
    }
    for what, needles in required.items():
        assert any(all(n in e for n in needles) for e in exprs.values()), what


def test_dashboard_expressions_are_valid_promql(tmp_path) -> None:
    """promtool has no expression checker in Debian's 2.42: each panel query becomes a
    recording rule, which `promtool check rules` parses."""
    rules = [{"record": f"dashboard:expr_{i}", "expr": t["expr"].replace("$__rate_interval", "1m")}
             for i, t in enumerate(t for p in _dashboard()["panels"] for t in p["targets"])]
    assert all(not re.search(r"\$\w", r["expr"]) for r in rules), "no other Grafana variables"
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
