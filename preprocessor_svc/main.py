"""`vlm serve-preprocessor`: run the preprocessor gRPC service.

    vlm serve-preprocessor --model MODEL [--model-impl auto|transformers] [--host H] [--port P]
                           [--metrics-port M] [--workers N] [--max-queue Q]
                           [--model-target HOST:PORT ...] [--http-port P] ...

Loads the model's config, tokenizer and processor only (no weights) in each worker process,
warms every worker up, then reports SERVING. With `--model-target` (repeatable; a DNS name
expands to one replica per address) it is also the gateway: it handshakes with the model
replicas first, adopting their feature dtype and limits, and is SERVING while one of them is.
`--http-port` adds an OpenAI-compatible HTTP front door (`/v1/chat/completions`,
`/v1/completions`, `/v1/models`, `/health`) on the same process and gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from preprocessor_svc.media import MediaLimits
from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import MODEL_IMPLS, ProcessorConfig
from vlm.process import check_cpus, parse_cpu_list, pin_to_cpus, tune_malloc
from vlm.security import ClientSecurity
from vlm.server import ServerOptions, add_server_args, configure_logging

log = logging.getLogger("preprocessor_svc")


def _cpu_list(text: str) -> frozenset[int]:
    try:
        return check_cpus(parse_cpu_list(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm serve-preprocessor", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local checkpoint dir or hub id")
    p.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto",
                   help="vLLM model implementation; must match the model service's")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--dtype", default="auto",
                   help="dtype float features travel in; 'auto' with --model-target: the replicas'")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="preprocessing worker processes (0 = in-process thread)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads per worker process (scale out with --workers)")
    p.add_argument("--worker-depth", type=int, default=PoolConfig.worker_depth,
                   help="requests handed to each worker at once (default 2: its next request "
                        "is already in its pipe when it finishes one; 1: only to an idle worker)")
    p.add_argument("--reply-slot-bytes", type=int, default=PoolConfig.reply_slot_bytes,
                   metavar="BYTES",
                   help="shared memory per request a worker holds, for its reply's tensors "
                        "(default 32 MiB; larger replies and 0 use the pipe)")
    p.add_argument("--cpus", type=_cpu_list, default=None, metavar="LIST",
                   help="run this service and its workers on these CPUs only (taskset syntax, "
                        "e.g. 3 or 2-3). Beside a CPU vLLM engine, give it the CPUs vLLM leaves "
                        "to other processes (by default the last one), not its worker's")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a worker before RESOURCE_EXHAUSTED")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--limit-mm-per-prompt", type=json.loads, default=None,
                   help='max items per modality, e.g. \'{"image": 4, "video": 1}\'')
    p.add_argument("--mm-processor-kwargs", type=json.loads, default=None,
                   help="deployment-wide processor kwargs (JSON)")
    p.add_argument("--processor-cache-bytes", type=int, default=512 << 20,
                   help="vLLM processor cache per worker (processed items by hash); 0 disables")
    p.add_argument("--max-image-bytes", type=int, default=MediaLimits.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=MediaLimits.max_image_pixels)
    p.add_argument("--max-video-bytes", type=int, default=MediaLimits.max_video_bytes)
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds one prompt may take in a worker")
    p.add_argument("--model-target", action="append", default=[], metavar="HOST:PORT",
                   help="model service replica(s) Generate forwards to (repeatable; a DNS name "
                        "expands to every address it resolves to)")
    p.add_argument("--resolve-interval", type=float, default=30.0,
                   help="seconds between DNS re-resolutions of the model targets")
    p.add_argument("--log-level", default="INFO")
    http = p.add_argument_group("OpenAI-compatible HTTP front door")
    http.add_argument("--http-port", type=int, default=None,
                      help="serve the OpenAI API on this port (0 picks one; default: off)")
    http.add_argument("--http-host", default="127.0.0.1")
    http.add_argument("--served-model-name", default=None,
                      help="the model name HTTP clients ask for (default: the --model value)")
    hop = p.add_argument_group("gateway → model security (each flag also reads an environment variable)")
    hop.add_argument("--model-tls", action="store_true",
                     help="TLS to the model replicas with the system roots [implied by the flags below]")
    hop.add_argument("--model-tls-ca", default=None, help="PEM CA of the model replicas [VLM_MODEL_TLS_CA]")
    hop.add_argument("--model-tls-cert", default=None,
                     help="PEM client certificate, for replicas that require mTLS [VLM_MODEL_TLS_CERT]")
    hop.add_argument("--model-tls-key", default=None, help="its PEM key [VLM_MODEL_TLS_KEY]")
    hop.add_argument("--model-auth-token-file", default=None,
                     help="file holding the replicas' bearer token [VLM_MODEL_AUTH_TOKEN holds the token]")
    # Requests carry encoded media (--max-image-bytes, --max-video-bytes fit in one message);
    # Generate streams hold theirs until done (with --max-concurrent-rpcs 256: ≈ 8 GiB at worst).
    add_server_args(p, port=50051, metrics_port=9101, max_message_bytes=32 << 20)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[ProcessorConfig, PoolConfig]:
    processor = ProcessorConfig(
        model=args.model,
        model_impl=args.model_impl,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        media_limits=MediaLimits(
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            max_video_bytes=args.max_video_bytes,
        ),
        cache_bytes=args.processor_cache_bytes,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        revision=args.revision,
        dtype=args.dtype,
        mm_processor_kwargs=args.mm_processor_kwargs,
    )
    pool = PoolConfig(
        workers=args.workers,
        max_queue=args.max_queue,
        torch_threads=args.torch_threads,
        worker_depth=args.worker_depth,
        reply_slot_bytes=args.reply_slot_bytes,
        request_timeout_s=args.request_timeout,
    )
    return processor, pool


async def serve(args: argparse.Namespace) -> None:
    from preprocessor_svc.app import PreprocessorApp

    options = ServerOptions.from_args(args)
    processor, pool = config_from_args(args)
    app = await PreprocessorApp.start(
        processor, pool, options, PreprocessorMetrics(),
        model_targets=tuple(args.model_target), resolve_interval_s=args.resolve_interval,
        model_security=ClientSecurity.from_files(
            args.model_tls_ca, args.model_tls_cert, args.model_tls_key, args.model_auth_token_file,
            env_prefix="VLM_MODEL", tls=args.model_tls,
        ),
        http_port=args.http_port, http_host=args.http_host,
        served_model_name=args.served_model_name,
    )
    try:
        await app.grpc.serve_until_signal()
    finally:
        await app.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    tune_malloc(args.malloc_mmap_threshold)  # before the workers start: they inherit it
    if args.cpus is not None:
        pin_to_cpus(args.cpus)  # before the workers start: they inherit it
        log.info("running on CPUs %s", ",".join(map(str, sorted(args.cpus))))
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
