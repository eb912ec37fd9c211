"""What crosses the pipe between the pool and a worker process: the encoded prompt and errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from preprocessor_svc.pool import _as_vlm_error
from preprocessor_svc.processing import ModalityMetrics, PreprocessMetrics
from vlm import convert
from vlm.errors import Internal, InvalidMedia, LimitExceeded, MissingFeatures, UpstreamError
from vlm.types import FieldLayout, Fingerprint, Item, ItemField, Modality, Placeholder, Prompt


def _prompt() -> Prompt:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    fields = {
        "pixel_values": ItemField(base[1:3], FieldLayout.FLAT, 0),  # a view into a batch
        "bf16": ItemField(torch.randn(2, 3).to(torch.bfloat16), FieldLayout.BATCHED),
        "u8": ItemField(torch.arange(6, dtype=torch.uint8).reshape(2, 3).t(), FieldLayout.BATCHED),
        "scalar": ItemField(torch.tensor(7), FieldLayout.BATCHED, keep_on_cpu=True),
        "empty": ItemField(torch.empty(0, 4, dtype=torch.int64), FieldLayout.SHARED),
        "mask": ItemField(torch.tensor([True, False]), FieldLayout.FLAT, -1),
    }
    items = (Item(Modality.IMAGE, "h1", Placeholder(2, 4, (True, False, True, True)), fields),)
    return Prompt(Fingerprint("m", "auto", "abc", "float32"), (1, 2, 3, 4, 5, 6, 7), items, "text")


def test_result_round_trip_through_the_pipe():
    p = _prompt()
    metrics = PreprocessMetrics("text", 7, {"image": ModalityMetrics(1, 10, 0.1, 100)}, 0.2, 0.3, 1, 0, 5)
    enc, m = pickle.loads(pickle.dumps((convert.encode_prompt(p), metrics), protocol=5))
    assert m == metrics
    q = enc.decoded
    assert (q.fingerprint, q.token_ids, q.prompt_text) == (p.fingerprint, p.token_ids, p.prompt_text)
    assert q.items[0].placeholder == p.items[0].placeholder
    for name, f in p.items[0].fields.items():
        g = q.items[0].fields[name]
        assert (g.layout, g.flat_dim, g.keep_on_cpu) == (f.layout, f.flat_dim, f.keep_on_cpu)
        assert g.data.dtype == f.data.dtype and g.data.shape == f.data.shape
        assert torch.equal(g.data, f.data), name


def test_only_the_item_bytes_travel():
    """A flat field's view into a bigger batch tensor must not ship the whole storage."""
    big = torch.zeros(1000, 100)
    p = _prompt()
    item = p.items[0]
    small = Item(item.modality, item.hash, item.placeholder,
                 {"pixel_values": ItemField(big[:2], FieldLayout.FLAT)})
    enc = convert.encode_prompt(Prompt(p.fingerprint, (1,), (small,)))
    assert len(pickle.dumps(enc, protocol=5)) < 10_000


@pytest.mark.parametrize(
    "exc",
    [
        InvalidMedia("bad", field="media[0].data"),
        LimitExceeded("many", field="media"),
        MissingFeatures(["a", "b"], field="prompt.items"),
        UpstreamError(Internal.code, "boom", reason="X", field="f", missing_hashes=("h",)),
    ],
)
def test_errors_keep_class_and_attributes(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and back.__dict__ == exc.__dict__ and str(back) == str(exc)


def test_other_errors_become_internal():
    back = _as_vlm_error(RuntimeError("boom"))
    assert type(back) is Internal and "RuntimeError: boom" in back.message
