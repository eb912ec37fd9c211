"""vLLM `RequestOutput` → `vlm.types.Chunk`: `OutputToChunk`, one instance per request.

The engine runs every request with `RequestOutputKind.DELTA`, so each `RequestOutput` carries
only what is new since the previous one (vLLM merges deltas if the consumer falls behind):

* `token_ids` — the new token IDs;
* `text` — the new text from vLLM's own incremental detokenizer. It holds back text that may
  still become a stop string, truncates at a stop string (excluded from the text, as vLLM does
  by default) and only releases complete characters as the byte-level tokens arrive (a token
  that can only be decoded together with the next one yields "" now and the character later);
* `logprobs` — per new token: the sampled token's logprob and rank, plus the top-k entries
  (rank <= k, ordered by rank) when `Sampling.logprobs = k > 0`;
* on the final output (`finished`): `finish_reason` (stop / length / abort), `stop_reason`
  (the stop string or stop token ID that matched; None for EOS, as in vLLM) and
  `Usage(prompt_tokens, completion_tokens, cached_tokens)`, where cached_tokens is vLLM's
  `num_cached_tokens` (prompt tokens served from the prefix cache).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.types import Chunk, FinishReason, PositionLogprobs, TokenLogprob, Usage

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
}


class OutputToChunk:
    def __init__(self, request_id: str, *, prompt_tokens: int, top_logprobs: int | None = None) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.top_logprobs = top_logprobs or 0
        self.completion_tokens = 0

    def __call__(self, out: Any) -> Chunk:
        completion = out.outputs[0]
        token_ids = tuple(int(t) for t in completion.token_ids)
        self.completion_tokens += len(token_ids)
        logprobs: tuple[PositionLogprobs, ...] = ()
        if completion.logprobs:
            logprobs = tuple(
                self._position(tid, pos) for tid, pos in zip(token_ids, completion.logprobs, strict=False)
            )
        finish_reason = None
        stop_reason = None
        usage = None
        if out.finished:
            finish_reason = _FINISH.get(completion.finish_reason or "abort", FinishReason.ABORT)
            stop_reason = completion.stop_reason
            if isinstance(stop_reason, bool) or not isinstance(stop_reason, (str, int)):
                stop_reason = None
            usage = Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=int(out.num_cached_tokens or 0),
            )
        return Chunk(
            request_id=self.request_id,
            token_ids=token_ids,
            text=completion.text or "",
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            usage=usage,
        )

    def _position(self, token_id: int, pos: Mapping[int, Any] | None) -> PositionLogprobs:
        if not pos:
            return PositionLogprobs(sampled=TokenLogprob(token_id, float("nan"), 0))
        lp = pos.get(token_id)
        sampled = TokenLogprob(
            token_id,
            float(lp.logprob) if lp is not None else float("nan"),
            int(lp.rank) if lp is not None and lp.rank is not None else 0,
        )
        top: tuple[TokenLogprob, ...] = ()
        if self.top_logprobs > 0:
            ranked = sorted(
                (
                    TokenLogprob(int(t), float(v.logprob), int(v.rank))
                    for t, v in pos.items()
                    if v.rank is not None and v.rank <= self.top_logprobs
                ),
                key=lambda x: x.rank,
            )
            top = tuple(ranked)
        return PositionLogprobs(sampled=sampled, top=top)

    @staticmethod
    def is_empty(chunk: Chunk) -> bool:
        return not chunk.token_ids and not chunk.text and chunk.finish_reason is None
