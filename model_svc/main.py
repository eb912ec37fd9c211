"""`vlm serve-model`: run the model gRPC service on vLLM's AsyncLLM.

    vlm serve-model --model MODEL [--host H] [--port P] [--metrics-port M] [vLLM engine args]

Every vLLM engine argument is accepted as vLLM spells it (--tensor-parallel-size, --dtype,
--max-model-len, --gpu-memory-utilization, --kv-cache-memory-bytes, --enforce-eager,
--model-impl, --limit-mm-per-prompt, ...). Health turns SERVING once the engine is warm.
"""

from __future__ import annotations

import asyncio
import sys

from model_svc.metrics import ModelMetrics
from vlm.process import tune_malloc
from vlm.server import ServerOptions, add_server_args, configure_logging


def build_parser():
    from model_svc.config import add_engine_cli_args

    parser = add_engine_cli_args()
    parser.prog = "vlm serve-model"
    # Requests carry feature tensors (with --max-concurrent-rpcs 256: ≈ 16 GiB at worst).
    add_server_args(parser, port=50052, metrics_port=9102, max_message_bytes=64 << 20)
    return parser


async def serve(args) -> None:
    from model_svc.app import ModelApp
    from model_svc.config import EngineConfig

    options = ServerOptions.from_args(args)
    app = await ModelApp.start(EngineConfig.from_cli_args(args), options, ModelMetrics())
    try:
        await app.grpc.serve_until_signal()
    finally:
        await app.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --log-level is vLLM's own flag (also applied to vLLM's loggers).
    configure_logging(str(getattr(args, "log_level", None) or "info").upper())
    tune_malloc(args.malloc_mmap_threshold)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
