"""torch_npu operator schemas, verbatim, per emulated torch_npu release.

2.13.0: copied from the schema strings in torch_npu-2.13.0 (lib/libtorch_npu.so, the op-plugin
registrations it ships). 2.11.0 (op-plugin 26.1.0) and 2.9.0 (op-plugin 7.3.0): the same strings
with the differences listed in the appendix of shared/research/ascend-ops.md (op-plugin branches).
An op missing from a release is missing from its dict.
"""
from __future__ import annotations

V2_13_0 = {
    'npu_moe_gating_top_k':
        'npu_moe_gating_top_k(Tensor x, int k, *, Tensor? bias=None, Tensor? input_ids=None, Tensor? tid2eid=None, int k_group=1, int group_count=1, int group_select_mode=0, int renorm=0, int norm_type=0, bool out_flag=False, float routed_scaling_factor=1.0, float eps=1e-20) -> (Tensor, Tensor, Tensor)',
    'npu_moe_init_routing_v2':
        'npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, Tensor? scale=None, Tensor? offset=None, int active_num=-1, int expert_capacity=-1, int expert_num=-1, int drop_pad_mode=0, int expert_tokens_num_type=0, bool expert_tokens_num_flag=False, int quant_mode=-1, int[2] active_expert_range=[], int row_idx_type=0, int? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)',
    'npu_grouped_matmul':
        'npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, int? per_token_scale_dtype=None) -> Tensor[]',
    'npu_swiglu':
        'npu_swiglu(Tensor input, int dim=-1) -> Tensor',
    'npu_moe_token_unpermute':
        'npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None, bool padded_mode=False, int[]? restore_shape=None) -> Tensor',
    'npu_lightning_indexer':
        'npu_lightning_indexer(Tensor query, Tensor key, Tensor weights, *, Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_key=None, Tensor? block_table=None, str layout_query="BSND", str layout_key="BSND", int sparse_count=2048, int sparse_mode=3, int pre_tokens=9223372036854775807, int next_tokens=9223372036854775807, bool return_value=False) -> (Tensor, Tensor)',
    'npu_sparse_flash_attention':
        'npu_sparse_flash_attention(Tensor query, Tensor key, Tensor? value, Tensor sparse_indices, float scale_value, *, Tensor? block_table=None, Tensor? actual_seq_lengths_query=None, Tensor? actual_seq_lengths_kv=None, Tensor? query_rope=None, Tensor? key_rope=None, int sparse_block_size=1, str layout_query="BSND", str layout_kv="BSND", int sparse_mode=3, int pre_tokens=9223372036854775807, int next_tokens=9223372036854775807, int attention_mode=0, bool return_softmax_lse=False, Tensor? sinks=None) -> (Tensor, Tensor, Tensor)',
    'npu_mhc_pre':
        'npu_mhc_pre(Tensor x, Tensor phi, Tensor alpha, Tensor bias, *, Tensor? gamma=None, float norm_eps=1e-6, float hc_eps=1e-6, int out_flag=0, int inner_precise=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)',
    'npu_mhc_sinkhorn':
        'npu_mhc_sinkhorn(Tensor x, *, float eps=1e-6, SymInt num_iters=20, int out_flag=0) -> (Tensor, Tensor, Tensor)',
    'npu_mhc_post':
        'npu_mhc_post(Tensor x, Tensor? h_res, Tensor h_out, Tensor h_post) -> Tensor',
}


def _edit(schema: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in schema, (old, schema)
        schema = schema.replace(old, new)
    return schema


# op-plugin 26.1.0: no hash routing in the gating op, no sinks in SFA (and value required),
# npu_mhc_pre without inner_precise, npu_mhc_post with a required h_res.
V2_11_0 = dict(V2_13_0)
V2_11_0["npu_moe_gating_top_k"] = _edit(V2_13_0["npu_moe_gating_top_k"],
                                        ("Tensor? input_ids=None, Tensor? tid2eid=None, ", ""))
V2_11_0["npu_sparse_flash_attention"] = _edit(V2_13_0["npu_sparse_flash_attention"],
                                              ("Tensor? value", "Tensor value"), (", Tensor? sinks=None", ""))
V2_11_0["npu_mhc_pre"] = _edit(V2_13_0["npu_mhc_pre"], (", int inner_precise=0", ""))
V2_11_0["npu_mhc_post"] = _edit(V2_13_0["npu_mhc_post"], ("Tensor? h_res", "Tensor h_res"))

# op-plugin 7.3.0: no mHC ops; init_routing_v2 defaults to quant_mode=0 (static int8) and has no x_dtype;
# GMM takes a ScalarType output_dtype and none of the *_dtype arguments.
V2_9_0 = {k: v for k, v in V2_11_0.items() if not k.startswith("npu_mhc")}
V2_9_0["npu_moe_init_routing_v2"] = _edit(V2_13_0["npu_moe_init_routing_v2"],
                                          ("int quant_mode=-1", "int quant_mode=0"), (", int? x_dtype=None", ""))
V2_9_0["npu_grouped_matmul"] = _edit(
    V2_13_0["npu_grouped_matmul"],
    ("int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, "
     "int? per_token_scale_dtype=None", "ScalarType? output_dtype=None"))

SCHEMAS = {"2.13.0": V2_13_0, "2.11.0": V2_11_0, "2.9.0": V2_9_0}
CANN = {"2.13.0": "9.1.0", "2.11.0": "9.1.0", "2.9.0": "8.5.0"}
