"""What crosses the pipe between the pool and a worker process."""

from __future__ import annotations

import pickle

import pytest
import torch

from preprocessor_svc.pool import _error_payload, _pack_result, _rebuild_error, _unpack_result
from preprocessor_svc.processing import ModalityMetrics, PreprocessMetrics, PreprocessResult
from vlm.errors import Internal, InvalidMedia, LimitExceeded, MissingFeatures
from vlm.types import FieldLayout, Fingerprint, Item, ItemField, Modality, Placeholder, Prompt


def _result() -> PreprocessResult:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    fields = {
        "pixel_values": ItemField(base[1:3], FieldLayout.FLAT, 0),  # a view into a batch
        "bf16": ItemField(torch.randn(2, 3).to(torch.bfloat16), FieldLayout.BATCHED),
        "u8": ItemField(torch.arange(6, dtype=torch.uint8).reshape(2, 3).t(), FieldLayout.BATCHED),
        "scalar": ItemField(torch.tensor(7), FieldLayout.BATCHED, keep_on_cpu=True),
        "empty": ItemField(torch.empty(0, 4, dtype=torch.int64), FieldLayout.SHARED),
        "mask": ItemField(torch.tensor([True, False]), FieldLayout.FLAT, -1),
    }
    items = (
        Item(Modality.IMAGE, "h1", Placeholder(2, 4, (True, False, True, True)), fields),
        Item(Modality.VIDEO, "h2", Placeholder(9, 3), None),
    )
    prompt = Prompt(Fingerprint("m", "auto", "abc"), (1, 2, 3), items, "text")
    metrics = PreprocessMetrics("text", 3, {"image": ModalityMetrics(1, 10, 0.1, 100)}, 0.2, 0.3, 1, 0, 5)
    return PreprocessResult(prompt, metrics)


def test_result_round_trip():
    res = _result()
    out = _unpack_result(pickle.loads(pickle.dumps(_pack_result(res))))
    assert out.metrics == res.metrics
    p, q = res.prompt, out.prompt
    assert (q.fingerprint, q.token_ids, q.prompt_text) == (p.fingerprint, p.token_ids, p.prompt_text)
    assert [i.placeholder for i in q.items] == [i.placeholder for i in p.items]
    assert q.items[1].fields is None
    for name, f in p.items[0].fields.items():
        g = q.items[0].fields[name]
        assert (g.layout, g.flat_dim, g.keep_on_cpu) == (f.layout, f.flat_dim, f.keep_on_cpu)
        assert g.data.dtype == f.data.dtype and g.data.shape == f.data.shape
        assert torch.equal(g.data, f.data), name
        if g.data.numel():
            g.data.view(-1)[0] = g.data.view(-1)[0]  # writable, own memory


def test_only_the_item_bytes_travel():
    """A flat field's view into a bigger batch tensor must not ship the whole storage."""
    big = torch.zeros(1000, 100)
    res = _result()
    item = res.prompt.items[0]
    fields = dict(item.fields)
    fields["pixel_values"] = ItemField(big[:2], FieldLayout.FLAT)
    small = Item(item.modality, item.hash, item.placeholder, fields)
    res = PreprocessResult(Prompt(res.prompt.fingerprint, (1,), (small,)), res.metrics)
    assert len(pickle.dumps(_pack_result(res))) < 10_000


@pytest.mark.parametrize("exc", [InvalidMedia("bad", field="media[0].data"), LimitExceeded("many", field="media")])
def test_errors_keep_class_and_field(exc):
    back = _rebuild_error(pickle.loads(pickle.dumps(_error_payload(exc))))
    assert type(back) is type(exc) and back.field == exc.field and back.message == exc.message


def test_other_errors_become_internal():
    back = _rebuild_error(_error_payload(RuntimeError("boom")))
    assert type(back) is Internal and "RuntimeError: boom" in back.message
    assert type(_rebuild_error(("MissingFeatures", "x", None))) is Internal
    assert type(_rebuild_error(("NoSuchError", "x", None))) is Internal
    assert MissingFeatures  # imported for the check above
