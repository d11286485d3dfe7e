"""opbridge: one interface to DeepSeek-style MoE, sparse-attention and mHC operators on any accelerator.

Every op below validates its inputs, then runs as the PyTorch custom op ``torch.ops.opbridge.<name>``
on the backend chosen by ``opbridge.use_backend`` / ``OPBRIDGE_BACKEND`` / the inputs' device.
"""
from .core.errors import ConfigError, OpError, OpTypeError, UnsupportedError
from .core.explain import explain
from .core.formats import QuantTensor, dequantize, quantize
from .core.kv_cache import dequantize_kv_cache, quantize_kv_cache
from .core.mhc import mhc_post, mhc_post_pre, mhc_pre, sinkhorn
from .core.moe import (grouped_gemm, grouped_gemm_masked, moe, moe_combine, moe_permute, moe_route,
                       moe_route_hash)
from .core.registry import OP_NAMES
from .core.settings import use_backend
from .core.sparse_attention import (indexer_logits, indexer_topk, indexer_topk_paged, kv_compress,
                                    sparse_attention, sparse_attention_paged, window_indices)
from .integrations import patch, unpatch  # transformers is imported only when a model is patched

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "OpError", "OpTypeError", "UnsupportedError", "QuantTensor", "quantize", "dequantize", "quantize_kv_cache", "dequantize_kv_cache",
    "explain", "use_backend", "OP_NAMES", "patch", "unpatch",
    "moe_route", "moe_route_hash", "grouped_gemm", "grouped_gemm_masked", "moe", "moe_permute", "moe_combine",
    "indexer_topk", "indexer_logits", "indexer_topk_paged", "kv_compress", "sparse_attention",
    "sparse_attention_paged", "window_indices",
    "sinkhorn", "mhc_pre", "mhc_post", "mhc_post_pre",
]
