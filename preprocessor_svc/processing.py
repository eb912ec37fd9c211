"""The preprocessor's domain core: prompts plus media in, vLLM-ready `vlm.types.Prompt` out.

All multimodal work is vLLM's own: a renderer built from the model's vLLM config
(`vllm.renderers.registry.renderer_from_config`) tokenizes text, applies the chat template,
runs the model's multimodal processor (HF processor + vLLM's placeholder expansion), hashes
items with vLLM's hasher and caches processed items in vLLM's processor cache. Only the
configuration, tokenizer and processor files are loaded, never the weights.

What this module adds around the renderer:

* the model profile (`vlm.vllm_profile.build_profile`, the same derivation the model service
  runs): fingerprint, placeholder tokens and limits behind every check below;
* media decoding under limits (`preprocessor_svc.media`), with errors naming request fields;
* the per-request processor-kwargs allow-list (`preprocessor_svc.kwargs`);
* checks vLLM does not do: a non-empty prompt text, chat roles from `CHAT_ROLES`, text that is
  valid Unicode, placeholder count vs. media count, items per modality, prompt length after
  expansion;
* conversion of vLLM's `MultiModalInput` into `vlm.types.Prompt` (items in prompt order, each
  with its own tensors and field layout) plus metrics for the servicer.

`Processor` is synchronous and single-threaded; `preprocessor_svc.pool.Preprocessor` runs one per
worker process (which encodes the result to its wire form there) and exposes the async facade. Importing this module does not import vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preprocessor_svc.kwargs import PROCESSOR_KWARGS, ProcessorKwargs
from preprocessor_svc.media import MediaDecoder, MediaLimits, media_with_paths
from vlm import vllm_errors
from vlm.errors import Internal, InvalidArgument, LimitExceeded, PromptTooLong, VlmError
from vlm.digest import item_digest
from vlm.types import Item, Media, Modality, Prompt, PromptInput
from vlm.vllm_layout import ReferenceCache, size_of
from vlm.vllm_mm import items_from_engine_input

logger = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20

MODEL_IMPLS = ("auto", "transformers")

# ---------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessorConfig:
    """Everything a `Processor` (one per worker process) is built from."""

    #: Local checkpoint directory or hub id (the hub id needs a populated HF cache offline).
    model: str
    #: vLLM's model implementation: "auto" (native classes) or "transformers" (vLLM's
    #: Transformers backend, whose item field layouts differ).
    model_impl: str = "auto"
    #: None: the model's own context length.
    max_model_len: int | None = None
    #: Max items per modality per prompt (vLLM's limit_mm_per_prompt); None: vLLM's default.
    limit_mm_per_prompt: Mapping[str, int] | None = None
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    #: vLLM processor cache (processed items by hash), in bytes, per worker; 0 disables it.
    cache_bytes: int = 512 * MiB
    trust_remote_code: bool = False
    tokenizer: str | None = None
    revision: str | None = None
    #: vLLM's dtype ("auto", "bfloat16", ...). Float pixel values come out in this dtype; it is
    #: part of the fingerprint, so it must resolve to the model service's dtype.
    dtype: str = "auto"
    #: Deployment-wide processor kwargs (vLLM's --mm-processor-kwargs).
    mm_processor_kwargs: Mapping[str, Any] | None = None
    #: Deployment-wide media loader kwargs per modality (vLLM's --media-io-kwargs).
    media_io_kwargs: Mapping[str, Mapping[str, Any]] | None = None
    #: Subset of PROCESSOR_KWARGS offered to requests; None: all that apply to the model.
    allowed_processor_kwargs: frozenset[str] | None = None
    #: Process one dummy image at start-up.
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, not {self.model_impl!r}")
        if self.cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        unknown = set(self.allowed_processor_kwargs or ()) - set(PROCESSOR_KWARGS)
        if unknown:
            raise ValueError(f"allowed_processor_kwargs has unknown names: {sorted(unknown)}")


@dataclass(frozen=True)
class ModalityMetrics:
    items: int = 0
    #: Encoded media bytes received.
    media_bytes: int = 0
    #: Time spent decoding this modality's media (Pillow / video decoding).
    decode_seconds: float = 0.0
    #: Bytes of the item tensors produced.
    feature_bytes: int = 0


@dataclass(frozen=True)
class PreprocessMetrics:
    """Numbers for the servicer's Prometheus metrics, one request."""

    #: "text" | "token_ids" | "messages"
    input_kind: str
    #: Expanded prompt length.
    prompt_tokens: int
    modalities: Mapping[str, ModalityMetrics]
    #: vLLM renderer time: tokenization / chat template and multimodal processing (all
    #: modalities together; vLLM processes them in one call).
    process_seconds: float
    #: Everything inside the worker (decode + process + conversion).
    total_seconds: float
    #: vLLM processor-cache lookups that hit / missed in this request.
    cache_hits: int = 0
    cache_misses: int = 0
    #: Bytes held by this worker's processor cache after the request.
    cache_bytes: int = 0


