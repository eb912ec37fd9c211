"""TLS and bearer tokens from secrets: `compose.tls.yaml` over compose.yaml, and the Kustomize
components `tls` (+ `mtls`) over the overlays.

Statically, with the real tools: `docker-compose config` merges the override (cpu and gpu
profiles), `kubectl kustomize` renders overlays with the components (listed in the overlay
itself, as the README says, and around it), `kubernetes-validate --strict` passes the result
and the Secrets. Then for real: `deploy/secrets/generate.sh` makes the secrets and
`deploy/secrets/k8s-secrets.sh` turns them into Secrets (`kubectl create secret
--dry-run=client`); the files go where each container would see them (compose's
/run/secrets/NAME, the pods' secret volumes, secretKeyRef environment, `$(VAR)` in args); each
service's own argument parser and `vlm.security` read its command line and environment as
written; a model and a gateway gRPC server (health and reflection only: no engine) start with
that security; every healthcheck and probe, run as written, answers SERVING (and fails on
NOT_SERVING); the gateway's client security reaches the model by the name it verifies, and
without its token (or, with mTLS, its certificate) it is refused; clients reach the gateway
with the CA and the API token only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.deploy.test_k8s import K8S, _container, _one, _render, _validate
from tests.deploy.tools import DEPLOY, REPO, require_tool
from vlm.security import ClientSecurity, ServerSecurity
from vlm.server import BaseMetrics, GrpcApp, ServerOptions

COMPOSE, COMPOSE_TLS = REPO / "compose.yaml", REPO / "compose.tls.yaml"
SECRETS = DEPLOY / "secrets"
GENERATED = {"ca.crt", "ca.key", "model.crt", "model.key", "preprocessor.crt", "preprocessor.key",
             "api-token", "model-token"}
MODEL_SERVICE = {"cpu": "model-cpu", "gpu": "model"}
SECURITY_FLAGS = {
    "model": {"tls-cert", "tls-key", "tls-client-ca", "auth-token-file"},
    "preprocessor": {"tls-cert", "tls-key", "auth-token-file",
                     "model-tls-ca", "model-tls-cert", "model-tls-key", "model-auth-token-file"},
}
K8S_SECRETS = {"vlm-model-tls", "vlm-preprocessor-tls", "vlm-tokens"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _no_security_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VLM_TLS_", "VLM_AUTH_", "VLM_MODEL_"))}


@pytest.fixture(autouse=True)
def _clean_security_env(monkeypatch) -> None:
    for name in set(os.environ) - set(_no_security_env()):
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    require_tool("openssl")
    out = tmp_path_factory.mktemp("secrets") / "generated"
    res = subprocess.run([str(SECRETS / "generate.sh"), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


def test_generate_makes_the_secrets_and_git_never_commits_them(secrets_dir) -> None:
    assert {p.name for p in secrets_dir.iterdir()} == GENERATED
    for name in GENERATED:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/secrets/{name}"], cwd=REPO)
        assert ignored.returncode == 0, f"deploy/secrets/{name} is not git-ignored"
    for script in ("generate.sh", "k8s-secrets.sh", ".gitignore"):
        assert subprocess.run(["git", "check-ignore", "-q", f"deploy/secrets/{script}"], cwd=REPO).returncode == 1
    # The services run as uid 10001 and compose bind-mounts the files as they are; the CA key
    # stays private (and is mounted nowhere: see below).
    assert all((secrets_dir / n).stat().st_mode & 0o004 for n in GENERATED - {"ca.key"})
    assert (secrets_dir / "ca.key").stat().st_mode & 0o077 == 0
    assert (secrets_dir / "api-token").read_text() != (secrets_dir / "model-token").read_text()
    # A second run keeps what exists.
    before = (secrets_dir / "ca.crt").read_bytes()
    assert subprocess.run([str(SECRETS / "generate.sh"), str(secrets_dir)], capture_output=True).returncode == 0
    assert (secrets_dir / "ca.crt").read_bytes() == before


# ------------------------------------------------------------------------------ live check


@dataclasses.dataclass
class Side:
    """One service as deployed: its server security, the port its flags give, its probes
    (argv, with the container's paths replaced by local files) and the name clients verify."""

    security: ServerSecurity
    port: int
    probes: list[list[str]]
    name: str


def _parse(command: list[str]):
    """The service's own parser over its command line (`vlm serve-*` ARGS)."""
    assert command[0] == "vlm", command
    if command[1] == "serve-model":
        from model_svc.main import build_parser
    else:
        assert command[1] == "serve-preprocessor", command
        from preprocessor_svc.main import build_parser
    return build_parser().parse_args(command[2:])


def _localize(argv: list[str], files: dict[str, Path]) -> list[str]:
    """Container paths → the local files mounted there (an argument, or a `--flag=` value)."""
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if a in files:
            a = str(files[a])
        elif a.startswith("--") and eq and value in files:
            a = f"{flag}={files[value]}"
        out.append(a)
    return out


def _hop(args) -> ClientSecurity:
    """The gateway → model security, as `vlm serve-preprocessor` builds it."""
    return ClientSecurity.from_files(args.model_tls_ca, args.model_tls_cert, args.model_tls_key,
                                     args.model_auth_token_file, env_prefix="VLM_MODEL", tls=args.model_tls)


async def _services(security: ClientSecurity, address: str, server_name: str | None = None) -> set[str]:
    """Reflection's service list: an RPC that, unlike health, needs the token."""
    async with security.channel(address, [], server_name=server_name) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in stub.ServerReflectionInfo(requests(), metadata=security.metadata, timeout=10):
            return {s.name for s in resp.list_services_response.service}
    raise AssertionError("no reflection response")


async def _refused(security: ClientSecurity, address: str, server_name: str | None = None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _services(security, address, server_name)
    return err.value.code()


async def _probe(argv: list[str], port: int) -> tuple[int, str]:
    assert argv[:2] == ["python", "-c"] and argv[3].startswith("127.0.0.1:"), argv
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", argv[2], f"127.0.0.1:{port}", *argv[4:],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_no_security_env())
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def _live(model: Side, gateway: Side, hop: ClientSecurity, *, ca: bytes, api_token: str, mtls: bool) -> None:
    assert model.security.tls and gateway.security.tls
    assert model.security.token and gateway.security.token and model.security.token != gateway.security.token
    assert (model.security.client_ca is not None) == mtls and (hop.cert is not None) == mtls
    assert gateway.security.client_ca is None, "the gateway's clients need no certificate"
    apps: dict[str, GrpcApp] = {}
    try:
        for key, side in (("model", model), ("gateway", gateway)):
            options = ServerOptions(host="127.0.0.1", port=0, metrics_port=None, grace_s=0.1, security=side.security)
            apps[key] = GrpcApp(key, options, BaseMetrics(key))
            await apps[key].start()
            await apps[key].set_serving(True)
        for key, side in (("model", model), ("gateway", gateway)):
            assert side.probes, key
            for argv in side.probes:
                assert argv[3] == f"127.0.0.1:{side.port}", "the probe checks the port the service listens on"
                rc, out = await _probe(argv, apps[key].port)
                assert (rc, out.strip()) == (0, "SERVING"), (key, out)
        # The hop, by the name the gateway verifies the replicas with.
        model_at = f"127.0.0.1:{apps['model'].port}"
        assert "grpc.health.v1.Health" in await _services(hop, model_at, model.name)
        no_token = dataclasses.replace(hop, token=None)
        assert await _refused(no_token, model_at, model.name) == grpc.StatusCode.UNAUTHENTICATED
        if mtls:
            no_cert = dataclasses.replace(hop, cert=None, key=None)
            assert await _refused(no_cert, model_at, model.name) == grpc.StatusCode.UNAVAILABLE
        # Clients of the gateway: the CA and the API token, by its name (and, for compose's
        # published ports, as 127.0.0.1 and localhost).
        client = ClientSecurity(ca=ca, token=api_token, tls=True)
        port = apps["gateway"].port
        for address, name in ((f"127.0.0.1:{port}", gateway.name), (f"127.0.0.1:{port}", None),
                              (f"localhost:{port}", None)):
            assert "grpc.health.v1.Health" in await _services(client, address, name)
        hop_token = dataclasses.replace(client, token=model.security.token)
        assert await _refused(hop_token, f"127.0.0.1:{port}", gateway.name) == grpc.StatusCode.UNAUTHENTICATED
        # The probes read the status: NOT_SERVING fails them.
        await apps["model"].set_serving(False)
        rc, out = await _probe(model.probes[0], apps["model"].port)
        assert rc != 0 and "NOT_SERVING" in out
    finally:
        for app in apps.values():
            await app.stop(0)


# ------------------------------------------------------------------------------ compose


def _compose_config(profile: str, *files: Path) -> dict:
    env = {k: v for k, v in _no_security_env().items()
           if k not in ("MODEL", "TENSOR_PARALLEL_SIZE", "DTYPE", "MAX_MODEL_LEN")}
    argv = [require_tool("docker-compose")]
    for f in files:
        argv += ["-f", str(f)]
    res = subprocess.run([*argv, "--profile", profile, "config"], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def compose(request) -> tuple[str, dict, dict]:
    """(profile, compose.yaml, compose.yaml + compose.tls.yaml), each as `docker-compose config`."""
    return request.param, _compose_config(request.param, COMPOSE), _compose_config(request.param, COMPOSE, COMPOSE_TLS)


def _flags(command: list[str]) -> dict[str, str]:
    flags = [a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a]
    assert len({k for k, _ in flags}) == len(flags), command
    return dict(flags)


def _compose_mounts(doc: dict, service: str) -> dict[str, Path]:
    """Container path → the secret's source file, for each secret the service mounts."""
    mounts = {}
    for entry in doc["services"][service].get("secrets", []):
        entry = {"source": entry} if isinstance(entry, str) else entry
        target = entry.get("target", entry["source"])
        mounts[target if target.startswith("/") else f"/run/secrets/{target}"] = Path(
            doc["secrets"][entry["source"]]["file"])
    return mounts


def _normalized(spec: dict) -> dict:
    """A service without the order of its volume and port lists (a merge reorders them)."""
    return {k: sorted(v, key=str) if k in ("volumes", "ports") else v for k, v in spec.items()}


def test_compose_tls_only_adds_security_to_the_two_services(compose) -> None:
    profile, base, tls = compose
    base = {**base, "services": {n: _normalized(s) for n, s in base["services"].items()}}
    tls = {**tls, "services": {n: _normalized(s) for n, s in tls["services"].items()}}
    # (docker-compose 1.29's `config` lists the other profile's services too.)
    secured = {"preprocessor": "preprocessor", MODEL_SERVICE[profile]: "model"}
    secured.update({s: "model" for s in MODEL_SERVICE.values() if s in base["services"]})
    assert set(tls["services"]) == set(base["services"])
    for name, spec in base["services"].items():
        if name not in secured:
            assert tls["services"][name] == spec, name
            continue
        over = tls["services"][name]
        changed = {k for k in {*spec, *over} if spec.get(k) != over.get(k)}
        assert changed == {"command", "secrets", "healthcheck"}, name
        assert {k: v for k, v in over["healthcheck"].items() if k != "test"} == \
            {k: v for k, v in spec["healthcheck"].items() if k != "test"}
        # compose.yaml's command, unchanged, then the security flags (a drift fails here).
        n = len(spec["command"])
        assert over["command"][:n] == spec["command"], f"{name}: compose.tls.yaml's command drifted from compose.yaml's"
        assert set(_flags(over["command"][n:])) == SECURITY_FLAGS[secured[name]], name
        assert len(over["command"]) == n + len(SECURITY_FLAGS[secured[name]])


def test_compose_tls_mounts_exactly_the_secrets_it_uses(compose) -> None:
    profile, _, tls = compose
    for name in ("preprocessor", MODEL_SERVICE[profile]):
        spec = tls["services"][name]
        mounts = _compose_mounts(tls, name)
        used = set(re.findall(r"/run/secrets/[\w.-]+", " ".join([*spec["command"], *spec["healthcheck"]["test"]])))
        assert used == set(mounts), name
        for source in mounts.values():
            assert source.parent == SECRETS and source.name in GENERATED - {"ca.key"}, source


def test_compose_tls_healthchecks_check_health_over_tls(compose) -> None:
    profile, _, tls = compose
    pre, model = tls["services"]["preprocessor"], tls["services"][MODEL_SERVICE[profile]]
    model_host = _flags(pre["command"])["model-target"].rsplit(":", 1)[0]
    for spec, name in ((pre, "preprocessor"), (model, model_host)):
        test = spec["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        assert test[4:6] == [f"127.0.0.1:{_flags(spec['command'])['port']}", name]
    flags = _flags(model["command"])
    # The model requires client certificates: its healthcheck presents the model's own.
    assert model["healthcheck"]["test"][6:] == [flags["tls-client-ca"], flags["tls-cert"], flags["tls-key"]]
    assert pre["healthcheck"]["test"][6:] == [_flags(pre["command"])["model-tls-ca"]]


async def test_compose_tls_live(compose, secrets_dir) -> None:
    profile, _, tls = compose
    model_host = _flags(tls["services"]["preprocessor"]["command"])["model-target"].rsplit(":", 1)[0]
    sides, hop = {}, None
    for key, service in (("model", MODEL_SERVICE[profile]), ("gateway", "preprocessor")):
        spec = tls["services"][service]
        files = {path: secrets_dir / source.name for path, source in _compose_mounts(tls, service).items()}
        args = _parse(_localize(spec["command"], files))
        sides[key] = Side(ServerOptions.from_args(args).security, args.port,
                          [_localize(spec["healthcheck"]["test"][1:], files)],
                          model_host if key == "model" else "preprocessor")
        if key == "gateway":
            hop = _hop(args)
    await _live(sides["model"], sides["gateway"], hop, ca=(secrets_dir / "ca.crt").read_bytes(),
                api_token=(secrets_dir / "api-token").read_text(), mtls=True)


# ------------------------------------------------------------------------------ Kubernetes


def _kustomization(root: Path, resources: list[str], components: list[str]) -> None:
    root.mkdir(parents=True)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "vlm-serve",
        "resources": resources, "components": components}))


#: (overlay, components, where they are listed: in the overlay itself or in a kustomization around it)
K8S_CASES = {
    "cpu+tls": ("cpu", ["tls"], "around"),
    "cpu+tls+mtls": ("cpu", ["tls", "mtls"], "in"),
    "gpu+tls+mtls": ("gpu", ["tls", "mtls"], "in"),
    "gpu+all": ("gpu", ["keda", "servicemonitor", "tls", "mtls"], "around"),
}


@pytest.fixture(scope="module", params=list(K8S_CASES))
def k8s(request, tmp_path_factory) -> tuple[str, list[dict]]:
    overlay, components, where = K8S_CASES[request.param]
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    if where == "in":
        path = tree / "overlays" / overlay / "kustomization.yaml"
        doc = yaml.safe_load(path.read_text())
        assert "components" not in doc
        path.write_text(yaml.safe_dump({**doc, "components": [f"../../components/{c}" for c in components]}))
        return request.param, _render(path.parent)
    root = tree / "around"
    _kustomization(root, [f"../overlays/{overlay}"], [f"../components/{c}" for c in components])
    return request.param, _render(root)


@pytest.fixture(scope="module")
def k8s_secrets(secrets_dir) -> list[dict]:
    require_tool("kubectl")
    res = subprocess.run([str(SECRETS / "k8s-secrets.sh"), str(secrets_dir)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _secret_data(secrets: list[dict]) -> dict[str, dict[str, bytes]]:
    return {s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s["data"].items()} for s in secrets}


@pytest.mark.parametrize("version", [None, "1.29.0"])
def test_k8s_tls_validates_strict_with_its_secrets(k8s, k8s_secrets, version, tmp_path) -> None:
    name, docs = k8s
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all([*docs, *k8s_secrets]))
    res = _validate(path, version)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    crds = sum(d["kind"] in ("ScaledObject", "ServiceMonitor") for d in docs)
    assert out.count(" passed for resource ") == len(docs) - crds + len(k8s_secrets), out


def test_k8s_secrets_script_makes_the_secrets_the_components_mount(k8s, k8s_secrets) -> None:
    _, docs = k8s
    made = _secret_data(k8s_secrets)
    assert set(made) == K8S_SECRETS
    assert all(s["metadata"]["namespace"] == "vlm-serve" for s in k8s_secrets)
    assert {s["metadata"]["name"] for s in k8s_secrets if s.get("type") == "kubernetes.io/tls"} == \
        {"vlm-model-tls", "vlm-preprocessor-tls"}
    referenced: set[tuple[str, str]] = set()
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        for vol in dep["spec"]["template"]["spec"]["volumes"]:
            if "secret" in vol:
                referenced |= {(vol["secret"]["secretName"], i["key"]) for i in vol["secret"]["items"]}
        for env in _container(dep).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add((ref["name"], ref["key"]))
    assert referenced, "no secret referenced"
    assert referenced <= {(s, k) for s, keys in made.items() for k in keys}
    assert {s for s, _ in referenced} == K8S_SECRETS


def _pod_files(dep: dict, secrets: dict[str, dict[str, bytes]], root: Path) -> dict[str, Path]:
    """Container path → a local copy of the secret key mounted there."""
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for mount in _container(dep)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if not secret:
            continue
        assert mount.get("readOnly") is True
        for item in secret["items"]:
            local = root / dep["metadata"]["name"] / item["path"]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(secrets[secret["secretName"]][item["key"]])
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = local
    return files


def _pod_env(dep: dict, docs: list[dict], secrets: dict[str, dict[str, bytes]],
             files: dict[str, Path]) -> dict[str, str]:
    """The container's environment as kubelet sets it (paths localized)."""
    env = {}
    for e in _container(dep).get("env", []):
        if "value" in e:
            env[e["name"]] = str(files.get(e["value"], e["value"]))
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]].decode()
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = _one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def _model_host(docs: list[dict]) -> str:
    """The host of the gateway's --model-target: the name it verifies the replicas by."""
    return _flags(_container(_one(docs, "Deployment", "preprocessor"))["args"])["model-target"].rsplit(":", 1)[0]


