"""`vlm` command-line entry point: one subcommand per job, each implemented in its own module.

Subcommand modules are imported only when chosen, so `vlm health` does not pay for importing
vLLM and torch.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand → (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve-preprocessor": ("preprocessor_svc.main", "run the preprocessor gRPC service (CPU)"),
    "serve-model": ("model_svc.main", "run the model gRPC service (vLLM engine)"),
    "preprocess": ("vlm.client_cli", "preprocess a prompt with media through a preprocessor"),
    "generate": ("vlm.client_cli", "generate end to end through a preprocessor"),
    "health": ("vlm.client_cli", "check a service's grpc.health.v1 status"),
    "demo": ("vlm.demo", "build a tiny model offline and run both services on it"),
    "bench": ("bench.run", "run the benchmarks (JSON + markdown output)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
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
    module = importlib.import_module(COMMANDS[name][0])
    if module.__name__ == "vlm.client_cli":
        return int(module.main([name, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
