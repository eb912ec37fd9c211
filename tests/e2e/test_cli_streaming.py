"""Streaming as users see it, against the real llava pipeline: `vlm generate` prints text as it
arrives (the same text as `--json`), `--chat` is `--messages`, and the synchronous client
library streams chunks and cancels the RPC when the caller stops reading. Last, `vlm demo
--keep-running` as a new user runs it (its own two service processes: the slow one)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import png
from vlm import types
from vlm.sync_client import SyncModelClient, SyncPreprocessorClient
from vlm_cli.client import build_parser

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

VLM = [sys.executable, "-m", "vlm_cli.main"]

GREEDY = types.Sampling(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """A chat with an image given by a path relative to the chat file."""
    root = tmp_path_factory.mktemp("chat")
    (root / "cat.png").write_bytes(png(7))
    path = root / "chat.json"
    path.write_text(json.dumps([
        {"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                     {"type": "text", "text": "Describe it."}]},
    ]))
    return path


def _chat(chat_file: Path) -> types.PromptInput:
    image = types.Media(types.Modality.IMAGE, (chat_file.parent / "cat.png").read_bytes(), "image/png")
    return types.PromptInput(messages=(
        types.ChatMessage("user", (types.ChatPart(media=image), types.ChatPart(text="Describe it."))),
    ))


async def _run(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *VLM, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out, err


async def _read_timed(stream: asyncio.StreamReader, *, line: bool) -> tuple[bytes, float]:
    """All of `stream`, and when its first line (`line`) or its first byte arrived."""
    first = await (stream.readline() if line else stream.read(1))
    at = time.monotonic()
    return first + await stream.read(), at


async def test_generate_streams_the_json_modes_text(llava_pipeline, chat_file) -> None:
    """Text mode writes each chunk when it arrives: the text's first bytes come well before the
    summary line that follows the last chunk on stderr (a buffered stdout would only be written
    at exit, after it). What it prints is the `--json` mode's text, for the same greedy request
    given with `--messages`."""
    gen = ["generate", "--target", llava_pipeline.pre_target, "--max-tokens", "200",
           "--temperature", "0", "--ignore-eos"]
    # Block-buffered stdout, as on a user's machine (CI may set PYTHONUNBUFFERED).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = await asyncio.create_subprocess_exec(
        *VLM, *gen, "--chat", str(chat_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    (out, text_at), (err, summary_at) = await asyncio.wait_for(
        asyncio.gather(_read_timed(proc.stdout, line=False), _read_timed(proc.stderr, line=True)), 120
    )
    assert await proc.wait() == 0, err.decode()
    assert re.fullmatch(rb"\[finish_reason=length prompt_tokens=\d+ completion_tokens=200 "
                        rb"cached_tokens=\d+\]\n", err), err
    assert summary_at - text_at > 0.1, "the text arrived with the summary: not streamed"

    rc, json_out, err = await _run(*gen, "--messages", str(chat_file), "--json")
    assert rc == 0, err.decode()
    assert out.decode() == json.loads(json_out)["text"] + "\n"


async def test_chat_is_the_messages_option(llava_pipeline, chat_file) -> None:
    pre = ["preprocess", "--target", llava_pipeline.pre_target, "--json"]
    (rc1, chat_out, err1), (rc2, messages_out, err2) = await asyncio.gather(
        _run(*pre, "--chat", str(chat_file)), _run(*pre, "--messages", str(chat_file))
    )
    assert (rc1, rc2) == (0, 0), (err1, err2)
    assert json.loads(chat_out) == json.loads(messages_out)
    assert len(json.loads(chat_out)["items"]) == 1


async def test_chat_excludes_the_other_prompt_forms() -> None:
    for other in (["--prompt", "hi"], ["--token-ids", "1,2"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["generate", "--target", "x", "--chat", "c.json", *other])
        assert exit_.value.code == 2


async def test_sync_client_matches_the_async_client(llava_pipeline, chat_file) -> None:
    """Blocking calls from a plain thread (as in a script): the same prompt, chunks and model
    info as the asyncio client; the sync model client continues from the preprocessed prompt."""
    chat = _chat(chat_file)

    def script() -> tuple[types.Prompt, list[types.Chunk], types.ModelInfo, list[types.Chunk]]:
        with SyncPreprocessorClient(llava_pipeline.pre_target) as pre:
            prompt = pre.preprocess(chat)
            chunks = list(pre.generate(chat, GREEDY))
            info = pre.model_info()
        with SyncModelClient(llava_pipeline.model_target) as model:
            direct = list(model.generate(prompt, GREEDY))
        return prompt, chunks, info, direct

    prompt, chunks, info, direct = await asyncio.to_thread(script)
    async with llava_pipeline.pre_client() as pre:
        ref_prompt = await pre.preprocess(chat)
        ref_chunks = [c async for c in pre.generate(chat, GREEDY)]
        ref_info = await pre.model_info()
    assert prompt.token_ids == ref_prompt.token_ids
    assert [i.hash for i in prompt.items] == [i.hash for i in ref_prompt.items]
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 5 and tokens == [t for c in ref_chunks for t in c.token_ids]
    assert [t for c in direct for t in c.token_ids] == tokens
    assert chunks[-1].finish_reason is types.FinishReason.LENGTH
    assert info == ref_info


def _aborted(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    found = re.search(r'^vlm_request_success_total\{finished_reason="abort"\} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


def _wait_aborted(metrics_port: int, count: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (seen := _aborted(metrics_port)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


async def test_sync_generate_break_aborts_the_request(llava_pipeline, chat_file) -> None:
    """Leaving the loop after the first chunk of a 900-token generation (seconds of work)
    cancels the RPC: the model service finishes the request as aborted at once (its metric
    counts it when the engine's abort is done)."""
    port = llava_pipeline.model.grpc.metrics_port
    before = await asyncio.to_thread(_aborted, port)
    long = types.Sampling(temperature=0.0, max_tokens=900, ignore_eos=True)

    def script() -> tuple[types.Chunk, float]:
        with SyncPreprocessorClient(llava_pipeline.pre_target) as pre:
            for first in pre.generate(_chat(chat_file), long):
                break
            # The channel is still open: only leaving the loop can have cancelled the RPC.
            return first, _wait_aborted(port, before + 1)

    first, aborted = await asyncio.to_thread(script)
    assert first.finish_reason is None
    assert aborted == before + 1


async def test_demo_keep_running_as_a_new_user_sees_it(tmp_path) -> None:
    """`vlm demo --keep-running`: only the demo's own lines on the terminal (the services' output
    is in the log files it names), then commands that work against the services it started;
    SIGTERM stops both cleanly."""
    proc = await asyncio.create_subprocess_exec(
        *VLM, "demo", "--keep-running", "--run-dir", str(tmp_path), "--max-tokens", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        lines = await asyncio.wait_for(_lines_until_try_it(proc.stdout), 600)
        assert all(line.startswith(("[demo] ", "  ")) for line in lines), lines
        generate, curl, openai_script = (line.strip() for line in lines[-3:])
        logs = re.findall(r"log: (\S+)$", "\n".join(lines), re.M)
        assert [Path(log).name for log in logs] == ["model.log", "preprocessor.log"]
        assert all("listening on" in Path(log).read_text() for log in logs)

        assert generate.startswith("vlm generate --target ")
        rc, out, err = await _run(*shlex.split(generate)[1:])
        assert rc == 0 and out.strip(), err.decode()
        url, body = re.fullmatch(
            r"curl -s (\S+) -H 'Content-Type: application/json' -d @(\S+)", curl
        ).groups()
        answer = await asyncio.to_thread(_post_json, url, Path(body).read_bytes())
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        script = await asyncio.create_subprocess_exec(
            *shlex.split(openai_script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(script.communicate(), 120)
        assert script.returncode == 0, err.decode()

        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode()
        assert err == b""
        assert "model service stopped (exit status 0)" in out.decode()
        assert "preprocessor stopped (exit status 0)" in out.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _lines_until_try_it(stdout: asyncio.StreamReader) -> list[str]:
    """The demo's output up to its last command to try (the openai script)."""
    lines: list[str] = []
    while not (lines and lines[-1].rstrip().endswith("openai_chat.py")):
        line = await stdout.readline()
        assert line, f"the demo ended early: {lines}"
        lines.append(line.decode().rstrip("\n"))
    return lines


def _post_json(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())