def test_k8s_tls_wiring(k8s) -> None:
    name, docs = k8s
    mtls = "mtls" in K8S_CASES[name][1]
    model, pre = _one(docs, "Deployment", "model"), _one(docs, "Deployment", "preprocessor")
    cases = ((model, _model_host(docs), 50052, PROBES), (pre, "preprocessor", 50051, ("readinessProbe",)))
    for dep, host, port, probes in cases:
        c = _container(dep)
        # Kubelet's gRPC probes have no TLS: none is left.
        assert not any("grpc" in c[p] for p in PROBES), dep["metadata"]["name"]
        for p in probes:
            command = c[p]["exec"]["command"]
            assert command[3:5] == [f"127.0.0.1:{port}", host], (p, command)
            # python -c CODE HOST:PORT NAME CA [CERT KEY]: the model's own certificate with mTLS.
            assert len(command) == (8 if mtls and dep is model else 6), (p, command)
        mounted = {f"{m['mountPath']}/{i['path']}" for m in c["volumeMounts"]
                   for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"] and "secret" in v
                   for i in v["secret"]["items"]}
        paths = {e["value"] for e in c["env"] if e.get("value", "").startswith("/")}
        paths |= {a for p in probes for a in c[p]["exec"]["command"] if a.startswith("/")}
        assert paths and paths <= mounted, (paths, mounted)
    env = {e["name"] for e in _container(model)["env"]}
    assert {"VLM_TLS_CERT", "VLM_TLS_KEY", "VLM_AUTH_TOKEN"} <= env
    assert ("VLM_TLS_CLIENT_CA" in env) == mtls
    env = {e["name"] for e in _container(pre)["env"]}
    assert {"VLM_TLS_CERT", "VLM_TLS_KEY", "VLM_AUTH_TOKEN", "VLM_MODEL_TLS_CA", "VLM_MODEL_AUTH_TOKEN"} <= env
    client_cert = {"VLM_MODEL_TLS_CERT", "VLM_MODEL_TLS_KEY"} & env
    assert client_cert == ({"VLM_MODEL_TLS_CERT", "VLM_MODEL_TLS_KEY"} if mtls else set())
    # The overlays' own settings survive the components (the gpu overlay replaces `args`).
    assert any(a.startswith("--tensor-parallel-size=") for a in _container(model)["args"])
    if name.startswith("cpu"):
        assert "VLLM_CPU_KVCACHE_SPACE" in {e["name"] for e in _container(model)["env"]}


