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
from vlm.server import ServerOptions, configure_logging


def build_parser():
    from model_svc.engine import add_engine_cli_args

    parser = add_engine_cli_args()
    parser.prog = "vlm serve-model"
    group = parser.add_argument_group("gRPC server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=50052)
    group.add_argument("--metrics-host", default="127.0.0.1")
    group.add_argument("--metrics-port", type=int, default=9102, help="-1 disables /metrics")
    group.add_argument("--max-message-bytes", type=int, default=256 << 20)
    group.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds")
    return parser


async def serve(args) -> None:
    from model_svc.app import ModelApp
    from model_svc.engine import EngineConfig

    options = ServerOptions(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
    )
    app = await ModelApp.start(EngineConfig.from_cli_args(args), options, ModelMetrics())
    try:
        await app.grpc.serve_until_signal()
    finally:
        await app.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --log-level is vLLM's own flag (also applied to vLLM's loggers).
    configure_logging(str(getattr(args, "log_level", None) or "info").upper())
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
