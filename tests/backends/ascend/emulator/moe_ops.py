"""Emulated MoE operators, written from their torch_npu documentation (``torch_npu/_op_plugin_docs.py``
of torch-npu 2.13.0) and the op-plugin goldens summarised in shared/research/ascend-ops.md (3.2-3.8).
Plain torch on CPU; nothing here knows opbridge.
"""
from __future__ import annotations

import torch

from .contract import FLOAT, DEVICE, ContractError, need, need_kernel, undefined

# torch ScalarType codes, as an `int?` dtype argument arrives from Python (c10 enum values)
_SCALAR_TYPE = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}


def _stable_desc(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by descending value; equal values keep the lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    op = "npu_moe_gating_top_k"
    need_kernel(op)
    need(x.dim() == 2, op, "x must be 2-D")
    need(x.dtype in FLOAT, op, "x must be float16/bfloat16/float32")
    N, E = x.shape
    need(E <= 2048, op, f"the expert count (last dim of x) must be <= 2048, got {E}")
    need(group_count > 0 and E % group_count == 0 and E // group_count > 2, op,
         f"group_count must divide E={E} into groups of more than 2 experts, got group_count={group_count}")
    need(-(-(E // group_count) // 32) * 32 * group_count <= 2048, op, "align32(E / group_count) * group_count <= 2048")
    need(1 <= k_group <= group_count, op, f"1 <= k_group <= group_count, got k_group={k_group}")
    need(1 <= k <= E // group_count * k_group, op, f"1 <= k <= E / group_count * k_group, got k={k}")
    need(group_select_mode in (0, 1), op, "group_select_mode must be 0 (group max) or 1 (sum of the group's top 2)")
    need(renorm == 0, op, "renorm: only 0 is supported")
    need(norm_type in (0, 1), op, "norm_type must be 0 (softmax) or 1 (sigmoid)")
    if bias is not None:
        need(bias.dim() == 1 and bias.shape[0] == E, op, "bias must be 1-D of length E")
        need(bias.dtype == x.dtype, op, f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    need((input_ids is None) == (tid2eid is None), op, "input_ids and tid2eid must be both provided or both omitted")

    s = torch.softmax(x.float(), -1) if norm_type == 0 else torch.sigmoid(x.float())
    if tid2eid is not None:  # hash routing: the experts are looked up, not selected
        need(input_ids.dim() == 1 and input_ids.shape[0] == N, op, "input_ids must be 1-D with x's row count")
        need(input_ids.dtype in (torch.int32, torch.int64) and tid2eid.dtype in (torch.int32, torch.int64), op,
             "input_ids and tid2eid must be int32/int64")
        need(tid2eid.dim() == 2 and tid2eid.shape[1] == k, op, "tid2eid must be 2-D with k columns")
        idx = tid2eid[input_ids.long()].long()
    else:
        sel = s if bias is None else s + bias.float()  # the bias steers selection only
        if group_count > 1:
            g = sel.view(N, group_count, E // group_count)
            score = g.max(-1).values if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros(N, group_count, dtype=torch.bool).scatter_(1, _stable_desc(score)[:, :k_group], True)
            sel = sel.masked_fill(~keep.repeat_interleave(E // group_count, dim=1), float("-inf"))
        idx = _stable_desc(sel)[:, :k]
    y = s.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    norm_out = s if out_flag else undefined((N, E), torch.float32)
    return y.to(x.dtype), idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=(), row_idx_type=0, x_dtype=None):
    op = "npu_moe_init_routing_v2"
    need_kernel(op)
    need(x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0], op,
         "x [NUM_ROWS, H] and expert_idx [NUM_ROWS, K] must be 2-D with the same row count")
    need(x.dtype in FLOAT + (torch.int8,), op, "x must be float16/bfloat16/float32/int8")
    need(expert_idx.dtype == torch.int32, op, "expert_idx must be int32")
    need(drop_pad_mode == 0, op, "drop_pad_mode: only 0 (dropless) is supported")
    need(expert_tokens_num_type in (1, 2), op, "expert_tokens_num_type: only 1 (count) and 2 (key_value) are supported")
    need(expert_tokens_num_flag is True, op, "expert_tokens_num_flag: only True is supported")
    need(quant_mode in (-1, 1), op, f"quant_mode: only -1 (none) and 1 (dynamic) are supported, got {quant_mode} "
                                    f"(0, static quantization, is not)")
    need(not (x.dtype == torch.int8 and quant_mode != -1), op, "int8 x cannot be quantized again (quant_mode=-1)")
    most = 5120 if expert_tokens_num_type == 2 else 10240
    need(0 < expert_num <= most, op, f"expert_num must be in (0, {most}], got {expert_num}")
    need(active_num >= -1, op, "active_num must be >= -1")
    rng = list(active_expert_range) or [0, expert_num]
    need(len(rng) == 2 and 0 <= rng[0] < rng[1] <= expert_num, op,
         f"active_expert_range [start, end) must satisfy 0 <= start < end <= expert_num, got {rng}")
    need(row_idx_type in (0, 1), op, "row_idx_type must be 0 (gather) or 1 (scatter)")
    need(offset is None, op, "offset: not used without static quantization (pass None)")
    if quant_mode == 1:
        raise NotImplementedError(f"emulator: {op} dynamic int8 quantization (quant_mode=1) is not emulated")
    N, K = expert_idx.shape
    H = x.shape[1]
    if scale is not None:
        need(scale.dim() == 1 and scale.shape[0] == N and scale.dtype == torch.float32, op,
             "scale without quantization must be float32 [NUM_ROWS]")
    f = expert_idx.reshape(-1).long()
    need(bool((f < expert_num).all()), op, "expert ids must be below expert_num")
    start, end = rng
    active = (f >= start) & (f < end)
    order = torch.sort(torch.where(active, f, torch.full_like(f, 1 << 40)), stable=True).indices
    avail = int(active.sum())
    rows = N * K if active_num <= 0 else min(active_num, N * K)
    kept = min(avail, rows)
    expanded_x = undefined((rows, H), x.dtype)
    expanded_x[:kept] = x[order[:kept] // K]
    if row_idx_type == 0:  # gather form: slot i*K+j -> its row in expanded_x, -1 when left out
        row_idx = torch.full((N * K,), -1, dtype=torch.int32)
        row_idx[order[:avail]] = torch.arange(avail, dtype=torch.int32)
    else:  # scatter form: row r of expanded_x came from slot row_idx[r]; the rest undefined
        row_idx = undefined((N * K,), torch.int32)
        row_idx[:avail] = order[:avail].to(torch.int32)
    counts = torch.bincount(f[active] - start, minlength=end - start).to(torch.int64)
    if expert_tokens_num_type == 1:
        tokens = counts
    else:  # (expert id, count) pairs of the non-empty experts first, then a (0, 0) terminator
        nz = counts.nonzero().squeeze(-1)
        tokens = torch.zeros((expert_num, 2), dtype=torch.int64)
        tokens[:nz.numel(), 0] = nz + start
        tokens[:nz.numel(), 1] = counts[nz]
    expanded_scale = undefined((N * K,), torch.float32)
    if scale is not None:
        expanded_scale[:avail] = scale[order[:avail] // K]
    return expanded_x, row_idx, tokens, expanded_scale


def _is_transposed(w: torch.Tensor) -> bool:
    return w.stride(-2) == 1 and w.stride(-1) == w.shape[-2]


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    op = "npu_grouped_matmul"
    need_kernel(op)
    quant = (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input,
             activation_quant_scale, activation_quant_offset, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)
    if any(a is not None for a in quant) or len(x) != 1 or len(weight) != 1 or group_type != 0:
        raise NotImplementedError(f"emulator: only the unquantized single-x / single-weight / single-y form of {op} "
                                  f"with group_type=0 is emulated")
    X, W = x[0], weight[0]
    need(split_item in (2, 3), op, "with group_type=0 (m-axis groups) only split_item 2 or 3 (one output) is supported")
    need(X.dim() == 2 and W.dim() == 3, op, "group_type=0 needs a 2-D x and a 3-D weight [E, K, N]")
    need(X.dtype in FLOAT and W.dtype == X.dtype, op,
         f"without quantization x and weight share one dtype among float16/bfloat16/float32, "
         f"got {X.dtype} and {W.dtype}")
    need(X.is_contiguous(), op, "x must be contiguous (x may not be transposed)")
    need(W.is_contiguous() or _is_transposed(W), op, "weight must be contiguous or a transposed view")
    E, K, N = W.shape
    M = X.shape[0]
    need(X.shape[1] == K, op,
         f"x [M, K] and weight [E, K, N] disagree on K: x {tuple(X.shape)}, weight {tuple(W.shape)}")
    inner = K if _is_transposed(W) else N
    need(K < 65536 and inner < 65536, op, "the last dimensions of x and weight must be < 65536 (InnerLimit)")
    need(E <= 1024, op, f"at most 1024 groups, got {E}")
    need(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1
         and group_list.numel() == E, op, f"group_list must be an int64 1-D tensor with one entry per group ({E})")
    need(act_type == 0, op, "act_type: activations are fused only with per-token quantization")
    need(output_dtype is None or output_dtype in (X.dtype, _SCALAR_TYPE[X.dtype]), op,
         "output_dtype must be None or x's dtype without quantization")
    g = group_list.tolist()
    if group_list_type == 0:
        need(all(v >= 0 for v in g) and all(b >= a for a, b in zip(g, g[1:])), op,
             f"group_list_type=0: group_list must be non-negative and non-decreasing (cumulative), got {g}")
        need(g[-1] == M, op, f"group_list_type=0: the last value must equal x's first dim {M}, got {g[-1]}")
        ends = g
    elif group_list_type == 1:
        need(all(v >= 0 for v in g), op, f"group_list_type=1: group sizes must be non-negative, got {g}")
        need(len(g) != 1, op, "group_list_type=1: group_list may not have length 1")
        need(sum(g) == M, op, f"group_list_type=1: the sizes must sum to x's first dim {M}, got {sum(g)}")
        ends = torch.tensor(g).cumsum(0).tolist()
    else:
        raise ContractError(f"{op}: group_list_type must be 0 (cumsum) or 1 (counts), got {group_list_type}")
    y = torch.zeros((M, N), dtype=torch.float32)
    lo = 0
    for e, hi in enumerate(ends):
        y[lo:hi] = X[lo:hi].float() @ W[e].float()
        lo = hi
    return [y.to(X.dtype)]


def npu_swiglu(input, dim=-1):
    op = "npu_swiglu"
    need_kernel(op)
    need(input.dtype in FLOAT, op, "input must be float32/float16/bfloat16")
    need(1 <= input.dim() <= 8, op, "input must have 1 to 8 dimensions")
    a, b = input.float().chunk(2, dim=dim)  # A: first half, B: second half along dim
    return (a * torch.sigmoid(a) * b).to(input.dtype)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    op = "npu_moe_token_unpermute"
    need_kernel(op)
    need(permuted_tokens.dim() == 2 and permuted_tokens.dtype in FLOAT, op,
         "permuted_tokens must be 2-D float16/bfloat16/float32")
    need(sorted_indices.dim() == 1 and sorted_indices.dtype == torch.int32, op, "sorted_indices must be 1-D int32")
    need(padded_mode is False and restore_shape is None, op, "only padded_mode=False with restore_shape=None")
    K = 1 if probs is None else probs.shape[-1]
    n = sorted_indices.numel()
    if probs is not None:
        need(probs.dim() == 2 and probs.dtype in FLOAT and probs.shape[0] * K == n, op,
             "probs must be 2-D float [tokens_num, topK_num] with tokens_num * topK_num = len(sorted_indices)")
    need(n % K == 0, op, "len(sorted_indices) must be tokens_num * topK_num")
    need(permuted_tokens.shape[0] == n, op, f"permuted_tokens must have tokens_num * topK_num = {n} rows")
    if DEVICE.family in ("A2", "A3"):
        need(K <= 512, op, "topK_num must be <= 512 on Atlas A2/A3")
    si = sorted_indices.long()
    need(bool(((si >= 0) & (si < n)).all()) and si.unique().numel() == n, op,
         f"sorted_indices must hold each of 0..{n - 1} once (in range, no duplicates)")
    T, H = n // K, permuted_tokens.shape[1]
    rows = permuted_tokens.float()[si].view(T, K, H)
    w = torch.ones(T, K) if probs is None else probs.float()
    return (rows * w.unsqueeze(-1)).sum(1).to(permuted_tokens.dtype)
