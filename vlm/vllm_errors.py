"""vLLM (and HF processor) exceptions → `vlm.errors`, in one table for both services.

Each place that calls into vLLM names its `Stage` — what it was doing and which request field a
client error belongs to — and `translate(exc, stage)` walks `_RULES` in order. The first rule
whose exception type and condition match builds the `VlmError`; no match returns None, and the
caller treats the exception as a server fault (the edge maps it to INTERNAL).

    try:
        params = SamplingParams(**kwargs)
    except Exception as e:
        raise (translate(e, SAMPLING) or Internal(...)) from e
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache

from vlm.errors import InvalidArgument, PromptTooLong, ResourceExhausted, Unavailable, VlmError
from vlm.types import Sampling


@dataclass(frozen=True)
class Stage:
    """Where vLLM was called: `name` for messages, `field` for the request field at fault."""

    name: str
    field: str | None = None
    #: Plain Python errors (ValueError, KeyError, ...) raised here come from the request's
    #: content (the processor or SamplingParams rejecting it), not from a server bug.
    input_errors: bool = False
    #: The parameter vLLM names is itself the request field (an OpenAI request body's).
    parameter_is_field: bool = False


SAMPLING = Stage("sampling", "sampling", input_errors=True)
GENERATION = Stage("generation")
#: Building vLLM's OpenAI request models from an HTTP body (its validators raise too).
OPENAI_REQUEST = Stage("request", None, input_errors=True, parameter_is_field=True)


def processing(prompt_field: str, name: str) -> Stage:
    return Stage(name, prompt_field, input_errors=True)


_SAMPLING_FIELDS = frozenset(f.name for f in fields(Sampling))
_LEADING_NAME = re.compile(r"^\s*([a-z_]+)\b")
_LENGTH_PARAMETERS = ("input_tokens", "input_text")


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else str(e)
    return text.strip()[:500] or type(e).__name__


def _field(e: BaseException, stage: Stage) -> str | None:
    """A sampling parameter named by vLLM (`parameter`, or at the sampling stage the message's
    first word) is `sampling.<name>`; anything else is the stage's field."""
    name = getattr(e, "parameter", None)
    if stage.parameter_is_field:
        return name or stage.field
    if not name and stage is SAMPLING:
        m = _LEADING_NAME.match(str(e))
        name = m.group(1) if m else None
    if name in _SAMPLING_FIELDS:
        return f"sampling.{name}"
    return "sampling" if stage is SAMPLING else stage.field


def _invalid(e: BaseException, stage: Stage) -> VlmError:
    text = _message(e)
    if stage is not SAMPLING and stage is not OPENAI_REQUEST:
        text = f"{stage.name} failed: {text}"
    return InvalidArgument(text, field=_field(e, stage))


@dataclass(frozen=True)
class _Rule:
    #: "module:Class" (imported lazily: vLLM is slow to import) or a builtin exception type.
    types: tuple[str | type[BaseException], ...]
    make: Callable[[BaseException, Stage], VlmError]
    when: Callable[[BaseException, Stage], bool] = lambda e, s: True


_RULES: tuple[_Rule, ...] = (
    _Rule(("vllm.v1.engine.exceptions:EngineDeadError",),
          lambda e, s: Unavailable("the engine died; the service must be restarted")),
    _Rule(("vllm.exceptions:VLLMValidationError",),
          lambda e, s: PromptTooLong(_message(e), field=s.field),
          when=lambda e, s: getattr(e, "parameter", None) in _LENGTH_PARAMETERS),
    _Rule(("vllm.exceptions:VLLMClientError",), _invalid),
    _Rule(("vllm.exceptions:GracefulHTTPError",),
          lambda e, s: ResourceExhausted(_message(e))),
    _Rule((ValueError, TypeError, KeyError, IndexError, AssertionError), _invalid,
          when=lambda e, s: s.input_errors),
    # vLLM's processor could not place the items' placeholders in this prompt (e.g. a
    # placeholder glued to neighbouring text that tokenizes differently): a prompt problem.
    _Rule((RuntimeError,), _invalid,
          when=lambda e, s: s.input_errors and "prompt placeholders" in str(e)),
    _Rule(("jinja2.exceptions:TemplateError",),
          lambda e, s: InvalidArgument(f"chat template failed: {_message(e)}", field=s.field),
          when=lambda e, s: s.input_errors),
)


@cache
def _resolve(spec: str | type[BaseException]) -> type[BaseException] | None:
    if isinstance(spec, type):
        return spec
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def translate(e: BaseException, stage: Stage) -> VlmError | None:
    """The `VlmError` for a third-party exception raised at `stage`; None if it is no known
    client or engine-state error. A `VlmError` is returned as it is."""
    if isinstance(e, VlmError):
        return e
    for rule in _RULES:
        types = tuple(t for t in map(_resolve, rule.types) if t is not None)
        if types and isinstance(e, types) and rule.when(e, stage):
            return rule.make(e, stage)
    return None
