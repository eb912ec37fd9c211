"""Run a compose file's services as local processes, in place of the images.

There is no Docker daemon here, so this checks compose.yaml's wiring — commands, environment,
ports, volumes, `depends_on`, healthchecks — with the real programs. The translation from
what a container would see to what the local process gets:

- **Variables.** `${VAR:-default}`, `${VAR-default}`, `${VAR}`, `$VAR` and `$$` are
  interpolated as compose does, from an empty environment: the file's defaults apply, as for
  `docker compose up` with nothing set.
- **Network.** Each service gets its own loopback address (127.X.Y.N, X and Y random per run);
  its network aliases resolve to the same one. In its command, environment, healthcheck and
  mounted files, `0.0.0.0`, `127.0.0.1` and `localhost` become its own address, and
  `NAME:PORT` for another service (or alias) becomes that service's address. Ports stay as
  written: services cannot collide, their addresses differ. A published port
  `127.0.0.1:H:C` is reached at the service's address on port C (`published_ports` reports them).
- **Volumes.** A named volume is one temp dir, shared by every service that mounts it; a bind
  mount of a repo path is a per-service copy whose text files get the network rewrite above.
  Container paths in arguments and environment values are replaced by these directories
  (a `:ro` mode is not enforced).
- **Programs.** The image's program is replaced by the same program installed here, from an
  explicit table (`vlm` → this venv's script, `python` → this interpreter, `/bin/prometheus`,
  `/bin/promtool` → Debian's). A service left out on purpose (no local equivalent) is named
  with the reason in `skip`; any other unknown program is an error.
- **Environment.** The service's `environment` only, plus PATH, HOME (a temp dir per service)
  and LANG; nothing is inherited from the test process.
- **Order.** `depends_on` conditions as compose applies them: `service_completed_successfully`
  waits for exit 0, `service_healthy` for the service's healthcheck to pass, `service_started`
  for the start. Healthchecks run the compose `test` command (`CMD` or `CMD-SHELL`).

Not translated (runtime settings, not wiring): `build`, `image`, `init`, `ipc`, `shm_size`,
`restart`, `deploy`. `stop_grace_period` bounds the wait after SIGTERM.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
_TEXT_SUFFIXES = {".yml", ".yaml", ".json", ".conf", ".ini", ".txt", ".toml"}


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation over every string in a loaded compose document."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1) or m.group(4)
            op, default = m.group(2), m.group(3) or ""
            current = env.get(name)
            if op == ":-" and not current:
                return default
            if op == "-" and current is None:
                return default
            return current or ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def parse_duration(text: str | None, default: float) -> float:
    """Compose duration (`10s`, `1m30s`, `500ms`) in seconds."""
    if not text:
        return default
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in _DURATION.findall(str(text)))


def load(compose_file: Path, profile: str) -> dict[str, dict]:
    """The services of `profile` (and those without profiles), interpolated, in file order."""
    doc = interpolate(yaml.safe_load(compose_file.read_text()), {})
    return {
        name: spec for name, spec in doc["services"].items()
        if not spec.get("profiles") or profile in spec["profiles"]
    }


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _depends_on(spec: dict) -> dict[str, str]:
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


@dataclass
class LocalService:
    name: str
    address: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None
    health_interval: float
    health_timeout: float
    stop_grace: float
    depends_on: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    healthy: bool = False
    mounts: dict[str, Path] = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class LocalCompose:
    """One profile of a compose file, translated (see the module doc) and run as processes."""

    def __init__(self, compose_file: Path, profile: str, workdir: Path, *,
                 programs: Mapping[str, str], skip: Mapping[str, str]) -> None:
        self.compose_file = compose_file
        self.root = compose_file.parent
        self.workdir = workdir
        self.specs = load(compose_file, profile)
        self.skipped = {n: r for n, r in skip.items() if n in self.specs}
        self.programs = dict(programs)
        net = random.Random()
        self.network = f"127.{net.randint(1, 254)}.{net.randint(1, 254)}"
        self.address: dict[str, str] = {}
        self.hosts: dict[str, str] = {}  # service names and aliases → address
        for i, name in enumerate(self.specs):
            self.address[name] = f"{self.network}.{i + 2}"
            self.hosts[name] = self.address[name]
            for net_spec in (self.specs[name].get("networks") or {}).values():
                for alias in (net_spec or {}).get("aliases", []):
                    self.hosts[alias] = self.address[name]
        self.services = {n: self._translate(n) for n in self.specs if n not in self.skipped}

    # ---------------------------------------------------------------- translation

    def rewrite_hosts(self, text: str, own: str) -> str:
        """The network rule: own loopback/any address → own address, `NAME:PORT` → its address."""
        text = re.sub(r"(?<![\w.-])(?:0\.0\.0\.0|127\.0\.0\.1|localhost)(?![\w.-])", own, text)
        for host in sorted(self.hosts, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.-]){re.escape(host)}(?=:\d)", self.hosts[host], text)
        return text

    def _mounts(self, name: str, spec: dict) -> dict[str, Path]:
        mounts: dict[str, Path] = {}
        for i, entry in enumerate(spec.get("volumes") or []):
            src, dst, *_ = str(entry).split(":")
            if src.startswith((".", "/")):
                origin = (self.root / src).resolve()
                copy = self.workdir / "binds" / name / str(i)
                if origin.is_dir():
                    shutil.copytree(origin, copy)
                    files = [p for p in copy.rglob("*") if p.is_file()]
                else:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, copy)
                    files = [copy]
                for f in files:
                    if f.suffix in _TEXT_SUFFIXES:
                        f.write_text(self.rewrite_hosts(f.read_text(), self.address[name]))
                mounts[dst] = copy
            else:
                volume = self.workdir / "volumes" / src
                volume.mkdir(parents=True, exist_ok=True)
                mounts[dst] = volume
        return mounts

    def _paths(self, text: str, mounts: dict[str, Path]) -> str:
        if not mounts:
            return text
        alternation = "|".join(re.escape(d) for d in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.])({alternation})(?=/|$|[^\w.-])")
        return pattern.sub(lambda m: str(mounts[m.group(1)]), text)

    def _program(self, argv: list[str], name: str) -> list[str]:
        if not argv:
            raise ValueError(f"service {name}: no command (name it in `skip` with the reason)")
        if argv[0] not in self.programs:
            raise ValueError(f"service {name}: no local program for {argv[0]!r}")
        return [self.programs[argv[0]], *argv[1:]]

    def _translate(self, name: str) -> LocalService:
        spec = self.specs[name]
        own = self.address[name]
        mounts = self._mounts(name, spec)

        def fix(s: str) -> str:
            return self._paths(self.rewrite_hosts(s, own), mounts)

        argv = [fix(a) for a in _as_list(spec.get("entrypoint")) + _as_list(spec.get("command"))]
        env_spec = spec.get("environment") or {}
        if isinstance(env_spec, list):
            env_spec = dict(e.split("=", 1) for e in env_spec)
        home = self.workdir / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.pathsep.join([str(Path(self.programs["vlm"]).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(home),
            "LANG": "C.UTF-8",
        }
        env.update({k: fix(str(v)) for k, v in env_spec.items()})
        health = spec.get("healthcheck") or {}
        test = health.get("test")
        check: list[str] | None = None
        if test and not health.get("disable") and test != ["NONE"]:
            kind, *rest = test if isinstance(test, list) else ["CMD-SHELL", test]
            check = (self._program([fix(a) for a in rest], name) if kind == "CMD"
                     else ["/bin/sh", "-c", fix(" ".join(rest))])
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        return LocalService(
            name=name, address=own, argv=self._program(argv, name), env=env, healthcheck=check,
            health_interval=parse_duration(health.get("interval"), 30.0),
            health_timeout=parse_duration(health.get("timeout"), 30.0),
            stop_grace=parse_duration(spec.get("stop_grace_period"), 10.0),
            depends_on=_depends_on(spec), log_path=log_dir / f"{name}.log", mounts=mounts,
        )

    # ---------------------------------------------------------------- running

    def published_ports(self, name: str) -> list[tuple[str, int, int]]:
        """(host ip, host port, container port) of each `ports` entry."""
        out = []
        for entry in self.specs[name].get("ports") or []:
            parts = str(entry).split(":")
            host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((host_ip, int(parts[-2]), int(parts[-1].split("/")[0])))
        return out

    def check_health(self, name: str) -> bool:
        svc = self.services[name]
        if svc.healthcheck is None:
            return svc.proc is not None and svc.proc.poll() is None
        try:
            res = subprocess.run(svc.healthcheck, env=svc.env, capture_output=True,
                                 timeout=svc.health_timeout)
        except subprocess.TimeoutExpired:
            return False
        svc.healthy = res.returncode == 0
        return svc.healthy

    def _start(self, name: str) -> None:
        svc = self.services[name]
        with open(svc.log_path, "ab") as log:
            svc.proc = subprocess.Popen(svc.argv, env=svc.env, cwd=svc.env["HOME"], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def _met(self, dep: str, condition: str) -> bool:
        if dep in self.skipped:
            raise RuntimeError(f"a started service depends on {dep}, which is skipped")
        svc = self.services[dep]
        if svc.proc is None:
            return False
        if condition == "service_completed_successfully":
            code = svc.proc.poll()
            if code not in (None, 0):
                raise RuntimeError(f"{dep} exited with {code}:\n{svc.log_tail()}")
            return code == 0
        if condition == "service_healthy":
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{dep} exited with {svc.proc.returncode}:\n{svc.log_tail()}")
            return svc.healthy or self.check_health(dep)
        return True

    def up(self, timeout: float) -> None:
        """Start every service once its dependencies' conditions hold; return once every
        long-running service passes its healthcheck (one-shot services: exited 0)."""
        deadline = time.monotonic() + timeout
        pending = list(self.services)
        while True:
            for name in list(pending):
                if all(self._met(d, c) for d, c in self.services[name].depends_on.items()):
                    self._start(name)
                    pending.remove(name)
            waiting = [n for n, s in self.services.items() if n in pending or not self._settled(n)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{self.services[n].log_tail(2500)}" for n in waiting)
                raise TimeoutError(f"not up after {timeout:.0f}s: {waiting}\n{tails}")
            time.sleep(1.0)

    def _settled(self, name: str) -> bool:
        svc = self.services[name]
        if svc.proc is None:
            return False
        code = svc.proc.poll()
        dependents = [s for s in self.services.values()
                      if s.depends_on.get(name) == "service_completed_successfully"]
        if code is not None:
            if code == 0 and dependents:
                return True
            raise RuntimeError(f"{name} exited with {code}:\n{svc.log_tail()}")
        return svc.healthy or self.check_health(name)

    def down(self) -> dict[str, int | None]:
        """SIGTERM every running service; wait up to its stop_grace_period, then SIGKILL.
        Returns each exit status (None: had to be killed)."""
        running = [s for s in self.services.values() if s.proc is not None and s.proc.poll() is None]
        for svc in running:
            svc.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for svc in running:
            try:
                codes[svc.name] = svc.proc.wait(timeout=svc.stop_grace)
            except subprocess.TimeoutExpired:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()
                codes[svc.name] = None
        return codes

    def kill_all(self) -> None:
        """SIGKILL each service's process group (children a stopped service left behind too)."""
        for svc in self.services.values():
            if svc.proc is None:
                continue
            try:
                os.killpg(svc.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            svc.proc.wait()
