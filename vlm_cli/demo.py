"""`vlm demo`: both services on this machine, streaming a chat prompt with an image.

By default the model is a tiny random-weight LLaVA built offline (config classes + a
`tokenizers` tokenizer, no download): its text is noise, the point is the plumbing. `--model`
runs the same on a real checkpoint (a local directory, or a hub id where there is network).

Starts `vlm serve-model` and `vlm serve-preprocessor` (with its OpenAI-compatible HTTP port) as
real processes on loopback. Their output goes to log files in the run directory, because vLLM
and torch write pages of start-up notes and warnings; the terminal keeps the demo's own lines.
Once both report SERVING, it preprocesses the prompt, streams two generations (the second sends
the image as its hash only), shows a few `/metrics` lines and stops both with SIGTERM. With
`--keep-running` it prints commands to try against the running services (`vlm generate`, curl,
the `openai` SDK) and stops them on Ctrl-C or SIGTERM instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlm import types
from vlm.client import PreprocessorClient, check_health
from vlm.errors import VlmError

_VLM = [sys.executable, "-m", "vlm_cli.main"]
_QUESTION = "What is in this image?"
#: Exit status when a signal ends the demo before it is done (as a shell reports Ctrl-C).
_INTERRUPTED = 130


@dataclass(frozen=True)
class DemoModel:
    """The checkpoint both services load, and the flags that suit it."""

    path: str
    tiny: bool
    max_model_len: int | None

    def model_flags(self) -> list[str]:
        """`serve-model` flags; the preprocessor adopts dtype and length from the model service.
        The tiny model is float32 and starts faster in eager mode; a real one keeps vLLM's
        defaults (its dtype, CUDA graphs)."""
        flags = ["--dtype", "float32", "--enforce-eager"] if self.tiny else []
        if self.max_model_len is not None:
            flags += ["--max-model-len", str(self.max_model_len)]
        return flags

    def sampling(self, max_tokens: int) -> types.Sampling:
        # Random weights rarely say EOS, but when they do the demo would show nothing.
        return types.Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=self.tiny)


@dataclass(frozen=True)
class Ports:
    model: int
    model_metrics: int
    pre: int
    pre_metrics: int
    http: int

    @classmethod
    def pick(cls) -> Ports:
        """Free loopback ports, distinct: all sockets stay bound until every port is chosen."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(5)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in socks))


@dataclass
class Service:
    """One `vlm serve-*` process, its output in a log file."""

    name: str
    target: str
    log: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, port: int, argv: list[str], log: Path, env: dict[str, str]) -> Service:
        # A session of its own: the terminal's Ctrl-C reaches only the demo, which stops the
        # services with SIGTERM (their graceful path) rather than interrupting them mid-way.
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*_VLM, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        return cls(name, f"127.0.0.1:{port}", log, proc)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {self.name} exited with status {self.proc.returncode}; "
                               f"the end of {self.log}:\n{_tail(self.log)}")

    async def serving(self) -> bool:
        with contextlib.suppress(VlmError):
            return await check_health(self.target, timeout=2) == "SERVING"
        return False


async def _wait_serving(services: list[Service], timeout: float) -> None:
    """Until all report SERVING; a service that exits meanwhile ends the wait with its log."""
    deadline = time.monotonic() + timeout
    waiting = list(services)
    while True:
        for s in services:
            s.check_running()
        waiting = [s for s in waiting if not await s.serving()]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not SERVING after {timeout:.0f}s: "
                               + ", ".join(f"the {s.name} (see {s.log})" for s in waiting))
        await asyncio.sleep(0.5)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(services: list[Service]) -> None:
    """SIGTERM to all at once (they stop in parallel), then wait; kill what hangs."""
    for s in services:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in services:
        try:
            code = s.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            code = s.proc.wait()
        print(f"[demo] {s.name} stopped (exit status {code})")


