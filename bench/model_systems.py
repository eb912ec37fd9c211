"""The systems `bench.model_latency` compares, each as real OS processes, and their clients.

* `ProcGroup`: one command in its own session / process group, output to a log file; `stop()`
  sends SIGTERM to the group (and to every descendant seen before, in case one left the group),
  waits, then SIGKILLs whatever is left. `ProcRegistry.stop_all()` runs at exit, on SIGTERM /
  SIGINT and in the driver's `finally`.
* One class per system: `start()` spawns its processes (`started_at` = time of the spawn),
  `wait_ready()` polls its readiness probe, `request(i)` runs one timed, streamed request for
  JPEG number `i` and returns `{"start", "first", "end", "tokens", "prompt_tokens"}` (perf_counter
  seconds, measured in the process that runs the client).

The client calls are kept in small functions (`pair_stream`, `model_stream`, `openai_stream`) so
they are easy to adapt when a client API changes.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import log

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "What is in this picture?"


def raw_prompt(model_dir: Path) -> str:
    """The inproc system's text prompt: the model's chat template rendered for [image, TEXT], so
    that every system feeds the engine the same prompt tokens (the JSON records the counts).
    For the tiny LLaVA: `<bos>USER: <image>What is in this picture?\nASSISTANT:`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timing(start: float, first: float | None, end: float, tokens: int, prompt_tokens: int | None,
           token_ids: list[int] | None = None, text: str | None = None) -> dict[str, Any]:
    """One request. `output` (token IDs / text where the API gives them) is only used for the
    cross-system output check, not stored per request."""
    return {"start": start, "first": first, "end": end, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "output": {"token_ids": token_ids, "text": text}}


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class ProcGroup:
    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_path: Path,
                 pass_fds: Sequence[int] = ()) -> None:
        self.name, self.cmd, self.env, self.log_path = name, list(cmd), env, log_path
        self.pass_fds = tuple(pass_fds)
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self._seen: dict[int, Any] = {}  # pid -> psutil.Process, every descendant ever seen

    def start(self) -> ProcGroup:
        with open(self.log_path, "w") as logf:
            logf.write("$ " + " ".join(self.cmd) + "\n")
            logf.flush()
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO_ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=self.pass_fds,
            )
        REGISTRY.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            rc = self.proc.returncode if self.proc else None
            raise RuntimeError(f"{self.name} exited (code {rc}); last lines of {self.log_path}:\n{tail(self.log_path)}")

    def descendants(self) -> list[Any]:
        """Every live process of this group's tree (remembered, so orphans are found too)."""
        try:
            import psutil

            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                self._seen.setdefault(p.pid, p)
        except Exception:  # noqa: BLE001, S110 - gone, or no psutil
            pass
        return [p for p in self._seen.values() if _running(p)]

    def pause(self) -> None:
        """SIGSTOP every process of the group: a frozen system takes no CPU (no spinning engine,
        no polling thread) while another system is measured."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        procs = self.descendants()
        _signal_group(self.pid, sig)
        for p in procs:
            _signal_proc(p, sig)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        procs = self.descendants()
        self.resume()  # a stopped process acts on SIGTERM only once continued
        if self.proc.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
        for p in procs:
            _signal_proc(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not any(_running(p) for p in procs):
                break
            time.sleep(0.1)
        _signal_group(self.pid, signal.SIGKILL)
        for p in procs:
            _signal_proc(p, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        REGISTRY.discard(self)


def _running(p: Any) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:  # noqa: BLE001
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # our child's own session only (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_proc(p: Any, sig: int) -> None:
    try:
        if p.is_running():  # psutil checks the pid was not reused
            p.send_signal(sig)
    except Exception:  # noqa: BLE001, S110 - already gone
        pass


class ProcRegistry:
    """Every group still running; stopped at exit and on SIGTERM / SIGINT of the driver."""

    def __init__(self) -> None:
        self.groups: list[ProcGroup] = []
        self._installed = False

    def add(self, g: ProcGroup) -> None:
        self.groups.append(g)
        if not self._installed:
            self._installed = True
            atexit.register(self.stop_all)
            for sig in (signal.SIGTERM, signal.SIGINT):
                prev = signal.getsignal(sig)
                signal.signal(sig, lambda s, f, prev=prev: self._on_signal(s, f, prev))

    def discard(self, g: ProcGroup) -> None:
        if g in self.groups:
            self.groups.remove(g)

    def _on_signal(self, sig: int, frame: Any, prev: Any) -> None:
        self.stop_all(grace_s=3.0)
        if callable(prev):
            prev(sig, frame)
        else:
            raise SystemExit(128 + sig)

    def stop_all(self, grace_s: float = 10.0) -> None:
        for g in list(reversed(self.groups)):
            try:
                g.stop(grace_s)
            except Exception as e:  # noqa: BLE001
                log(f"model: stopping {g.name} failed: {e}")


REGISTRY = ProcRegistry()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


async def poll_until(probe, proc_groups: Sequence[ProcGroup], timeout_s: float, what: str,
                     interval_s: float = 0.2) -> float:
    """Await `probe()` (True = ready; exceptions = not yet) until ready; perf_counter at ready."""
    deadline = time.perf_counter() + timeout_s
    last: Any = None
    while True:
        for g in proc_groups:
            g.check_alive()
        try:
            if await probe():
                return time.perf_counter()
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s (last probe: {last!r})")
        await asyncio.sleep(interval_s)


async def grpc_serving(target: str) -> bool:
    from vlm.client import check_health

    return await check_health(target, timeout=2.0) == "SERVING"


def engine_cli_args(engine_kwargs: dict[str, Any]) -> list[str]:
    """AsyncEngineArgs keywords → vLLM CLI flags (as every launcher here parses them)."""
    out = []
    for k, v in engine_kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        else:
            out += [flag, str(v)]
    return out


# ---------------------------------------------------------------------------------------------
# Client calls (kept small: adapt here when a client API changes)
# ---------------------------------------------------------------------------------------------


async def pair_stream(client: Any, jpeg: bytes, max_tokens: int) -> AsyncIterator[Any]:
    """The pair: chat messages with the JPEG, through `PreprocessorClient.generate`."""
    from vlm.types import ChatMessage, ChatPart, Media, Modality, PromptInput, Sampling

    prompt = PromptInput(messages=(ChatMessage(role="user", content=(
        ChatPart(media=Media(Modality.IMAGE, jpeg, "image/jpeg")), ChatPart(text=TEXT))),))
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for chunk in client.generate(prompt, sampling):
        yield chunk


async def pair_preprocess(client: Any, jpeg: bytes) -> Any:
    """The same prompt, preprocessed only (a `vlm.types.Prompt`, fields included)."""
    from vlm.types import ChatMessage, ChatPart, Media, Modality, PromptInput

    prompt = PromptInput(messages=(ChatMessage(role="user", content=(
        ChatPart(media=Media(Modality.IMAGE, jpeg, "image/jpeg")), ChatPart(text=TEXT))),))
    return await client.preprocess(prompt)


async def model_stream(client: Any, prompt: Any, max_tokens: int) -> AsyncIterator[Any]:
    """The model-service hop alone: `ModelClient.generate`, features always sent."""
    from vlm.types import Sampling

    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for chunk in client.generate(prompt, sampling, hash_only=False):
        yield chunk


async def timed_chunks(stream: AsyncIterator[Any]) -> dict[str, Any]:
    """Time a stream of `vlm.types.Chunk`s (first token = first chunk with token IDs)."""
    start = time.perf_counter()
    first, n, ptoks, ids, text = None, 0, None, [], []
    async for chunk in stream:
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        n += len(chunk.token_ids)
        ids += chunk.token_ids
        text.append(chunk.text)
        if chunk.usage is not None:
            ptoks = chunk.usage.prompt_tokens
    return timing(start, first, time.perf_counter(), n, ptoks, ids, "".join(text))


async def openai_request(client: Any, model: str, jpeg: bytes, max_tokens: int) -> dict[str, Any]:
    """vLLM's OpenAI server via the `openai` SDK, as users call it.

    First token = the first SSE chunk: vLLM sends it (the assistant role) in the same iteration
    as the first token's text, once the engine's first output is out. Tokens = the usage chunk's
    `completion_tokens` (`stream_options.include_usage`).
    """
    start = time.perf_counter()
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    first, n, ptoks, text = None, 0, None, []
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            n, ptoks = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return timing(start, first, time.perf_counter(), n, ptoks, None, "".join(text))


# ---------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------


def role_of(p: Any) -> str:
    """A short label for one process of a system (vLLM retitles its processes VLLM::...)."""
    try:
        text = f"{p.name()} {' '.join(p.cmdline())}"
    except Exception:  # noqa: BLE001 - gone
        return "?"
    for needle, label in (
        ("EngineCore", "vLLM engine core"), ("VLLM::Worker", "vLLM worker"), ("VllmWorker", "vLLM worker"),
        ("resource_tracker", "mp resource tracker"), ("multiprocessing.forkserver", "preprocessing worker/forkserver"),
        ("model_svc.main", "model_svc main"), ("preprocessor_svc.main", "preprocessor_svc main"),
        ("openai.api_server", "api_server main"), ("grpc_server", "grpc_server main"),
        ("bench.model_inproc", "inproc main (engine client + benchmark client)"), ("spawn_main", "vLLM worker"),
    ):
        if needle in text:
            return label
    return text[:40]


class CpuMeter:
    """CPU seconds (user + system) per process role of some process groups, plus this process
    (the benchmark client). Read before and after a round, outside its timing."""

    def __init__(self) -> None:
        self._roles: dict[int, str] = {}

    def read(self, groups: Sequence[ProcGroup]) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for g in groups:
            for p in g.descendants():
                try:
                    role = self._roles.get(p.pid) or self._roles.setdefault(p.pid, role_of(p))
                    t = p.cpu_times()
                    out[role] = out.get(role, 0.0) + t.user + t.system
                except psutil.Error:
                    continue
        me = psutil.Process().cpu_times()
        out["benchmark client (driver)"] = me.user + me.system
        return out

    @staticmethod
    def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before.get(k, 0.0) for k in after}


class System:
    name = "?"
    description = ""

    def __init__(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx  # model_dir, images (folder), jpegs (list), engine_kwargs, max_tokens, out_dir, env
        self.groups: list[ProcGroup] = []
        self.startup: dict[str, Any] = {}

    def log_path(self, part: str = "") -> Path:
        return Path(self.ctx["out_dir"]) / f"model_latency.{self.name}{'.' + part if part else ''}.log"

    def start(self) -> None:
        raise NotImplementedError

    async def wait_ready(self, timeout_s: float) -> None:
        raise NotImplementedError

    async def request(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    async def run_round(self, images: list[int]) -> tuple[float, list[dict[str, Any]]]:
        t0 = time.perf_counter()
        reqs = await asyncio.gather(*(self.request(i) for i in images))
        return time.perf_counter() - t0, list(reqs)

    async def close(self) -> None:
        for g in reversed(self.groups):
            await asyncio.to_thread(g.stop)

    def pids(self) -> dict[str, int]:
        return {g.name: g.pid for g in self.groups if g.proc is not None}

    @property
    def cpu_groups(self) -> list[ProcGroup]:
        """The processes whose CPU time a round of this system is charged with."""
        return self.groups


class InprocSystem(System):
    name = "inproc"
    description = "AsyncLLM in one child process, raw image in (the limit)"

    def start(self) -> None:
        c = self.ctx
        self._cmd_r, self._cmd_w = os.pipe()
        self._res_r, self._res_w = os.pipe()
        cmd = [sys.executable, "-m", "bench.model_inproc", "--model-dir", str(c["model_dir"]),
               "--images", str(c["images"]), "--prompt", c["raw_prompt"], "--max-tokens", str(c["max_tokens"]),
               "--engine-kwargs", json.dumps(c["engine_kwargs"]),
               "--cmd-fd", str(self._cmd_r), "--res-fd", str(self._res_w),
               *(["--warm-model-info"] if c.get("warm_model_info") else [])]
        g = ProcGroup(self.name, cmd, c["env"], self.log_path(), pass_fds=(self._cmd_r, self._res_w)).start()
        os.close(self._cmd_r)
        os.close(self._res_w)
        self._cmd = os.fdopen(self._cmd_w, "w", buffering=1)
        self._res = os.fdopen(self._res_r, "r", buffering=1)
        self.groups = [g]

    async def _read(self) -> dict[str, Any]:
        line = await asyncio.to_thread(self._res.readline)
        if not line:
            self.groups[0].check_alive()
            raise RuntimeError(f"inproc: pipe closed; see {self.log_path()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"inproc: {msg['error']}; see {self.log_path()}")
        return msg

    async def wait_ready(self, timeout_s: float) -> None:
        g = self.groups[0]
        msg = await asyncio.wait_for(self._read(), timeout_s)
        ready = time.perf_counter()
        warm = msg.get("warm_model_info_s", 0.0)
        self.startup = {"ready_s": ready - g.started_at - warm, "import_s": msg["import_s"],
                        "engine_s": msg["engine_s"]}
        self.warm_model_info_s = warm

    async def run_round(self, images: list[int]) -> tuple[float, list[dict[str, Any]]]:
        self._cmd.write(json.dumps({"op": "round", "images": images}) + "\n")
        self._cmd.flush()
        msg = await asyncio.wait_for(self._read(), 300)
        return msg["wall_s"], msg["requests"]

    async def request(self, i: int) -> dict[str, Any]:
        return (await self.run_round([i]))[1][0]

    async def close(self) -> None:
        try:
            self._cmd.write(json.dumps({"op": "quit"}) + "\n")
            self._cmd.flush()
            self._cmd.close()
        except (OSError, ValueError, AttributeError):
            pass
        g = self.groups[0] if self.groups else None
        if g is not None:
            try:
                await asyncio.to_thread(g.proc.wait, 20)
            except subprocess.TimeoutExpired:
                pass
        await super().close()
        try:
            self._res.close()
        except (OSError, AttributeError):
            pass


class VllmServeSystem(System):
    name = "vllm_serve"
    description = "vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), openai SDK, stream=True"

    def start(self) -> None:
        c = self.ctx
        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(c["model_dir"]),
               "--host", "127.0.0.1", "--port", str(self.port), *engine_cli_args(c["engine_kwargs"])]
        self.groups = [ProcGroup(self.name, cmd, c["env"], self.log_path()).start()]

    async def wait_ready(self, timeout_s: float) -> None:
        import httpx
        import openai

        g = self.groups[0]
        async with httpx.AsyncClient(timeout=2.0) as http:

            async def probe() -> bool:
                return (await http.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200

            ready = await poll_until(probe, self.groups, timeout_s, "vllm_serve /health")
        self.startup = {"ready_s": ready - g.started_at}
        self.client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="EMPTY",
                                         max_retries=0, timeout=300.0)

    async def request(self, i: int) -> dict[str, Any]:
        return await openai_request(self.client, str(self.ctx["model_dir"]), self.ctx["jpegs"][i],
                                    self.ctx["max_tokens"])

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()
        await super().close()


def preprocessor_cpus_args() -> list[str]:
    """`--cpus` for the pair's preprocessor: the CPU that vLLM's CPU backend leaves to processes
    other than its worker (auto-binding reserves the last allowed CPU), as README advises for a
    preprocessor beside a CPU engine. Unpinned, its threads also land on the worker's core,
    where they wait behind the engine: 2-4x the TTFT at 4 concurrent requests, measured."""
    cpus = sorted(os.sched_getaffinity(0))
    return ["--cpus", str(cpus[-1])] if len(cpus) >= 2 else []


class PairSystem(System):
    name = "pair"
    description = ("model_svc.main + preprocessor_svc.main (1 worker, --cpus: the CPU vLLM reserves) as two "
                   "processes, PreprocessorClient.generate")

    def start(self) -> None:
        c = self.ctx
        self.model_port, self.pre_port = free_port(), free_port()
        self.metrics_ports = {"model_svc": free_port(), "preprocessor_svc": free_port()}
        model_cmd = [sys.executable, "-m", "model_svc.main", "--model", str(c["model_dir"]),
                     "--host", "127.0.0.1", "--port", str(self.model_port),
                     "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_ports["model_svc"]),
                     *engine_cli_args(c["engine_kwargs"])]
        pre_cmd = [sys.executable, "-m", "preprocessor_svc.main", "--model", str(c["model_dir"]),
                   "--host", "127.0.0.1", "--port", str(self.pre_port),
                   "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_ports["preprocessor_svc"]),
                   # One worker (the default on 2 cores), one torch thread (the default): vLLM's CPU
                   # worker holds one core; with 2 preprocessing threads the engine's CPU per
                   # request doubled and token delivery turned bursty.
                   "--workers", "1", "--model-target", f"127.0.0.1:{self.model_port}",
                   *preprocessor_cpus_args(),
                   "--dtype", str(c["engine_kwargs"]["dtype"]),
                   "--max-model-len", str(c["engine_kwargs"]["max_model_len"]),
                   *c.get("preprocessor_args", ())]
        # Started together, as compose does.
        self.groups = [ProcGroup("model_svc", model_cmd, c["env"], self.log_path("model_svc")).start(),
                       ProcGroup("preprocessor_svc", pre_cmd, c["env"], self.log_path("preprocessor_svc")).start()]

    @property
    def model_target(self) -> str:
        return f"127.0.0.1:{self.model_port}"

    @property
    def pre_target(self) -> str:
        return f"127.0.0.1:{self.pre_port}"

    async def wait_ready(self, timeout_s: float) -> None:
        from vlm.client import PreprocessorClient

        m, p = self.groups

        async def one(target: str, g: ProcGroup) -> float:
            t = await poll_until(lambda: grpc_serving(target), self.groups, timeout_s, f"{g.name} health")
            return t - g.started_at

        model_s, pre_s = await asyncio.gather(one(self.model_target, m), one(self.pre_target, p))
        self.startup = {"ready_s": max(model_s, pre_s), "model_svc_serving_s": model_s,
                        "preprocessor_svc_serving_s": pre_s}
        self.client = PreprocessorClient(self.pre_target)

    async def scrape_metrics(self) -> dict[str, str]:
        """Both services' Prometheus text (/metrics), for the record."""
        import httpx

        out = {}
        async with httpx.AsyncClient(timeout=5.0) as http:
            for name, port in self.metrics_ports.items():
                try:
                    out[name] = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                except Exception as e:  # noqa: BLE001
                    out[name] = f"# scrape failed: {e!r}\n"
        return out

    async def request(self, i: int) -> dict[str, Any]:
        return await timed_chunks(pair_stream(self.client, self.ctx["jpegs"][i], self.ctx["max_tokens"]))

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()
        await super().close()