@dataclass(frozen=True)
class PreprocessResult:
    prompt: Prompt
    metrics: PreprocessMetrics


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------


_INPUT_FIELDS = {"text": "prompt.text", "token_ids": "prompt.token_ids", "messages": "prompt.messages"}

#: Chat roles accepted: OpenAI's (its deprecated "function" aside), which vLLM's chat parser and
#: the usual chat templates know. vLLM itself renders any role string it is given (a template
#: then answers a "wizard" turn as it would a user's), so an unknown role is refused here:
#: INVALID_ARGUMENT naming prompt.messages[i].role.
CHAT_ROLES: frozenset[str] = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class _MediaRef:
    media: Media
    #: Request path of the Media message: "media[2]" or "prompt.messages[0].content[1].media".
    path: str


class Processor:
    """vLLM's renderer for one model, plus the checks and conversions around it. Not thread-safe."""

    def __init__(self, config: ProcessorConfig) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.renderers.registry import renderer_from_config

        from vlm.vllm_profile import build_profile

        t0 = time.perf_counter()
        self.config = config
        engine_args = EngineArgs(**_engine_kwargs(config))
        self.vllm_config = engine_args.create_engine_config()
        self.model_config = mc = self.vllm_config.model_config
        if mc.is_encoder_decoder:
            raise ValueError(f"{config.model}: encoder-decoder models are not supported")
        self.renderer = renderer_from_config(self.vllm_config)
        self.tokenizer = self.renderer.get_tokenizer()
        self.mm_processor = self.renderer.mm_processor  # None for a text-only model
        # The renderer's default processor cache on P0 (lru) mirrors an engine-side cache and
        # returns items *without data* on a hit. Its "processor-only" cache (the one the
        # renderer uses for `skip_mm_cache=True`) keeps the full items: use that one.
        self._mm_cache = getattr(self.renderer, "_mm_processor_only_cache", None)
        self.max_model_len: int = mc.max_model_len
        # The same derivation the model service runs (fingerprint, placeholders, limits, EOS).
        self.profile, _ = build_profile(
            self.vllm_config, self.renderer,
            model=config.model, model_impl=config.model_impl, revision=config.revision,
        )
        self.decoder = self._build_decoder()
        self.kwargs = ProcessorKwargs.for_model(
            self.mm_processor,
            takes_video=Modality.VIDEO in self.profile.modalities,
            limits=config.media_limits,
            wanted=config.allowed_processor_kwargs,
        )
        # What vLLM's processor makes of one item of a given size (`_unpadded`).
        self._references = ReferenceCache(self.mm_processor, self.max_model_len, capacity=256)
        self.build_seconds = time.perf_counter() - t0

    # -- start-up -----------------------------------------------------------------------------

    def _build_decoder(self) -> MediaDecoder:
        from vllm.multimodal.video import get_video_loader_backend_for_processor
        from vllm.transformers_utils.processor import get_video_processor_cls_name

        mm_config = self.model_config.multimodal_config
        io_kwargs = dict(mm_config.media_io_kwargs or {}) if mm_config is not None else {}
        backend = None
        if Modality.VIDEO in self.profile.modalities:
            with contextlib.suppress(Exception):
                backend = get_video_loader_backend_for_processor(
                    get_video_processor_cls_name(self.model_config)
                )
        return MediaDecoder(
            limits=self.config.media_limits,
            image_io_kwargs=dict(io_kwargs.get("image", {})),
            video_io_kwargs=dict(io_kwargs.get("video", {})),
            video_backend=backend,
        )

    def warmup(self) -> None:
        """Process one dummy image (checks that every field is a single tensor), then clear the
        cache so that the warm-up does not count."""
        image = self.profile.modalities.get(Modality.IMAGE)
        if image is None:
            return
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (127, 127, 127)).save(buf, "PNG")
        try:
            self.process(PromptInput(text=image.placeholder_text, media=(Media(Modality.IMAGE, buf.getvalue()),)))
        except VlmError as e:
            raise RuntimeError(
                f"{self.config.model}: warm-up failed, vLLM cannot process an image for this "
                f"model (model_impl={self.config.model_impl!r}): {e.message}"
            ) from e
        if self._mm_cache is not None:
            self._mm_cache.clear_cache()
            self._mm_cache.make_stats(delta=True)

    # -- per request --------------------------------------------------------------------------

    def process(
        self,
        prompt: PromptInput,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        copy: bool = True,
    ) -> PreprocessResult:
        """Process one prompt. With `copy=False` the item tensors may be views into vLLM's
        processor cache: for a caller that serializes them at once and never writes to them
        (the pool's workers), saving one copy of every tensor."""
        t_start = time.perf_counter()
        kind = _input_kind(prompt)
        prompt_field = _INPUT_FIELDS[kind]
        _check_text(prompt, kind)
        hf_kwargs, video_io = self.kwargs.split(processor_kwargs)
        refs = self._media_refs(prompt, kind)
        self._check_items(refs, kind)

        # Cheap checks first (template, tokenization, lengths, placeholder counts); media are
        # decoded only for a request that passed them.
        t_proc = time.perf_counter()
        with _vllm_errors(prompt_field, "tokenization"):
            tok_prompt, tok_params, prompt_text, chat_order = self._tokenize(prompt, kind)
        ids = tok_prompt.get("prompt_token_ids")
        if not ids:
            raise InvalidArgument("the prompt is empty", field=prompt_field)
        self._check_placeholders(ids, refs, kind, prompt_field)
        tokenize_s = time.perf_counter() - t_proc

        # Decode (timed per modality), keeping request order within each modality.
        decode_s: dict[str, float] = {}
        media_bytes: dict[str, int] = {}
        by_ref: list[Any] = []
        for ref in refs:
            m = ref.media.modality.value
            t0 = time.perf_counter()
            by_ref.append(self.decoder.decode(ref.media, ref.path, video_io_overrides=video_io or None))
            decode_s[m] = decode_s.get(m, 0.0) + time.perf_counter() - t0
            media_bytes[m] = media_bytes.get(m, 0) + len(ref.media.data)
        decoded: dict[str, list[Any]] = {}
        if chat_order is not None:
            # Chat: in the order vLLM's chat parser collected the parts, per modality.
            for m, indices in chat_order.items():
                decoded[m] = [by_ref[i] for i in indices]
        else:
            for ref, obj in zip(refs, by_ref):
                decoded.setdefault(ref.media.modality.value, []).append(obj)

        t_proc = time.perf_counter()
        tok_prompt.pop("multi_modal_uuids", None)
        tok_prompt.pop("multi_modal_data", None)
        if decoded:
            tok_prompt["multi_modal_data"] = decoded
            if hf_kwargs:
                tok_prompt["mm_processor_kwargs"] = hf_kwargs
            tok_prompt["media_io_kwargs"] = {"video": dict(video_io)} if video_io else {}

        if self._mm_cache is not None:
            self._mm_cache.make_stats(delta=True)
        with _vllm_errors(prompt_field, "multimodal processing"):
            engine_input = self.renderer.process_for_engine(
                tok_prompt, time.time(), skip_mm_cache=True, tok_params=tok_params
            )
        hits = misses = cache_bytes = 0
        if self._mm_cache is not None:
            info = self._mm_cache.make_stats(delta=True)
            hits, misses = int(info.hits), int(info.total - info.hits)
            cache_bytes = int(getattr(getattr(self._mm_cache, "_cache", None), "currsize", 0))
        process_s = tokenize_s + time.perf_counter() - t_proc

        out_ids = engine_input["prompt_token_ids"]
        if len(out_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt is {len(out_ids)} tokens after multimodal expansion; the model's "
                f"maximum context length is {self.max_model_len} (prompt plus at least one "
                "generated token)",
                field=prompt_field,
            )
        result_prompt = self._to_prompt(engine_input, prompt_text, copy=copy)

        feature_bytes: dict[str, int] = {}
        for item in result_prompt.items:
            feature_bytes[item.modality.value] = feature_bytes.get(item.modality.value, 0) + item.nbytes
        modalities = {
            m: ModalityMetrics(
                items=len(items),
                media_bytes=media_bytes.get(m, 0),
                decode_seconds=decode_s.get(m, 0.0),
                feature_bytes=feature_bytes.get(m, 0),
            )
            for m, items in decoded.items()
        }
        metrics = PreprocessMetrics(
            input_kind=kind,
            prompt_tokens=len(result_prompt.token_ids),
            modalities=modalities,
            process_seconds=process_s,
            total_seconds=time.perf_counter() - t_start,
            cache_hits=hits,
            cache_misses=misses,
            cache_bytes=cache_bytes,
        )
        return PreprocessResult(result_prompt, metrics)

    def _media_refs(self, prompt: PromptInput, kind: str) -> list[_MediaRef]:
        if kind == "messages":
            if prompt.media:
                raise InvalidArgument(
                    "chat messages carry their media inline; the media list must be empty",
                    field="media",
                )
            for i, msg in enumerate(prompt.messages or ()):
                for j, part in enumerate(msg.content):
                    if (part.text is None) == (part.media is None):
                        raise InvalidArgument("a content part holds exactly one of text or media",
                                              field=f"prompt.messages[{i}].content[{j}]")
        return [_MediaRef(m, path) for m, path in media_with_paths(prompt)]

    def _check_items(self, refs: Sequence[_MediaRef], kind: str) -> None:
        limits = {m.value: mp.max_items for m, mp in self.profile.modalities.items()}
        counts: dict[str, int] = {}
        for ref in refs:
            m = ref.media.modality
            if not isinstance(m, Modality):
                raise InvalidArgument("unknown modality", field=f"{ref.path}.modality")
            if m.value not in limits:
                raise InvalidArgument(
                    f"this model does not take {m.value} input", field=f"{ref.path}.modality"
                )
            counts[m.value] = counts.get(m.value, 0) + 1
        for m, n in counts.items():
            if n > limits[m]:
                raise LimitExceeded(
                    f"{n} {m} items; at most {limits[m]} per prompt",
                    field="prompt.messages" if kind == "messages" else "media",
                )

    def _tokenize(
        self, prompt: PromptInput, kind: str
    ) -> tuple[dict[str, Any], Any, str | None, dict[str, list[int]] | None]:
        """Tokenized prompt (no media attached yet), its TokenizeParams, the prompt text and,
        for chat, which media (index in request order) vLLM placed where per modality."""
        r = self.renderer
        if kind == "text":
            params = r.default_cmpl_tok_params
            tok = r.tokenize_prompt({"prompt": prompt.text}, params)
            return dict(tok), params, prompt.text, None
        if kind == "token_ids":
            ids = list(prompt.token_ids or ())
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidArgument("token IDs must be integers", field="prompt.token_ids")
            r.validate_token_ids(ids, parameter="prompt.token_ids")
            params = r.default_cmpl_tok_params
            tok = r.tokenize_prompt({"prompt_token_ids": ids}, params)
            return dict(tok), params, None, None

        from vllm.renderers.params import ChatParams

        uuids: dict[str, int] = {}
        messages = []
        k = 0
        for msg in prompt.messages or ():
            content: list[dict[str, Any]] = []
            for part in msg.content:
                if part.text is not None:
                    content.append({"type": "text", "text": part.text})
                    continue
                # Media travel as uuid-only parts: vLLM renders the template (and its
                # placeholders) without fetching anything; the decoded items are put in
                # afterwards, by uuid, in the order vLLM's parser collected them.
                uuid = f"vlm-media-{k}"
                uuids[uuid] = k
                key = "image_url" if part.media.modality == Modality.IMAGE else "video_url"
                content.append({"type": key, key: None, "uuid": uuid})
                k += 1
            messages.append({"role": msg.role, "content": content})
        params = ChatParams(
            chat_template_kwargs={"add_generation_prompt": prompt.add_generation_prompt}
        )
        _, dict_prompt = r.render_messages(messages, params)
        dict_prompt = dict(dict_prompt)
        mm_uuids = dict_prompt.pop("multi_modal_uuids", None) or {}
        dict_prompt.pop("multi_modal_data", None)
        order = {m: [uuids[u] for u in us] for m, us in mm_uuids.items() if us}
        tok_params = r.default_chat_tok_params
        tok = dict(r.tokenize_prompt(dict_prompt, tok_params))
        text = dict_prompt.get("prompt")
        if not isinstance(text, str):
            # vLLM applies the template with tokenize=True: recover the text for information.
            text = self.tokenizer.decode(tok.get("prompt_token_ids") or [])
        return tok, tok_params, text, order

    def _check_placeholders(
        self, ids: Sequence[int], refs: Sequence[_MediaRef], kind: str, prompt_field: str
    ) -> None:
        counts: dict[str, int] = {}
        for ref in refs:
            counts[ref.media.modality.value] = counts.get(ref.media.modality.value, 0) + 1
        for modality, mp in self.profile.modalities.items():
            m, token = modality.value, mp.count_token_id
            if token is None:
                continue
            found = sum(1 for t in ids if t == token)
            want = counts.get(m, 0)
            if found != want:
                where = "the rendered chat prompt" if kind == "messages" else "the prompt"
                raise InvalidArgument(
                    f"{where} has {found} {m} placeholder(s) ({mp.placeholder_text!r}) but "
                    f"{want} {m} item(s) were given; put exactly one placeholder per item",
                    field=prompt_field,
                )

    def _to_prompt(
        self, engine_input: Mapping[str, Any], prompt_text: str | None, *, copy: bool
    ) -> Prompt:
        items = (
            items_from_engine_input(engine_input, copy=copy)
            if engine_input.get("type") == "multimodal"
            else ()
        )
        for item in items:
            if item.fields is None:
                raise Internal(f"vLLM returned no features for {item.modality.value} item {item.hash}")
        items = self._unpadded(items)
        ids = tuple(int(t) for t in engine_input["prompt_token_ids"])
        return Prompt(self.profile.fingerprint, ids, items, prompt_text)

    def _unpadded(self, items: tuple[Item, ...]) -> tuple[Item, ...]:
        """Each item's features as if processed alone.

        HF processors pad per-item patch stacks to the longest in the batch (LLaVA-OneVision's
        anyres patches: a 64x24 image next to a 48x40 one carries 5 patches instead of 3; vLLM
        slices the padding off). Trailing all-zero rows beyond what vLLM's processor gives the
        item's size alone (`vlm.vllm_layout`) are dropped, so an item's features, and hash, do
        not depend on its neighbours, and the model service can hold them to the exact
        reference. Only for modalities with a size source and more than one item.
        """
        counts = Counter(it.modality for it in items)
        if not any(
            n > 1 and self.profile.modalities[m].size_source is not None for m, n in counts.items()
        ):
            return items
        out = []
        for item in items:
            source = self.profile.modalities[item.modality].size_source
            if counts[item.modality] < 2 or source is None or item.fields is None:
                out.append(item)
                continue
            ref = self._references(item.modality, size_of(item.modality, source, item.fields))
            fields = dict(item.fields)
            for name, f in item.fields.items():
                want, d = ref.shapes.get(name), f.data
                if (want and d.dim() == len(want) and d.shape[0] > want[0]
                        and tuple(d.shape[1:]) == want[1:] and not d[want[0]:].any()):
                    fields[name] = dataclasses.replace(f, data=d[: want[0]])
            if any(fields[n] is not item.fields[n] for n in fields):
                item = dataclasses.replace(
                    item, fields=fields, hash=item_digest(item.modality, fields)
                )
            out.append(item)
        return tuple(out)

    # -- stats ---------------------------------------------------------------------------------

    def cache_size_bytes(self) -> int:
        cache = getattr(self._mm_cache, "_cache", None)
        return int(getattr(cache, "currsize", 0) or 0)


