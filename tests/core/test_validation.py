"""Bad input: each error names the op and the argument, has the documented type, and comes before any kernel."""
import pytest
import torch

import opbridge
from opbridge.core import registry

from .samples import call, samples


def _mutate(name, index_or_key, fn):
    args, kwargs = samples()[name]
    args, kwargs = list(args), dict(kwargs)
    if isinstance(index_or_key, int):
        args[index_or_key] = fn(args[index_or_key])
    else:
        kwargs[index_or_key] = fn(kwargs.get(index_or_key))
    return tuple(args), kwargs


def to_f64(t):
    return t.double()


def to_i64(t):
    return t.long()


def drop_last_dim(t):
    return t[..., :-1]


def to_meta(t):
    return t.to("meta")


CASES = [
    # (op, position or keyword, mutation, error type, argument named in the message)
    ("moe_route", 0, lambda t: t.long(), TypeError, "logits"),
    ("moe_route", 1, lambda k: 9, opbridge.OpError, "top_k"),
    ("moe_route", "num_groups", lambda g: 3, opbridge.OpError, "num_groups"),
    ("moe_route", "scoring", lambda s: "relu", opbridge.OpError, "scoring"),
    ("moe_route", "correction_bias", lambda b: b[:-1], opbridge.OpError, "correction_bias"),
    ("moe_route", "correction_bias", to_f64, TypeError, "correction_bias"),
    ("moe_route_hash", 2, lambda t: t.float(), TypeError, "tid2eid"),
    ("grouped_gemm", 1, drop_last_dim, opbridge.OpError, "b"),
    ("grouped_gemm", 2, to_i64, TypeError, "offsets"),
    ("grouped_gemm", 2, lambda t: t[:-1], opbridge.OpError, "offsets"),
    ("grouped_gemm", 2, to_meta, opbridge.OpError, "offsets"),
    ("grouped_gemm_masked", 2, lambda t: t[:-1], opbridge.OpError, "masked_m"),
    ("moe", 0, lambda t: t.int(), TypeError, "x"),
    ("moe", 1, lambda t: t[:-1], opbridge.OpError, "topk_weights"),
    ("moe", 2, lambda t: t.float(), TypeError, "topk_ids"),
    ("moe", 3, lambda t: t[:, :-1], opbridge.OpError, "w13"),
    ("moe", 4, drop_last_dim, opbridge.OpError, "w2"),
    ("moe", 4, to_meta, opbridge.OpError, "w2"),
    ("moe", "swiglu_limit", lambda c: -1.0, opbridge.OpError, "swiglu_limit"),
    ("moe", "activation", lambda a: "gelu", opbridge.OpError, "activation"),
    ("moe_permute", 1, lambda t: t.float(), TypeError, "topk_ids"),
    ("moe_combine", 3, lambda n: 4, opbridge.OpError, "num_tokens"),
    ("indexer_topk", 1, drop_last_dim, opbridge.OpError, "k"),
    ("indexer_topk", 2, lambda t: t.half(), TypeError, "weights"),
    ("indexer_topk", "cu_seqlens_k", lambda c: None, opbridge.OpError, "cu_seqlens_k"),
    ("indexer_topk", "compress_rate", lambda c: 4, opbridge.OpError, "q_positions"),
    ("indexer_topk", 0, lambda t: t.to(torch.float8_e4m3fn), opbridge.OpError, "q_scale"),
    ("indexer_logits", 0, lambda t: t[:, :, :-1], opbridge.OpError, "k"),
    ("indexer_topk_paged", 3, to_i64, TypeError, "context_lens"),
    ("indexer_topk_paged", 2, lambda t: t[:1], opbridge.OpError, "block_table"),
    ("kv_compress", 2, lambda t: t[:-1], opbridge.OpError, "position_bias"),
    ("kv_compress", "prev_gate", lambda t: None, opbridge.OpError, "prev_gate"),
    ("kv_compress", 3, lambda r: 0, opbridge.OpError, "rate"),
    ("sparse_attention", 1, drop_last_dim, opbridge.OpError, "kv"),
    ("sparse_attention", 2, to_i64, TypeError, "indices"),
    ("sparse_attention", "sink", lambda s: s[:-1], opbridge.OpError, "sink"),
    ("sparse_attention", "d_v", lambda d: 99, opbridge.OpError, "d_v"),
    ("sparse_attention", "extra_indices", lambda t: torch.zeros(6, 2, dtype=torch.int32), opbridge.OpError, "extra_kv"),
    ("sparse_attention", 0, to_meta, opbridge.OpError, "kv"),
    ("sparse_attention_paged", 2, lambda t: t.float(), TypeError, "block_table"),
    ("sparse_attention_paged", 3, lambda t: t[0], opbridge.OpError, "indices"),
    ("window_indices", 2, lambda w: 0, opbridge.OpError, "window"),
    ("sinkhorn", 0, lambda t: t[..., :-1], opbridge.OpError, "logits"),
    ("mhc_pre", 1, lambda t: t[:-1], opbridge.OpError, "phi"),
    ("mhc_pre", 2, lambda t: t.half(), TypeError, "alpha"),
    ("mhc_pre", 3, to_meta, opbridge.OpError, "bias"),
    ("mhc_post", 2, lambda t: t[..., :-1], opbridge.OpError, "post"),
    ("mhc_post", 3, lambda t: t.transpose(0, 1), opbridge.OpError, "comb"),
    ("mhc_post_pre", 4, lambda t: t[:, :-1], opbridge.OpError, "phi"),
]


