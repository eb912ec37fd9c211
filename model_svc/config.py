"""The model service's configuration: vLLM's engine arguments, this service's limits, its flags.

`add_engine_cli_args(parser)` adds vLLM's usual engine flags (`AsyncEngineArgs.add_cli_args`:
tensor-parallel size, dtype, max model len, KV-cache bytes / GPU memory utilisation,
enforce-eager, model_impl, --limit-mm-per-prompt, ...) plus this service's, and
`EngineConfig.from_cli_args(args)` builds the config from the parsed namespace. One default
differs from vLLM: `mm_processor_cache_gb=0` — the model service always hands the engine full
features (hash-only items are resolved here), so vLLM's engine-side processor cache would only
hold a second copy of them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_svc.stats import MetricsHook

DEFAULT_FEATURE_STORE_BYTES = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Service limits on top of the model's own (vLLM's --limit-mm-per-prompt etc.)."""

    #: Bytes of feature tensors sent in one prompt (None: unlimited).
    max_feature_bytes_per_prompt: int | None = None
    #: Enforce the dims derived as fixed at start-up (disable if a processor is misjudged).
    check_fixed_shapes: bool = True
    #: Embedding positions one item may have: the engine's encoder-cache budget (set by the
    #: engine at start-up; None: unchecked).
    max_embeds_per_item: int | None = None
    #: Media size a stand-in may be built for, in pixels x frames (the reference layout check:
    #: a size the fields claim beyond this is refused). The preprocessor's own image limit is
    #: 40 MP and its frame limit 8.3 MP.
    max_reference_pixels: int = 40_000_000


@dataclass
class EngineConfig:
    engine_args: Any  # vllm.engine.arg_utils.AsyncEngineArgs
    feature_store_bytes: int = DEFAULT_FEATURE_STORE_BYTES
    limits: Limits = field(default_factory=Limits)
    metrics: MetricsHook | None = None
    warmup: bool = True

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        from vllm.engine.arg_utils import AsyncEngineArgs

        engine_args = AsyncEngineArgs.from_cli_args(args)
        limits = Limits(
            max_feature_bytes_per_prompt=args.max_feature_bytes_per_prompt,
            check_fixed_shapes=not args.no_strict_field_shapes,
        )
        kwargs: dict[str, Any] = dict(
            engine_args=engine_args, feature_store_bytes=args.feature_store_bytes, limits=limits
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def add_engine_cli_args(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """vLLM's engine flags plus this service's.

    Without a parser, a vLLM `FlexibleArgumentParser` (which understands vLLM's JSON-valued and
    dotted flags) is created.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if parser is None:
        parser = FlexibleArgumentParser(description="vLM model service engine")
    parser = AsyncEngineArgs.add_cli_args(parser)
    group = parser.add_argument_group("model service")
    group.add_argument(
        "--feature-store-bytes", type=int, default=DEFAULT_FEATURE_STORE_BYTES,
        help="Bytes of item features kept for hash-only items (LRU); 0 disables.",
    )
    group.add_argument(
        "--max-feature-bytes-per-prompt", type=int, default=None,
        help="Refuse prompts whose feature tensors exceed this many bytes.",
    )
    group.add_argument(
        "--no-strict-field-shapes", action="store_true",
        help="Do not enforce the feature dimensions found fixed at start-up.",
    )
    parser.set_defaults(mm_processor_cache_gb=0)
    return parser
