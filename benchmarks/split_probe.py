"""Float32 products on TF32 tensor cores with the inputs split in two
(``x = hi + lo``, ``hi`` on the TF32 grid): speed and accuracy against IEEE
float32 for the shapes dpft's per-example norms use (CUDA).

    python -m benchmarks.split_probe
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gram_probe import _time_us

MASK = -8192  # 0xFFFFE000: sign, exponent and the 10 mantissa bits TF32 keeps


def split(x: torch.Tensor, nearest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    bits = x.view(torch.int32)
    hi = ((bits + 0x1000) if nearest else bits).bitwise_and_(MASK).view(torch.float32)
    return hi, x - hi


def _prec(mode: str) -> None:
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def gram_ieee(x):
    _prec("ieee")
    return torch.bmm(x, x.mT)


def gram_split(x, nearest=True):
    hi, lo = split(x, nearest)
    _prec("tf32")
    m = torch.bmm(hi, hi.mT)
    m.baddbmm_(lo, hi.mT, alpha=2.0)  # sym(m) = hi hi^T + lo hi^T + hi lo^T
    return m


def gram_tf32(x):
    _prec("tf32")
    return torch.bmm(x, x.mT)


def ghost(a, g, gram):
    ma, mg = gram(a), gram(g)
    return 0.5 * (ma * (mg + mg.mT)).sum(dim=(1, 2))


def pe_ieee(u, g):
    _prec("ieee")
    return torch.bmm(u, g)


def pe_split(u, g):
    uh, ul = split(u)
    gh, gl = split(g)
    _prec("tf32")
    out = torch.bmm(uh, gh)
    out.baddbmm_(uh, gl)
    out.baddbmm_(ul, gh)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    dev = "cuda"
    n = args.batch
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("## Gram X X^T (us) and ghost-norm relative error vs float64")
    for t, p, d, layers in [
        (197, 768, 3072, 1),
        (197, 768, 2304, 1),
        (197, 3072, 768, 1),
        (197, 768, 768, 12),
        (100, 768, 768, 12),
        (256, 768, 768, 12),
        (256, 768, 3072, 1),
    ]:
        a = torch.randn(layers * n, t, p, device=dev)
        g = torch.randn(layers * n, t, d, device=dev) * 1e-3
        # a structured case: a shared mean (large Gram entries, the norm from cancellation-free sums)
        a2 = a + 3.0
        ref = (a.double().mT @ g.double()).square().sum(dim=(1, 2))
        ref2 = (a2.double().mT @ g.double()).square().sum(dim=(1, 2))
        row = [f"T={t} p={p} d={d} x{layers}"]
        for name, fn in [
            ("ieee", gram_ieee),
            ("tf32", gram_tf32),
            ("split", gram_split),
            ("split-trunc", lambda x: gram_split(x, False)),
        ]:
            us = _time_us(lambda fn=fn, a=a, g=g: (fn(a), fn(g)))
            e1 = ((ghost(a, g, fn).double() - ref).abs() / ref).max().item()
            e2 = ((ghost(a2, g, fn).double() - ref2).abs() / ref2).max().item()
            row.append(f"{name} {us:.0f}us err {e1:.1e}/{e2:.1e}")
        usplit = _time_us(lambda a=a, g=g: (split(a), split(g)))
        row.append(f"(split kernels alone {usplit:.0f}us)")
        print(" | ".join(row), flush=True)
        del a, g, a2
    print("## per-example product U^T G (conv unfold shapes) (us), relative error vs float64")
    for k, t, dd in [
        (576, 3136, 64),
        (64, 3136, 256),
        (256, 3136, 64),
        (1152, 784, 128),
        (2304, 196, 256),
        (4608, 49, 512),
        (512, 784, 128),
    ]:
        u = torch.randn(n, k, t, device=dev)
        g = torch.randn(n, t, dd, device=dev)
        ref = torch.bmm(u.double(), g.double())
        row = [f"K={k} T={t} D={dd}"]
        for name, fn in [("ieee", pe_ieee), ("split", pe_split)]:
            us = _time_us(lambda fn=fn, u=u, g=g: fn(u, g))
            out = fn(u, g).double()
            err = ((out - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max().item()
            row.append(f"{name} {us:.0f}us err {err:.1e}")
        print(" | ".join(row), flush=True)
        del u, g, ref
    print("## conv weight gradient (B summed) (us)")
    for c, hw, o, ks in [(64, 56, 64, 3), (128, 28, 128, 3), (256, 14, 256, 3), (512, 7, 512, 3), (256, 56, 64, 1)]:
        x = torch.randn(n, c, hw, hw, device=dev)
        gy = torch.randn(n, o, hw, hw, device=dev)
        w = torch.empty(o, c, ks, ks, device=dev)
        pad = ks // 2

        def wg(xx, gg):
            return torch.ops.aten.convolution_backward(
                gg, xx, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, (False, True, False)
            )[1]

        def ieee():
            _prec("ieee")
            return wg(x, gy)

        def tf32():
            _prec("tf32")
            return wg(x, gy)

        def split3():
            xh, xl = split(x)
            gh, gl = split(gy)
            _prec("tf32")
            return wg(xh, gh) + wg(xh, gl) + wg(xl, gh)

        row = [f"C={c} HW={hw} O={o} k={ks}"]
        base = ieee().double()
        for name, fn in [("ieee", ieee), ("tf32", tf32), ("split3", split3)]:
            us = _time_us(fn)
            err = ((fn().double() - base).norm() / base.norm()).item()
            row.append(f"{name} {us:.0f}us dev-vs-ieee {err:.1e}")
        print(" | ".join(row), flush=True)
    _prec("ieee")


if __name__ == "__main__":
    main()
