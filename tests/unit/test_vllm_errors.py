"""The one translation table of vLLM / HF / jinja exceptions (`vlm.vllm_errors`)."""

from __future__ import annotations

import jinja2
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from vlm import vllm_errors
from vlm.errors import InvalidArgument, PromptTooLong, ResourceExhausted, Unavailable

PROCESSING = vllm_errors.processing("prompt.text", "multimodal processing")


def test_sampling_errors_name_the_parameter():
    e = vllm_errors.translate(VLLMValidationError("bad", parameter="top_p"), vllm_errors.SAMPLING)
    assert type(e) is InvalidArgument and e.field == "sampling.top_p" and e.message == "bad"
    e = vllm_errors.translate(ValueError("temperature must be non-negative, got -1"), vllm_errors.SAMPLING)
    assert e.field == "sampling.temperature"
    e = vllm_errors.translate(ValueError("something else"), vllm_errors.SAMPLING)
    assert e.field == "sampling"


def test_processing_errors_name_the_prompt():
    e = vllm_errors.translate(VLLMValidationError("too long", parameter="input_tokens"), PROCESSING)
    assert type(e) is PromptTooLong and e.field == "prompt.text"
    e = vllm_errors.translate(KeyError("x"), PROCESSING)
    assert type(e) is InvalidArgument and e.message.startswith("multimodal processing failed")
    e = vllm_errors.translate(RuntimeError("Failed to apply prompt placeholders"), PROCESSING)
    assert type(e) is InvalidArgument and e.field == "prompt.text"
    e = vllm_errors.translate(jinja2.exceptions.TemplateSyntaxError("oops", 1), PROCESSING)
    assert type(e) is InvalidArgument and e.message.startswith("chat template failed")


def test_generation_errors():
    assert type(vllm_errors.translate(EngineDeadError(), vllm_errors.GENERATION)) is Unavailable
    e = vllm_errors.translate(GracefulHTTPError("busy", 503), vllm_errors.GENERATION)
    assert type(e) is ResourceExhausted
    # A plain ValueError inside the engine is a server fault, not the client's.
    assert vllm_errors.translate(ValueError("bug"), vllm_errors.GENERATION) is None
    assert vllm_errors.translate(RuntimeError("Failed to apply prompt placeholders"), vllm_errors.GENERATION) is None


def test_unknown_errors_are_not_translated():
    assert vllm_errors.translate(RuntimeError("boom"), PROCESSING) is None
    err = InvalidArgument("x", field="f")
    assert vllm_errors.translate(err, PROCESSING) is err