def _engine_kwargs(config: ProcessorConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=config.model,
        model_impl=config.model_impl,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        mm_processor_cache_gb=config.cache_bytes / GiB,
        # Content hashes are only computed when a cache is on; prefix caching keeps them on
        # even with cache_bytes=0 (the renderer never uses the KV cache itself).
        enable_prefix_caching=True,
    )
    if config.tokenizer:
        kwargs["tokenizer"] = config.tokenizer
    if config.revision:
        kwargs["revision"] = config.revision
    if config.limit_mm_per_prompt:
        kwargs["limit_mm_per_prompt"] = {str(getattr(k, "value", k)): int(v) for k, v in config.limit_mm_per_prompt.items()}
    if config.mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(config.mm_processor_kwargs)
    if config.media_io_kwargs:
        kwargs["media_io_kwargs"] = {k: dict(v) for k, v in config.media_io_kwargs.items()}
    return kwargs


def _check_text(prompt: PromptInput, kind: str) -> None:
    """The text a request carries before vLLM sees it: a text prompt is not empty (a tokenizer
    that adds BOS would turn "" into a prompt of BOS alone), chat roles are known, and every
    string is valid Unicode (a lone surrogate, e.g. from a JSON "\\ud800" escape, cannot be
    encoded to UTF-8 for the tokenizer)."""
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument("the prompt text is empty", field="prompt.text")
        _check_unicode(prompt.text, "prompt.text")
        return
    if kind != "messages":
        return
    for i, msg in enumerate(prompt.messages or ()):
        if msg.role not in CHAT_ROLES:
            shown = msg.role if len(msg.role) <= 40 else msg.role[:37] + "..."
            raise InvalidArgument(
                f"unknown role {shown!r}; a message's role is one of {', '.join(sorted(CHAT_ROLES))}",
                field=f"prompt.messages[{i}].role",
            )
        for j, part in enumerate(msg.content):
            if part.text is not None:
                _check_unicode(part.text, f"prompt.messages[{i}].content[{j}].text")


def _check_unicode(text: str, field_path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(
            f"the text is not valid Unicode: {e.object[e.start]!r} at character {e.start} is a "
            "lone surrogate, which UTF-8 cannot encode",
            field=field_path,
        ) from None


def _input_kind(prompt: PromptInput) -> str:
    set_ = [k for k in ("text", "token_ids", "messages") if getattr(prompt, k) is not None]
    if len(set_) != 1:
        raise InvalidArgument(
            "set exactly one of prompt.text, prompt.token_ids, prompt.messages", field="prompt"
        )
    kind = set_[0]
    if kind == "messages" and not prompt.messages:
        raise InvalidArgument("no chat messages", field="prompt.messages")
    return kind


@contextlib.contextmanager
def _vllm_errors(prompt_field: str, stage: str) -> Iterator[None]:
    """Translate vLLM / HF errors raised while rendering or processing (`vlm.vllm_errors`)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        err = vllm_errors.translate(e, vllm_errors.processing(prompt_field, stage))
        if err is None:
            raise
        if err is not e:
            logger.debug("%s failed", stage, exc_info=True)
            raise err from None
        raise
