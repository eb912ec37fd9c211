"""`vlm` command-line entry point: one subcommand per job, each an explicit function.

Every command has the same contract, `(argv) -> exit status`, where `argv` is what follows the
command name. Each function imports what it runs only when called, so `vlm health` does not pay
for importing vLLM and torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    run: Callable[[list[str]], int]
    help: str


def serve_preprocessor(argv: list[str]) -> int:
    from preprocessor_svc.main import main

    return main(argv)


def serve_model(argv: list[str]) -> int:
    from model_svc.main import main

    return main(argv)


def preprocess(argv: list[str]) -> int:
    from vlm_cli.client import preprocess_main

    return preprocess_main(argv)


def generate(argv: list[str]) -> int:
    from vlm_cli.client import generate_main

    return generate_main(argv)


def health(argv: list[str]) -> int:
    from vlm_cli.client import health_main

    return health_main(argv)


def demo(argv: list[str]) -> int:
    from vlm_cli.demo import main

    return main(argv)


def bench(argv: list[str]) -> int:
    from bench.run import main

    return main(argv)


#: subcommand → (its `(argv) -> int` function, one-line help)
COMMANDS: dict[str, Command] = {
    "serve-preprocessor": Command(serve_preprocessor, "run the preprocessor gRPC service (CPU)"),
    "serve-model": Command(serve_model, "run the model gRPC service (vLLM engine)"),
    "preprocess": Command(preprocess, "preprocess a prompt with media through a preprocessor"),
    "generate": Command(generate, "generate end to end through a preprocessor"),
    "health": Command(health, "check a service's grpc.health.v1 status"),
    "demo": Command(demo, "run both services (a tiny offline model, or --model) and stream a generation"),
    "bench": Command(bench, "run the benchmarks (JSON + markdown output)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `vlm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(COMMANDS[name].run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
