"""Random-initialised DeepSeek-V3 / V3.2 / V4 models of chosen sizes (no downloads), and local checkpoints.

``tiny`` configs are small enough for CPU tests and still contain every mapped module kind: V3 a
dense layer then grouped-routing MoE layers; V3.2 the same plus the lightning indexer with a top-k
smaller than the prompt; V4 sliding, CSA and HCA attention layers, hash-MoE then top-k MoE layers,
compression rates and windows short enough that prefill and decode both close windows. ``mid`` is
the size used for the GPU run (V4: hidden 2048, 8 layers, head dim 512, real rates 4 / 128).

transformers initialises the correction bias, ``tid2eid``, ``position_bias``, sinks and the mHC
biases to constants; :func:`randomize_extras` gives them random values so every term of the math
is exercised (a zero bias would hide a wrong bias).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

FAMILIES = ("v3", "v32", "v4")
SIZES = ("tiny", "mid")

_V3_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, kv_lora_rank=32,
                  q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1,
                  max_position_embeddings=512, initializer_range=0.1)
_V3_MID = dict(vocab_size=4096, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=512,
               num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
               n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, routed_scaling_factor=2.5,
               kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
               first_k_dense_replace=1, max_position_embeddings=8192, initializer_range=0.02)

CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("v3", "tiny"): _V3_COMMON,
    ("v32", "tiny"): dict(_V3_COMMON, index_topk=5, index_head_dim=16, index_n_heads=8),
    ("v4", "tiny"): dict(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=1.5, swiglu_limit=0.5, sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=8, index_head_dim=16, index_topk=3, hc_mult=4, hc_sinkhorn_iters=20,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], max_position_embeddings=512, initializer_range=0.1),
    ("v3", "mid"): _V3_MID,
    ("v32", "mid"): dict(_V3_MID, index_topk=256, index_head_dim=128, index_n_heads=16),
    ("v4", "mid"): dict(
        vocab_size=4096, hidden_size=2048, moe_intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
        head_dim=512, q_lora_rank=512, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.5,
        swiglu_limit=10.0, sliding_window=128, o_groups=4, o_lora_rank=512, index_n_heads=16, index_head_dim=128,
        index_topk=128, hc_mult=4, hc_sinkhorn_iters=20,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        layer_types=["sliding_attention", "heavily_compressed_attention"] + ["compressed_sparse_attention",
                                                                             "heavily_compressed_attention"] * 3,
        mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 6, max_position_embeddings=65536, initializer_range=0.02),
}


def make_config(family: str, size: str = "tiny", **overrides: Any):
    """The transformers config of a random DeepSeek model of ``family`` ('v3', 'v32', 'v4') and ``size``."""
    import transformers

    if (family, size) not in CONFIGS:
        raise ValueError(f"unknown model family/size {family!r}/{size!r}; families {FAMILIES}, sizes {SIZES}")
    kw = dict(CONFIGS[(family, size)], **overrides)
    cls = {"v3": transformers.DeepseekV3Config, "v32": transformers.DeepseekV32Config,
           "v4": transformers.DeepseekV4Config}[family]
    return cls(**kw)


def randomize_extras(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for what transformers initialises to constants (biases, tables, sinks)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g) * std).to(t.dtype).to(t.device)

    with torch.no_grad():
        for name, m in model.named_modules():
            cls = type(m).__name__
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(rnd(m.e_score_correction_bias, 0.05))
            if hasattr(m, "tid2eid"):  # a distinct expert set per token id, like a real hash table
                E, k = m.num_experts, m.tid2eid.shape[1]
                rows = [torch.randperm(E, generator=g)[:k] for _ in range(m.tid2eid.shape[0])]
                m.tid2eid.copy_(torch.stack(rows).to(m.tid2eid))
            if hasattr(m, "position_bias"):
                m.position_bias.copy_(rnd(m.position_bias, 0.5))
            if hasattr(m, "sinks"):
                m.sinks.copy_(rnd(m.sinks, 1.0))
            if cls == "DeepseekV4HyperConnection":
                m.base.copy_(rnd(m.base, 0.5))
                m.scale.copy_(1.0 + rnd(m.scale, 0.2))
            if cls == "DeepseekV4HyperHead":
                m.hc_base.copy_(rnd(m.hc_base, 0.5))
                m.hc_scale.copy_(1.0 + rnd(m.hc_scale, 0.2))


def build_model(family: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-initialised ``*ForCausalLM`` in eval mode with transformers' default kernels, extras randomised."""
    import transformers

    config = make_config(family, size, **overrides)
    if dtype == torch.float64 or torch.device(device).type == "cpu":
        # transformers' default experts kernel, torch's grouped_mm, has no float64 and takes seconds per
        # tiny forward on the CPU; the experts' own loop (the same math) is the CPU baseline.
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        # transformers keeps its fp32 modules (mHC, sinks, norms, biases) in fp32 at any dtype.
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_extras(model, seed)
    return model.eval()


def load_checkpoint(path: str, *, dtype: Optional[torch.dtype] = None, device: str = "cpu") -> torch.nn.Module:
    """A local transformers checkpoint directory (nothing is downloaded), in eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    if torch.device(device).type == "cpu":  # as in build_model: grouped_mm is very slow on the CPU
        model.config._experts_implementation = "eager"
    return model.to(device).eval()
