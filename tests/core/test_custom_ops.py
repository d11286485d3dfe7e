"""Every op is a registered PyTorch custom op that opcheck, torch.compile, torch.export and gradcheck accept."""
import pytest
import torch

import opbridge
from opbridge.core.opdef import OPS

from .samples import call, samples

SAMPLES = samples()


def test_every_op_has_a_sample_and_a_custom_op():
    assert set(SAMPLES) == set(opbridge.OP_NAMES) == set(OPS)
    for name in opbridge.OP_NAMES:
        assert hasattr(torch.ops.opbridge, name)


@pytest.mark.parametrize("name", opbridge.OP_NAMES)
def test_opcheck(name):
    args, kwargs = SAMPLES[name]
    op = OPS[name]
    flat = op.flatten(args, {k: v for k, v in kwargs.items() if k != "return_lse"} | _defaults(name, kwargs))
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if op.differentiable:
        flat = [x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in flat]
        tests = tests + ("test_autograd_registration",)
    torch.library.opcheck(op.op, tuple(flat), test_utils=tests)


def _defaults(name, kwargs):
    """Keyword arguments the public function would fill in with defaults."""
    import inspect

    sig = inspect.signature(getattr(opbridge, name))
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in kwargs and p.name != "return_lse"}


def _site():
    args, _ = SAMPLES["mhc_pre"]
    return args


def test_compile_fullgraph_through_ops():
    m_args, m_kw = SAMPLES["moe"]
    s_args, s_kw = SAMPLES["sparse_attention"]
    x, phi, alpha, bias = _site()
    f_args = SAMPLES["mhc_post"][0]

    def f(m_args, s_args, x, f_args):
        a = opbridge.moe(*m_args, **m_kw)
        b = opbridge.sparse_attention(*s_args, **s_kw)[0]
        y, post, comb = opbridge.mhc_pre(x, phi, alpha, bias)
        return a, b, opbridge.mhc_post(y, x, post, comb)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, want in zip(compiled(m_args, s_args, x, f_args), f(m_args, s_args, x, f_args)):
        torch.testing.assert_close(got, want)


def test_export_traces_through_ops():
    x, phi, alpha, bias = _site()

    class Site(torch.nn.Module):
        def forward(self, x):
            y, post, comb = opbridge.mhc_pre(x, phi, alpha, bias)
            return opbridge.mhc_post(y * 2, x, post, comb)

    ep = torch.export.export(Site(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "opbridge.mhc_pre.default" in targets and "opbridge.mhc_post.default" in targets
    torch.testing.assert_close(ep.module()(x), Site()(x))


def _f64(t):
    return t.detach().double().requires_grad_(t.is_floating_point())


def test_gradcheck_sinkhorn():
    lg = _f64(torch.randn(2, 4, 4))
    assert torch.autograd.gradcheck(lambda l: opbridge.sinkhorn(l, iters=6), (lg,))


def test_gradcheck_mhc_pre_post():
    x, phi, alpha, bias = (_f64(t) for t in _site())
    assert torch.autograd.gradcheck(lambda *a: opbridge.mhc_pre(*a, sinkhorn_iters=5), (x, phi, alpha, bias))
    y, post, comb = (t.detach().requires_grad_() for t in opbridge.mhc_pre(x, phi, alpha, bias))
    assert torch.autograd.gradcheck(opbridge.mhc_post, (y, x, post, comb))


def test_gradcheck_mhc_post_pre():
    x, phi, alpha, bias = (_f64(t) for t in _site())
    y, post, comb = (t.detach().requires_grad_() for t in opbridge.mhc_pre(x, phi, alpha, bias))
    assert torch.autograd.gradcheck(lambda *a: opbridge.mhc_post_pre(*a, sinkhorn_iters=3),
                                    (y, x, post, comb, phi, alpha, bias))


def test_gradcheck_moe_and_grouped_gemm():
    (x, tw, ids, w13, w2), kw = SAMPLES["moe"]
    x, tw, w13, w2 = _f64(x), _f64(tw), _f64(w13), _f64(w2)
    assert torch.autograd.gradcheck(lambda x, tw, a, b: opbridge.moe(x, tw, ids, a, b, swiglu_limit=0.5),
                                    (x, tw, w13, w2))
    (a, b, off), _ = SAMPLES["grouped_gemm"]
    assert torch.autograd.gradcheck(lambda a, b: opbridge.grouped_gemm(a, b, off, out_dtype=torch.float64),
                                    (_f64(a), _f64(b)))


def test_gradcheck_sparse_attention_and_kv_compress():
    (q, kv, idx), kw = SAMPLES["sparse_attention"]
    kw = dict(kw, return_lse=False)
    sink = _f64(kw.pop("sink"))
    assert torch.autograd.gradcheck(lambda q, kv, s: opbridge.sparse_attention(q, kv, idx, sink=s, **kw),
                                    (_f64(q), _f64(kv), sink))
    (kv, gate, pb, rate), kw = SAMPLES["kv_compress"]
    assert torch.autograd.gradcheck(lambda *a: opbridge.kv_compress(*a, rate, overlap=True), (_f64(kv), _f64(gate), _f64(pb)))


def test_quantized_weights_carry_through_the_op():
    (x, tw, ids, _, _), kw = SAMPLES["moe"]
    E, H, I = 4, x.shape[1], 32  # mxfp4 needs K (here I) a multiple of 32
    w13, w2 = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    q13, q2 = opbridge.quantize(w13, "fp8", (128, 128)), opbridge.quantize(w2, "mxfp4")
    got = opbridge.moe(x, tw, ids, q13, q2, **kw)
    want = opbridge.moe(x, tw, ids, opbridge.dequantize(q13), opbridge.dequantize(q2), **kw)
    torch.testing.assert_close(got, want)
    # and x still gets a gradient with quantized weights
    xg = x.detach().requires_grad_()
    opbridge.moe(xg, tw, ids, q13, q2, **kw).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("name", opbridge.OP_NAMES)
def test_every_sample_runs(name):
    args, kwargs = SAMPLES[name]
    out = call(name, args, kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(isinstance(o, torch.Tensor) for o in outs)