@pytest.mark.parametrize("name, where, mutate, error, arg", CASES,
                         ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(name, where, mutate, error, arg, monkeypatch):
    ran = []
    monkeypatch.setattr(registry, "dispatch", lambda *a, **k: ran.append(a))
    args, kwargs = _mutate(name, where, mutate)
    with pytest.raises(error) as e:
        call(name, args, kwargs)
    msg = str(e.value)
    assert f"opbridge.{name}" in msg and f"'{arg}'" in msg, msg
    assert ran == []  # rejected before any backend ran


def test_every_op_has_bad_input_cases():
    assert {c[0] for c in CASES} == set(opbridge.OP_NAMES)


def test_error_types():
    assert issubclass(opbridge.OpError, ValueError) and issubclass(opbridge.OpTypeError, TypeError)
    e = opbridge.OpError("moe", "x", "[T, H]", "shape (3,)")
    assert (e.op, e.arg) == ("moe", "x") and str(e) == "opbridge.moe: argument 'x': expected [T, H], got shape (3,)"


# -- data-dependent checks: OPBRIDGE_VALIDATE=1 (and always on the reference backend) ----------

DATA_CASES = [
    ("moe", 2, lambda t: torch.where(t == 3, 4, t), "topk_ids"),
    ("moe", 2, lambda t: torch.where(t == -1, -2, t), "topk_ids"),
    ("moe_permute", 1, lambda t: torch.where(t == 3, 7, t), "topk_ids"),
    ("moe_route_hash", 1, lambda t: t + 10, "token_ids"),
    ("moe_route_hash", 2, lambda t: t + 4, "tid2eid"),
    ("grouped_gemm", 2, lambda t: torch.tensor([0, 3, 2, 5, 7], dtype=torch.int32), "offsets"),
    ("grouped_gemm", 2, lambda t: torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32), "offsets"),
    ("grouped_gemm_masked", 2, lambda t: t + 3, "masked_m"),
    ("moe_combine", 1, lambda t: t + 3, "src_index"),
    ("moe_combine", 1, lambda t: torch.where(t == 2, 3, t), "src_index"),  # duplicates
    ("sparse_attention", 2, lambda t: torch.where(t == 5, 6, t), "indices"),
    ("sparse_attention", 2, lambda t: torch.where(t == 5, 3, t), "indices"),  # duplicate in a row
    ("sparse_attention", 2, lambda t: torch.where(t == 2, 3, t), "indices"),  # past the first sequence's 3 keys
    ("sparse_attention_paged", 2, lambda t: t + 2, "block_table"),
    ("sparse_attention_paged", 3, lambda t: torch.where(t == 7, 8, t), "indices"),
    ("indexer_topk_paged", 3, lambda t: t + 1, "context_lens"),
    ("indexer_topk", "cu_seqlens_k", lambda t: torch.tensor([0, 3, 8], dtype=torch.int32), "cu_seqlens_k"),
]


@pytest.mark.parametrize("name, where, mutate, arg", DATA_CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(DATA_CASES)])
def test_out_of_range_data_rejected(name, where, mutate, arg, monkeypatch):
    args, kwargs = _mutate(name, where, mutate)
    monkeypatch.setenv("OPBRIDGE_VALIDATE", "1")
    with pytest.raises(opbridge.OpError) as e:
        call(name, args, kwargs)
    assert f"opbridge.{name}" in str(e.value) and f"'{arg}'" in str(e.value), str(e.value)


def test_quant_formats_checked():
    args, kwargs = samples()["grouped_gemm"]
    a, b, off = args
    with pytest.raises(opbridge.OpError, match="'a'"):
        opbridge.grouped_gemm(opbridge.quantize(a, "mxfp4") if a.shape[-1] % 32 == 0 else
                              opbridge.QuantTensor(a.to(torch.uint8), a.new_zeros(1), "mxfp4", (1, 32)), b, off)
    with pytest.raises(opbridge.OpError, match="'b'"):
        opbridge.grouped_gemm(a, opbridge.quantize(b, "fp8", (1, 128)), off)
    with pytest.raises(opbridge.OpError, match="'fmt'"):
        opbridge.QuantTensor(a, a, "int4", (1, 32))
