"""`vlm preprocess`, `vlm generate` and `vlm health`: the command-line clients.

Contract (kept stable for users and acceptance checks):

    vlm preprocess --target HOST:PORT (--prompt TEXT | --token-ids 1,2,3 | --chat FILE.json)
                   [--image PATH]... [--video PATH]... [--mm-kwargs JSON] [--json]
    vlm generate   --target HOST:PORT (--prompt ... | --token-ids ... | --chat ...)
                   [--image PATH]... [--video PATH]... [--max-tokens N] [--temperature T]
                   [--top-p P] [--top-k K] [--seed S] [--stop STR]... [--ignore-eos] [--json]
    vlm health     --target HOST:PORT [--service NAME]

`--messages FILE.json` is the same option as `--chat` (its older name). `vlm generate` prints the
text as it streams in, then a summary line on stderr; with `--json` it prints one JSON object at
the end instead. On error: exit status 1, with the gRPC status code name and message on stderr.

Chat messages (FILE.json) are a list of {"role": ..., "content": str | [parts]} where a part is
{"type": "text", "text": ...}, {"type": "image", "path": ...} or {"type": "video", "path": ...}.
Images and videos given with --image/--video go with --prompt/--token-ids, in order per modality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

from vlm import types
from vlm.errors import UpstreamError, VlmError


def _media(path: str, modality: types.Modality) -> types.Media:
    data = Path(path).read_bytes()
    mime, _ = mimetypes.guess_type(path)
    return types.Media(modality, data, mime or "")


def _messages(path: str) -> tuple[types.ChatMessage, ...]:
    raw = json.loads(Path(path).read_text())
    base = Path(path).parent
    out = []
    for m in raw:
        content = m["content"]
        if isinstance(content, str):
            parts = (types.ChatPart(text=content),)
        else:
            parts = []
            for p in content:
                kind = p.get("type")
                if kind == "text":
                    parts.append(types.ChatPart(text=p["text"]))
                elif kind in ("image", "video"):
                    media_path = Path(p["path"])
                    if not media_path.is_absolute():
                        media_path = base / media_path
                    parts.append(types.ChatPart(media=_media(str(media_path), types.Modality(kind))))
                else:
                    raise ValueError(f"unknown content part type {kind!r} in {path}")
            parts = tuple(parts)
        out.append(types.ChatMessage(role=m["role"], content=parts))
    return tuple(out)


def prompt_from_args(args: argparse.Namespace) -> types.PromptInput:
    media = tuple(
        [_media(p, types.Modality.IMAGE) for p in args.image]
        + [_media(p, types.Modality.VIDEO) for p in args.video]
    )
    if args.messages:
        if media:
            raise ValueError("with --chat, put images and videos inside the chat messages file")
        return types.PromptInput(messages=_messages(args.messages))
    if args.token_ids is not None:
        ids = tuple(int(x) for x in args.token_ids.replace(" ", "").split(",") if x)
        return types.PromptInput(token_ids=ids, media=media)
    return types.PromptInput(text=args.prompt, media=media)


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="preprocessor HOST:PORT")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt with the model's placeholder tokens")
    src.add_argument("--token-ids", help="comma-separated prompt token IDs")
    src.add_argument("--chat", "--messages", dest="messages", metavar="FILE",
                     help="chat messages JSON file (--messages is the same option)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--mm-kwargs", default=None, help="processor kwargs as a JSON object")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preprocess", help="preprocess a prompt with media")
    _add_prompt_args(pre)
    gen = sub.add_parser("generate", help="generate through a preprocessor")
    _add_prompt_args(gen)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--ignore-eos", action="store_true")
    health = sub.add_parser("health", help="grpc.health.v1 Check")
    health.add_argument("--target", required=True)
    health.add_argument("--service", default="", help="service name ('' = whole server)")
    return parser


def prompt_to_json(prompt: types.Prompt) -> dict[str, Any]:
    return {
        "token_ids": list(prompt.token_ids),
        "items": [
            {
                "modality": item.modality.value,
                "hash": item.hash,
                "offset": item.placeholder.offset,
                "length": item.placeholder.length,
                "is_embed": list(item.placeholder.is_embed) if item.placeholder.is_embed is not None else None,
                "fields": {
                    name: {"dtype": str(f.data.dtype).removeprefix("torch."), "shape": list(f.data.shape)}
                    for name, f in (item.fields or {}).items()
                },
            }
            for item in prompt.items
        ],
    }


async def _preprocess(args: argparse.Namespace) -> int:
    from vlm.client import PreprocessorClient

    kwargs = json.loads(args.mm_kwargs) if args.mm_kwargs else None
    async with PreprocessorClient(args.target) as client:
        prompt = await asyncio.wait_for(client.preprocess(prompt_from_args(args), kwargs), args.timeout)
    if args.json:
        print(json.dumps(prompt_to_json(prompt)))
        return 0
    print(f"model: {prompt.fingerprint.model_id} ({prompt.fingerprint.model_impl}, {prompt.fingerprint.config_hash[:12]})")
    print(f"tokens: {len(prompt.token_ids)}")
    for i, item in enumerate(prompt.items):
        ph = item.placeholder
        embeds = ph.embed_count()
        fields = ", ".join(
            f"{n}{list(f.data.shape)}:{str(f.data.dtype).removeprefix('torch.')}"
            for n, f in (item.fields or {}).items()
        )
        print(f"  [{i}] {item.modality.value:<5} offset={ph.offset} length={ph.length} "
              f"embeds={embeds} hash={item.hash[:16]} {fields}")
    return 0


async def _generate(args: argparse.Namespace) -> int:
    from vlm.client import PreprocessorClient

    kwargs = json.loads(args.mm_kwargs) if args.mm_kwargs else None
    sampling = types.Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    token_ids: list[int] = []
    text: list[str] = []
    last: types.Chunk | None = None

    async def run() -> None:
        nonlocal last
        async with PreprocessorClient(args.target) as client:
            async for chunk in client.generate(prompt_from_args(args), sampling, kwargs):
                token_ids.extend(chunk.token_ids)
                text.append(chunk.text)
                last = chunk
                if not args.json and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()

    await asyncio.wait_for(run(), args.timeout)
    finish = last.finish_reason.value if last and last.finish_reason else None
    usage = last.usage if last and last.usage else types.Usage(0, 0, 0)
    if args.json:
        print(json.dumps({
            "token_ids": token_ids,
            "text": "".join(text),
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
            },
        }))
    else:
        sys.stdout.write("\n")
        print(f"[finish_reason={finish} prompt_tokens={usage.prompt_tokens} "
              f"completion_tokens={usage.completion_tokens} cached_tokens={usage.cached_tokens}]",
              file=sys.stderr)
    return 0


async def _health(args: argparse.Namespace) -> int:
    from vlm.client import check_health

    status = await check_health(args.target, args.service)
    print(status)
    return 0 if status == "SERVING" else 1


#: command → its coroutine; the parser's subcommand of the same name defines its flags
_HANDLERS = {"preprocess": _preprocess, "generate": _generate, "health": _health}


def _run(command: str, argv: list[str]) -> int:
    """Parse `vlm COMMAND ARGV...` and run it: 0 on success, 1 with `CODE: message` on stderr."""
    args = build_parser().parse_args([command, *argv])
    handler = _HANDLERS[args.command]
    try:
        return asyncio.run(handler(args))
    except UpstreamError as err:
        print(f"{err.code.name}: {err.message}", file=sys.stderr)
        return 1
    except VlmError as err:
        print(f"{err.code.name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, json.JSONDecodeError) as err:
        print(f"INVALID_ARGUMENT: {err}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("DEADLINE_EXCEEDED: timed out", file=sys.stderr)
        return 1


def preprocess_main(argv: list[str]) -> int:
    """`vlm preprocess ARGV...`"""
    return _run("preprocess", argv)


def generate_main(argv: list[str]) -> int:
    """`vlm generate ARGV...`"""
    return _run("generate", argv)


def health_main(argv: list[str]) -> int:
    """`vlm health ARGV...`"""
    return _run("health", argv)
