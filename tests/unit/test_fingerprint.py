from __future__ import annotations

import json

import pytest

from vlm.fingerprint import compute_fingerprint, vllm_release


def make_model(d, **extra):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "x": 1}))
    (d / "tokenizer.json").write_text("{}")
    (d / "preprocessor_config.json").write_text(json.dumps({"size": 32}))
    (d / "model.safetensors").write_bytes(b"weights")
    for name, content in extra.items():
        (d / name).write_text(content)
    return d


def test_same_files_same_hash_anywhere(tmp_path):
    a = compute_fingerprint(str(make_model(tmp_path / "a")), "auto", feature_dtype="bfloat16")
    b = compute_fingerprint(str(make_model(tmp_path / "b")), "auto", feature_dtype="bfloat16")
    assert a.config_hash == b.config_hash and len(a.config_hash) == 64
    assert a.model_id != b.model_id and a.same_model(b)


def test_sensitive_to_configs_and_impl_not_weights(tmp_path):
    d = make_model(tmp_path / "m")
    base = compute_fingerprint(str(d), "auto", feature_dtype="bfloat16")
    assert compute_fingerprint(str(d), "transformers", feature_dtype="bfloat16").config_hash != base.config_hash
    (d / "model.safetensors").write_bytes(b"other weights")
    assert compute_fingerprint(str(d), "auto", feature_dtype="bfloat16").config_hash == base.config_hash
    (d / "preprocessor_config.json").write_text(json.dumps({"size": 64}))
    assert compute_fingerprint(str(d), "auto", feature_dtype="bfloat16").config_hash != base.config_hash
    hashes = {compute_fingerprint(str(d), "auto", feature_dtype="bfloat16").config_hash}
    # A chat template added, then changed; the tokenizer changed: each is another model.
    for name, content in (("chat_template.jinja", "{{ x }}"), ("chat_template.jinja", "{{ y }}"),
                          ("tokenizer.json", '{"version": "1.0"}')):
        (d / name).write_text(content)
        h = compute_fingerprint(str(d), "auto", feature_dtype="bfloat16").config_hash
        assert h not in hashes, name
        hashes.add(h)


def test_vllm_release_has_no_local_suffix():
    v = vllm_release()
    assert "+" not in v and v[0].isdigit()


def test_hub_id_resolved_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    commit = "0" * 40
    snap = make_model(cache / "models--org--tiny" / "snapshots" / commit)
    (cache / "models--org--tiny" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    fp = compute_fingerprint("org/tiny", "auto", feature_dtype="bfloat16")
    assert fp.model_id == "org/tiny"
    assert fp.config_hash == compute_fingerprint(str(snap), "auto", feature_dtype="bfloat16").config_hash
    with pytest.raises(FileNotFoundError):
        compute_fingerprint("org/absent", "auto", feature_dtype="bfloat16")


def test_feature_dtype_is_part_of_the_model(tmp_path):
    d = str(make_model(tmp_path / "m"))
    bf16 = compute_fingerprint(d, "auto", feature_dtype="bfloat16")
    f32 = compute_fingerprint(d, "auto", feature_dtype="float32")
    assert bf16.config_hash == f32.config_hash and not bf16.same_model(f32)
    assert "features float32" in f32.describe()
