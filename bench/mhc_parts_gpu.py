"""The three launches of mhc_pre (kernels/triton/mhc_pre.py) timed one by one at T=8192, n=4, C=7168, bf16,
over configuration variants, with the copy bandwidth of the same run: where the op's time goes.

    PYTHONPATH=. python bench/mhc_parts_gpu.py      # writes $OUT/h100-mhc-parts.json (OUT defaults to .)
"""
import sys, os, json, torch, triton
sys.path.insert(0, os.getcwd())
from opbridge.kernels.triton import mhc_pre as K
from opbridge.kernels.triton.mhc_common import phi_split_kernel
T, n, C = 8192, 4, 7168
torch.manual_seed(0)
dev = "cuda"
x = torch.randn(T, n, C, device=dev).bfloat16()
f = torch.randn(T, C, device=dev).bfloat16()
pin = torch.rand(T, n, device=dev); cin = torch.rand(T, n, n, device=dev)
phi = torch.randn(n * (n + 2), n * C, device=dev) * 0.01
alpha = torch.rand(3, device=dev); bias = torch.randn(n * (n + 2), device=dev)
NP, NPHI = 4, 32
split = torch.empty((2, NPHI, n * C), dtype=torch.bfloat16, device=dev)
phi_split_kernel[(triton.cdiv(n * C, 256),)](phi, split, n * C, NR=24, NPHI=NPHI, BK=256)
gb = x.numel() * 2 / 1e9
res = {}

def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

def k1(cfg, fuse=False):
    contig = not fuse and cfg.get("CONTIG", 1)
    bt, cc, nsub = cfg["BT"], cfg["CC"], cfg["NSUB"]
    S = triton.cdiv(n * C, NP * cc * nsub) if contig else triton.cdiv(C, cc * nsub)
    part = torch.empty((S, T, NPHI), device=dev); sq = torch.empty((S, T), device=dev)
    out = torch.empty_like(x)
    p = split if cfg.get("PHI2", 1) else phi
    xx = out if fuse else x
    fn = lambda: K._prenorm_gemm_kernel[(triton.cdiv(T, bt) * S,)](
        xx, f, x, pin, cin, p, part, sq, T, C, S, N=n, NP=NP, NPHI=NPHI, BT=bt, CC=cc, NSUB=nsub,
        PHI2=bool(cfg.get("PHI2", 1)), FUSE_POST=fuse, X_BF16=True, FP32_DOT=False, CONTIG=bool(contig),
        num_warps=cfg["w"], num_stages=cfg["s"])
    return fn, part, sq, S

for fuse, cfgs in ((False, [dict(BT=64, CC=32, NSUB=8, w=4, s=3), dict(BT=64, CC=32, NSUB=8, w=4, s=3, PHI2=0),
                            dict(BT=128, CC=32, NSUB=8, w=8, s=3), dict(BT=64, CC=32, NSUB=8, w=4, s=3, CONTIG=0),
                            dict(BT=64, CC=64, NSUB=4, w=4, s=3), dict(BT=64, CC=32, NSUB=16, w=4, s=4),
                            dict(BT=128, CC=32, NSUB=8, w=4, s=3), dict(BT=32, CC=64, NSUB=8, w=4, s=3)]),
                   (True, [dict(BT=64, CC=16, NSUB=16, w=4, s=3), dict(BT=32, CC=16, NSUB=16, w=4, s=3),
                           dict(BT=32, CC=32, NSUB=8, w=4, s=2), dict(BT=16, CC=64, NSUB=4, w=4, s=2),
                           dict(BT=64, CC=16, NSUB=16, w=8, s=3), dict(BT=16, CC=32, NSUB=8, w=2, s=3),
                           dict(BT=32, CC=16, NSUB=16, w=4, s=3, PHI2=0)])):
    for cfg in cfgs:
        try:
            fn, part, sq, S = k1(cfg, fuse)
            ms = bench(fn)
            key = f"K1 fuse={fuse} {cfg}"
            res[key] = ms
            moved = gb * (2.25 if fuse else 1.0)  # fused: residual read + new residual written + f
            print(key, round(ms, 4), "ms", round(moved / ms, 2), "TB/s", flush=True)
        except Exception as e:
            print("fail", cfg, repr(e)[:200])

fn, part, sq, S = k1(dict(BT=64, CC=32, NSUB=8, w=4, s=3))
fn()
pre, post = torch.empty((T, NP), device=dev), torch.empty((T, n), device=dev)
comb = torch.empty((T, n, n), device=dev)
for bt2, sb, w2 in ((32, 8, 4), (16, 8, 4), (64, 8, 8), (32, 16, 4), (16, 4, 2)):
    g = lambda: K._coeff_kernel[(triton.cdiv(T, bt2),)](  # noqa: E731
        part, sq, alpha, bias, pre, post, comb, T, C, S, 20, 1e-6, 1e-6, 2.0, N=n, NP=NP, NPHI=NPHI, BT=bt2, SB=sb,
        num_warps=w2)
    ms = bench(g); res[f"K2 {bt2} {sb} {w2}"] = ms; print("K2", bt2, sb, w2, round(ms, 4), flush=True)
y = torch.empty((T, C), dtype=x.dtype, device=dev)
for bt3, cc3, st, w3 in ((8, 256, 4, 4), (16, 128, 4, 4), (4, 512, 2, 4), (8, 256, 1, 4), (32, 64, 8, 4),
                         (8, 512, 2, 8), (16, 256, 2, 8), (2, 1024, 1, 4), (4, 1024, 1, 8)):
    ncb = triton.cdiv(C, cc3 * st)
    h = lambda: K._collapse_kernel[(triton.cdiv(T, bt3) * ncb,)](x, pre, y, T, C, ncb, N=n, NP=NP, BT=bt3, CC=cc3,
                                                                STEPS=st, num_warps=w3)
    ms = bench(h); res[f"K3 {bt3} {cc3} {st} {w3}"] = ms
    print("K3", bt3, cc3, st, w3, round(ms, 4), "ms", round(gb * 1.25 / ms, 2), "TB/s", flush=True)
copy = torch.empty_like(x)
ms = bench(lambda: copy.copy_(x)); print("copy", ms, 2 * gb / ms, "TB/s")
res["copy_TBps"] = 2 * gb / ms
res["device"] = torch.cuda.get_device_name()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "h100-mhc-parts.json"), "w"), indent=1)