class ModelDirectSystem(System):
    """Not a process of its own: the pair's model service, fed prompts preprocessed beforehand."""

    name = "model_direct"
    description = "the pair's model service alone: ModelClient.generate(prompt, hash_only=False)"

    def __init__(self, ctx: dict[str, Any], pair: PairSystem, prompts: dict[int, Any]) -> None:
        super().__init__(ctx)
        self.pair, self.prompts = pair, prompts

    def start(self) -> None:
        pass

    @property
    def cpu_groups(self) -> list[ProcGroup]:
        return self.pair.groups

    async def wait_ready(self, timeout_s: float) -> None:
        from vlm.client import ModelClient

        self.client = ModelClient(self.pair.model_target)
        self.startup = {}

    async def request(self, i: int) -> dict[str, Any]:
        return await timed_chunks(model_stream(self.client, self.prompts[i], self.ctx["max_tokens"]))

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()


class VllmGrpcSystem(System):
    name = "vllm_grpc"
    description = "vLLM's gRPC server (vllm.entrypoints.launchers.grpc_server, smg-grpc-servicer), same preprocessed prompts"

    def __init__(self, ctx: dict[str, Any], prompts: dict[int, Any]) -> None:
        super().__init__(ctx)
        self.prompts = prompts

    def start(self) -> None:
        c = self.ctx
        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.grpc_server", "--model", str(c["model_dir"]),
               "--host", "127.0.0.1", "--port", str(self.port), *engine_cli_args(c["engine_kwargs"])]
        self.groups = [ProcGroup(self.name, cmd, c["env"], self.log_path()).start()]

    async def wait_ready(self, timeout_s: float) -> None:
        from bench.vllm_grpc_client import VllmGrpcClient

        g = self.groups[0]
        target = f"127.0.0.1:{self.port}"
        ready = await poll_until(lambda: grpc_serving(target), self.groups, timeout_s, "vllm_grpc health")
        self.startup = {"ready_s": ready - g.started_at}
        self.client = VllmGrpcClient(target)

    async def request(self, i: int) -> dict[str, Any]:
        from bench.vllm_grpc_client import timed_request
        from vlm.types import Sampling

        sampling = Sampling(temperature=0.0, max_tokens=self.ctx["max_tokens"], ignore_eos=True)
        return await timed_request(self.client, self.prompts[i], sampling)

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()
        await super().close()
