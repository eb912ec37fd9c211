from __future__ import annotations

from model_svc.config import EngineConfig, add_engine_cli_args


def test_cli_args_pass_through_to_vllm(tmp_path):
    parser = add_engine_cli_args()
    args = parser.parse_args(
        [
            "--model", str(tmp_path),
            "--tensor-parallel-size", "2",
            "--dtype", "float32",
            "--max-model-len", "512",
            "--kv-cache-memory-bytes", "1G",
            "--gpu-memory-utilization", "0.5",
            "--enforce-eager",
            "--model-impl", "transformers",
            "--limit-mm-per-prompt", '{"image": 3}',
            "--feature-store-bytes", "12345",
            "--max-feature-bytes-per-prompt", "999",
        ]
    )
    cfg = EngineConfig.from_cli_args(args)
    ea = cfg.engine_args
    assert (ea.model, ea.tensor_parallel_size, ea.dtype, ea.max_model_len) == (str(tmp_path), 2, "float32", 512)
    assert ea.kv_cache_memory_bytes == 1 << 30 or ea.kv_cache_memory_bytes == 10**9
    assert ea.gpu_memory_utilization == 0.5 and ea.enforce_eager and ea.model_impl == "transformers"
    assert ea.limit_mm_per_prompt == {"image": 3}
    assert ea.mm_processor_cache_gb == 0  # our default: the service resolves hash-only items itself
    assert cfg.feature_store_bytes == 12345
    assert cfg.limits.max_feature_bytes_per_prompt == 999 and cfg.limits.check_fixed_shapes


def test_defaults(tmp_path):
    args = add_engine_cli_args().parse_args(["--model", str(tmp_path), "--no-strict-field-shapes"])
    cfg = EngineConfig.from_cli_args(args)
    assert cfg.engine_args.model_impl == "auto"
    assert not cfg.limits.check_fixed_shapes
