"""The gateway: preprocess a prompt, pick a model replica, relay the stream.

One `Gateway` serves both front doors, the gRPC `Generate` (raw bytes relayed, nothing parsed
per token) and the OpenAI HTTP API (chunks parsed once, here).

Routing (`preprocessor_svc.routing`): prompts with media by rendezvous hashing on the first
item's content hash, text-only prompts to the least-loaded replica. Each replica's
`ModelClient` remembers what it sent that replica, so repeated items go hash-only, and a
MISSING_FEATURES answer resends just those items once.

Failover: a replica that fails with UNAVAILABLE before the first token is marked down and the
request is retried once on the next replica in the routing order. After the first token the
error passes through (the client has output it cannot take back). With no serving replica, the
request fails with UNAVAILABLE at once.

The client's deadline travels to the model service as the remaining time; a client cancel
closes the relay, which cancels the upstream call, which aborts the engine request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import PooledResult, Preprocessor
from preprocessor_svc.replicas import Replica, ReplicaSet
from preprocessor_svc.routing import least_loaded_order, rendezvous_order
from vlm import convert, types
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.errors import DeadlineExceeded, FailedPrecondition, Unavailable, UpstreamError
from vlm.model.v1 import model_pb2

log = logging.getLogger(__name__)


def _address(r: Replica) -> str:
    return r.address


class Gateway:
    def __init__(
        self,
        preprocessor: Preprocessor,
        metrics: PreprocessorMetrics,
        replicas: ReplicaSet | None = None,
    ) -> None:
        self.preprocessor = preprocessor
        self.replicas = replicas
        self._metrics = metrics

    def model_info(self) -> types.ModelInfo:
        return self.preprocessor.model_info()

    @property
    def serving(self) -> bool:
        """Whether a request that needs a model service can be served now."""
        return self.replicas is not None and bool(self.replicas.serving())

    async def preprocess(
        self, prompt: types.PromptInput, processor_kwargs: Mapping[str, Any] | None = None
    ) -> PooledResult:
        result = await self.preprocessor.preprocess_detailed(prompt, processor_kwargs)
        self._metrics.record(result)
        return result

    async def generate_raw(
        self,
        prompt: types.PromptInput,
        sampling: gen_pb.SamplingParams,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Preprocess, route, and stream serialized `vlm.model.v1.GenerateResponse`s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._replica_set()  # fail before preprocessing when no model service is configured
        result = await self.preprocess(prompt, processor_kwargs)
        async for raw in self.relay(
            result.prompt, sampling, request_id=request_id or uuid.uuid4().hex, deadline=deadline
        ):
            yield raw

    async def generate(
        self,
        prompt: types.PromptInput,
        sampling: types.Sampling,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[types.Chunk]:
        """`generate_raw`, parsed into chunks."""
        stream = self.generate_raw(
            prompt, convert.sampling_to_pb(sampling), processor_kwargs,
            request_id=request_id, timeout=timeout,
        )
        try:
            async for raw in stream:
                yield convert.chunk_from_pb(model_pb2.GenerateResponse.FromString(raw).chunk)
        finally:
            await stream.aclose()

    def _replica_set(self) -> ReplicaSet:
        if self.replicas is None:
            raise FailedPrecondition(
                "this preprocessor has no model service configured (--model-target)"
            )
        return self.replicas

    def route(self, prompt: convert.EncodedPrompt, request_id: str) -> list[Replica]:
        """Serving replicas, best first."""
        serving = self._replica_set().serving()
        if prompt.hashes:
            return rendezvous_order(prompt.hashes[0], serving, _address)
        return least_loaded_order(request_id, serving, lambda r: r.in_flight, _address)

    async def relay(
        self,
        prompt: convert.EncodedPrompt,
        sampling: gen_pb.SamplingParams,
        *,
        request_id: str,
        deadline: float | None = None,
    ) -> AsyncIterator[bytes]:
        order = self.route(prompt, request_id)
        if not order:
            raise Unavailable(self._why_none_serving())
        for attempt, replica in enumerate(order[:2]):
            last = attempt == 1 or len(order) == 1
            started = False
            replica.in_flight += 1
            replica.counters.requests += 1
            if prompt.hashes and replica.client.has_sent(prompt.hashes[0]):
                replica.counters.affinity_hits += 1
            resent_before = replica.client.resent_items
            try:
                async for raw in replica.client.generate_raw(
                    prompt, sampling, request_id=request_id, timeout=_remaining(deadline)
                ):
                    started = True
                    yield raw
                return
            except UpstreamError as e:
                if started or e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                replica.suspect(f"request failed before its first token: {e.message}")
                if last:
                    raise
                replica.counters.failovers += 1
                log.warning("replica %s failed before the first token (%s); retrying on %s",
                            replica.address, e.message, order[1].address)
            finally:
                replica.in_flight -= 1
                replica.counters.resends += replica.client.resent_items - resent_before

    def _why_none_serving(self) -> str:
        statuses = self._replica_set().statuses()
        if not statuses:
            return "no model replica: the model targets resolve to no address"
        parts = "; ".join(f"{s.address}: {s.state.value} ({s.reason})" for s in statuses)
        return f"no model replica is serving: {parts}"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before it reached a model replica")
    return left
