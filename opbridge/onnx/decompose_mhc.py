"""mHC in standard ONNX ops (OPS.md section 4): Sinkhorn unrolled for its fixed iteration count.

Precision follows the reference backend: float32 math (float64 when the streams are float64),
outputs cast back where OPS.md says so.
"""
from __future__ import annotations

from typing import Any, Optional

from .builder import Args, Builder, rank, sdim
from .translations import decomposition


def sinkhorn_nodes(g: Builder, logits: Any, iters: int, eps: float, dt) -> Any:
    """``M = softmax_rows + eps; M /= colsum + eps``; then ``iters - 1`` row and column passes."""
    op = g.op
    e = g.f(eps, dt)
    M = op.Add(op.Softmax(g.cast(logits, dt), axis=-1), e)
    M = op.Div(M, op.Add(g.sum(M, -2, keepdims=True), e))
    for _ in range(iters - 1):
        M = op.Div(M, op.Add(g.sum(M, -1, keepdims=True), e))
        M = op.Div(M, op.Add(g.sum(M, -2, keepdims=True), e))
    return M


@decomposition("sinkhorn")
def sinkhorn(g: Builder, a: Args) -> Any:
    return sinkhorn_nodes(g, a.logits, a.iters, a.eps, g.wide(a.logits))


def _static_streams(arg: str):
    def why_not(a: Args) -> Optional[str]:
        x = getattr(a, arg)
        for axis, what in ((-2, "stream count n"), (-1, "stream width C")):
            if not isinstance(x.shape[axis], int):
                return f"the {what} of '{arg}' must be static, it is {x.shape[axis]}"
        return None
    return why_not


def pre_nodes(g: Builder, x: Any, like: Any, phi: Any, alpha: Any, bias: Any, iters: int, eps: float,
              norm_eps: float, post_scale: float) -> tuple[Any, Any, Any]:
    """``like``: a graph input with x's dtype and static shape (x itself may be an intermediate)."""
    op = g.op
    n, C = sdim(like, -2), sdim(like, -1)
    dt = g.wide(like)
    xs = g.cast(x, dt)
    lead = op.Shape(x, start=0, end=rank(like) - 2)
    xf = g.reshape(xs, lead, n * C)
    r = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(xf, xf), g.i64(-1), keepdims=1), g.f(norm_eps, dt))))
    m = op.Mul(op.MatMul(xf, op.Transpose(g.cast(phi, dt), perm=[1, 0])), r)
    al, b = g.cast(alpha, dt), g.cast(bias, dt)

    def coeff(i: int, lo: int, hi: int) -> Any:
        a_i = op.Gather(al, g.s64(i), axis=0)
        return op.Add(op.Mul(a_i, g.slice(m, lo, hi, -1)), g.slice(b, lo, hi, 0))

    pre = op.Add(op.Sigmoid(coeff(0, 0, n)), g.f(eps, dt))
    post = op.Mul(g.f(post_scale, dt), op.Sigmoid(coeff(1, n, 2 * n)))
    L = g.reshape(coeff(2, 2 * n, n * (n + 2)), lead, n, n)
    comb = sinkhorn_nodes(g, L, iters, eps, dt)
    y = g.sum(op.Mul(g.unsq(pre, -1), xs), -2)
    return g.cast(y, like.dtype), post, comb


@decomposition("mhc_pre", why_not=_static_streams("x"))
def mhc_pre(g: Builder, a: Args) -> tuple[Any, Any, Any]:
    return pre_nodes(g, a.x, a.x, a.phi, a.alpha, a.bias, a.sinkhorn_iters, a.eps, a.norm_eps, a.post_scale)


def post_nodes(g: Builder, f: Any, residual: Any, post: Any, comb: Any) -> Any:
    op = g.op
    dt = g.wide(f, residual, post, comb)
    # out[k] = post[k] * f + sum_j comb[j, k] * residual[j]: column k of comb feeds stream k, i.e. comb^T @ residual
    mixed = op.MatMul(g.transpose_last2(g.cast(comb, dt), rank(comb)), g.cast(residual, dt))
    out = op.Add(op.Mul(g.unsq(g.cast(post, dt), -1), g.unsq(g.cast(f, dt), -2)), mixed)
    return g.cast(out, residual.dtype)


@decomposition("mhc_post")
def mhc_post(g: Builder, a: Args) -> Any:
    return post_nodes(g, a.f, a.residual, a.post, a.comb)


@decomposition("mhc_post_pre", why_not=_static_streams("residual"))
def mhc_post_pre(g: Builder, a: Args) -> tuple[Any, Any, Any, Any]:
    new_residual = post_nodes(g, a.f, a.residual, a.post, a.comb)
    y, post, comb = pre_nodes(g, new_residual, a.residual, a.phi, a.alpha, a.bias, a.sinkhorn_iters, a.eps, a.norm_eps,
                              a.post_scale)
    return new_residual, y, post, comb
