from __future__ import annotations

from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput

from model_svc.output import OutputToChunk
from vlm.types import FinishReason


def out(tokens, text, *, finished=False, finish_reason=None, stop_reason=None, logprobs=None, cached=None):
    comp = CompletionOutput(
        index=0, text=text, token_ids=tokens, cumulative_logprob=None, logprobs=logprobs,
        finish_reason=finish_reason, stop_reason=stop_reason,
    )
    return RequestOutput(
        request_id="x", prompt=None, prompt_token_ids=[1, 2, 3], prompt_logprobs=None,
        outputs=[comp], finished=finished, num_cached_tokens=cached,
    )


def test_deltas_and_final_usage():
    conv = OutputToChunk("r1", prompt_tokens=3)
    a = conv(out([5, 6], "he"))
    assert (a.request_id, a.token_ids, a.text, a.finish_reason, a.usage) == ("r1", (5, 6), "he", None, None)
    b = conv(out([7], "llo", finished=True, finish_reason="stop", stop_reason="!", cached=2))
    assert b.token_ids == (7,) and b.text == "llo"
    assert b.finish_reason is FinishReason.STOP and b.stop_reason == "!"
    assert (b.usage.prompt_tokens, b.usage.completion_tokens, b.usage.cached_tokens) == (3, 3, 2)


def test_finish_reasons():
    for reason, expected in (("length", FinishReason.LENGTH), ("abort", FinishReason.ABORT), ("stop", FinishReason.STOP)):
        c = OutputToChunk("r", prompt_tokens=1)(out([], "", finished=True, finish_reason=reason, stop_reason=None))
        assert c.finish_reason is expected and c.stop_reason is None
    c = OutputToChunk("r", prompt_tokens=1)(out([9], "", finished=True, finish_reason="stop", stop_reason=9))
    assert c.stop_reason == 9


def test_logprobs():
    pos = {5: Logprob(-0.5, 1, "a"), 8: Logprob(-1.5, 2, "b"), 9: Logprob(-2.0, 3, "c")}
    conv = OutputToChunk("r", prompt_tokens=1, top_logprobs=2)
    c = conv(out([5], "a", logprobs=[pos]))
    (lp,) = c.logprobs
    assert (lp.sampled.token_id, lp.sampled.logprob, lp.sampled.rank) == (5, -0.5, 1)
    assert [(t.token_id, t.rank) for t in lp.top] == [(5, 1), (8, 2)]
    # logprobs=0: only the sampled token (here sampled at rank 3).
    c = OutputToChunk("r", prompt_tokens=1, top_logprobs=0)(out([9], "c", logprobs=[pos]))
    assert c.logprobs[0].sampled.rank == 3 and c.logprobs[0].top == ()


def test_empty_chunk_detection():
    conv = OutputToChunk("r", prompt_tokens=1)
    assert OutputToChunk.is_empty(conv(out([], "")))
    assert not OutputToChunk.is_empty(conv(out([4], "")))  # a token whose text is held back