def test_k8s_and_compose_probe_the_same_way(k8s) -> None:
    _, docs = k8s
    compose_tls = yaml.safe_load(COMPOSE_TLS.read_text())
    codes = {s["healthcheck"]["test"][3] for s in compose_tls["services"].values()}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        c = _container(dep)
        codes |= {c[p]["exec"]["command"][2] for p in PROBES if "exec" in c[p]}
    assert len(codes) == 1, "one probe program, written identically everywhere"


async def test_k8s_tls_live(k8s, k8s_secrets, monkeypatch, tmp_path) -> None:
    name, docs = k8s
    secrets = _secret_data(k8s_secrets)
    model_host = _model_host(docs)
    sides, hop = {}, None
    for key, dep_name in (("model", "model"), ("gateway", "preprocessor")):
        dep = _one(docs, "Deployment", dep_name)
        c = _container(dep)
        files = _pod_files(dep, secrets, tmp_path)
        env = _pod_env(dep, docs, secrets, files)
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            parsed = _parse([*c["command"], *args])
            security = ServerOptions.from_args(parsed).security
            if key == "gateway":
                hop = _hop(parsed)
        probes = {tuple(_localize(c[p]["exec"]["command"], files)) for p in PROBES if "exec" in c[p]}
        sides[key] = Side(security, parsed.port, [list(p) for p in sorted(probes)],
                          model_host if key == "model" else "preprocessor")
    await _live(sides["model"], sides["gateway"], hop, ca=secrets["vlm-preprocessor-tls"]["ca.crt"],
                api_token=secrets["vlm-tokens"]["api-token"].decode(), mtls="mtls" in K8S_CASES[name][1])