def _demo_image() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (20, 60, 140))
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 40, 240, 200), fill=(240, 200, 40))
    draw.rectangle((10, 180, 120, 230), fill=(30, 200, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _start_services(model: DemoModel, ports: Ports, run_dir: Path, workers: int) -> list[Service]:
    env = dict(os.environ)
    if model.tiny:  # vLLM on CPU would size the KV cache from the whole NUMA node
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_argv = [
        "serve-model", "--model", model.path, "--port", str(ports.model),
        "--metrics-port", str(ports.model_metrics), *model.model_flags(),
    ]
    pre_argv = [
        "serve-preprocessor", "--model", model.path, "--port", str(ports.pre),
        "--metrics-port", str(ports.pre_metrics), "--http-port", str(ports.http),
        "--workers", str(workers), "--model-target", f"127.0.0.1:{ports.model}",
    ]
    services = [
        Service.start("model service", ports.model, model_argv, run_dir / "model.log", env),
        Service.start("preprocessor", ports.pre, pre_argv, run_dir / "preprocessor.log", env),
    ]
    for s in services:
        print(f"[demo] starting the {s.name} on {s.target}; log: {s.log}")
    return services


async def _show(target: str, chat: types.PromptInput, sampling: types.Sampling) -> None:
    """Preprocess once, then generate twice, printing the text as it streams in."""
    async with PreprocessorClient(target) as client:
        prompt = await client.preprocess(chat)
        for item in prompt.items:
            fields = {n: (tuple(f.data.shape), str(f.data.dtype)) for n, f in (item.fields or {}).items()}
            print(f"[demo] preprocess: {len(prompt.token_ids)} tokens; {item.modality.value} at "
                  f"offset {item.placeholder.offset} length {item.placeholder.length} "
                  f"hash {item.hash[:16]}… fields {fields}")
        for attempt in (1, 2):
            print(f"[demo] generate #{attempt}: ", end="", flush=True)
            last = None
            async for chunk in client.generate(chat, sampling):
                print(chunk.text, end="", flush=True)
                last = chunk
            u = last.usage
            print(f"\n[demo]   finish={last.finish_reason.value} prompt_tokens={u.prompt_tokens} "
                  f"completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}")


def _show_metrics(ports: Ports) -> None:
    wanted = ("vlm_time_to_first_token_seconds_count", "vlm_generation_tokens_total",
              "vlm_feature_store_hits_total", "vlm_preprocess_items_total",
              "vlm_processor_cache_hits_total")
    for name, port in (("model", ports.model_metrics), ("preprocessor", ports.pre_metrics)):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        picked = [line for line in body.splitlines() if line.startswith(wanted)]
        print(f"[demo] {name} /metrics: " + "; ".join(picked))


def _write_examples(run_dir: Path, model: DemoModel, image: bytes, max_tokens: int, http_port: int) -> None:
    """The prompt as files for the commands to try: a `--chat` file, an OpenAI request body, and
    an `openai` SDK script that streams that request."""
    (run_dir / "image.png").write_bytes(image)
    (run_dir / "chat.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "image", "path": "image.png"}, {"type": "text", "text": _QUESTION},
    ]}], indent=1))
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    (run_dir / "openai_request.json").write_text(json.dumps({
        "model": model.path,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": _QUESTION},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }))
    (run_dir / "openai_chat.py").write_text(_openai_script(http_port))


def _openai_script(http_port: int) -> str:
    return f'''"""Streams the chat completion in openai_request.json from `vlm demo`'s preprocessor."""
import json
import pathlib

from openai import OpenAI

request = json.loads((pathlib.Path(__file__).parent / "openai_request.json").read_text())
client = OpenAI(base_url="http://127.0.0.1:{http_port}/v1", api_key="unused")
for chunk in client.chat.completions.create(**request, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
'''


def _print_try_it(run_dir: Path, model: DemoModel, ports: Ports, max_tokens: int) -> None:
    q = shlex.quote
    generate = (f"vlm generate --target 127.0.0.1:{ports.pre} --chat {q(str(run_dir / 'chat.json'))} "
                f"--max-tokens {max_tokens} --temperature 0" + (" --ignore-eos" if model.tiny else ""))
    curl = (f"curl -s http://127.0.0.1:{ports.http}/v1/chat/completions "
            f"-H 'Content-Type: application/json' -d @{q(str(run_dir / 'openai_request.json'))}")
    print("[demo] the services keep running; try (Ctrl-C here stops them):")
    print(f"  {generate}")
    print(f"  {curl}")
    print(f"  {q(sys.executable)} {q(str(run_dir / 'openai_chat.py'))}")


async def _until_signalled() -> None:
    """Wait for SIGINT/SIGTERM, whose handlers cancel the demo's task: here, the normal end."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    asyncio.current_task().uncancel()
    print("\n[demo] stopping the services")


async def _run(args: argparse.Namespace, model: DemoModel, run_dir: Path) -> int:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    image = _demo_image()
    ports = Ports.pick()
    _write_examples(run_dir, model, image, args.max_tokens, ports.http)
    services = _start_services(model, ports, run_dir, args.workers)
    try:
        await _wait_serving(services, args.timeout)
        print("[demo] both services SERVING")
        chat = types.PromptInput(messages=(types.ChatMessage("user", (
            types.ChatPart(media=types.Media(types.Modality.IMAGE, image, "image/png")),
            types.ChatPart(text=_QUESTION),
        )),))
        await _show(f"127.0.0.1:{ports.pre}", chat, model.sampling(args.max_tokens))
        _show_metrics(ports)
        if args.keep_running:
            _print_try_it(run_dir, model, ports, args.max_tokens)
            await _until_signalled()
        return 0
    except asyncio.CancelledError:
        task.uncancel()
        print("\n[demo] interrupted")
        return _INTERRUPTED
    finally:
        _stop(services)
        print(f"[demo] logs kept in {run_dir}")


def _build_tiny(run_dir: Path) -> str:
    """Build the tiny LLaVA, its progress bars and notes going to build.log."""
    from vlm.testing.tiny_models import build_tiny_model

    with (run_dir / "build.log").open("w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        path = build_tiny_model("llava", run_dir / "tiny-llava")
    print(f"[demo] tiny random-weight LLaVA built offline at {path}")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="ID|DIR",
                        help="a real checkpoint: hub id or local directory (default: a tiny "
                             "random-weight LLaVA built offline)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length for the model service (default: 2048 for the tiny "
                             "model, the checkpoint's own otherwise)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where logs, the tiny model and example files go (default: a new "
                             "temporary directory, kept afterwards)")
    parser.add_argument("--keep-running", action="store_true",
                        help="print commands to try, keep serving until Ctrl-C or SIGTERM")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--workers", type=int, default=1, help="preprocessing worker processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="start-up timeout, seconds")
    args = parser.parse_args(argv)
    # Watched live, or read line by line by a script waiting for the commands to try.
    sys.stdout.reconfigure(line_buffering=True)

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="vlm-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] run directory: {run_dir}")
    try:
        if args.model is None:
            model = DemoModel(_build_tiny(run_dir), tiny=True, max_model_len=args.max_model_len or 2048)
        else:
            model = DemoModel(args.model, tiny=False, max_model_len=args.max_model_len)
            print(f"[demo] model: {model.path}")
        return asyncio.run(_run(args, model, run_dir))
    except KeyboardInterrupt:  # before the services start (later, signals end `_run`)
        return _INTERRUPTED
    except (RuntimeError, TimeoutError, OSError) as err:
        print(f"[demo] failed: {err}", file=sys.stderr)
    except VlmError as err:
        print(f"[demo] failed: {err.code.name}: {err.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
