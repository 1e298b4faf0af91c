"""Checks that need CUDA, for sessions with a GPU (CI has none): run, read, record.

    python benchmarks/gpu_checks.py

1. The pure-PyTorch Gaussian rasteriser agrees with gsplat's CUDA rasteriser (RGB and alpha of
   2,000 Gaussians from 4 orbit views at 64 px, fp32), and their timings.
2. A tiny critic scores in bfloat16 on CUDA and its margins match the fp32 ones within bf16
   precision; gradients reach the views.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from coherendream.cameras import Camera, camera_tensors


def _scene(n: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.03 + 0.005
    opacities = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    return [t.to(device) for t in (means, quats, scales, opacities, colors)]


def check_rasterisers() -> bool:
    from coherendream.generation.rasterize import rasterize_gaussians

    cams = [Camera.orbit(a, 15.0, 2.5, 40.0, 64) for a in (0, 90, 180, 270)]
    vm, ks = camera_tensors(cams, device="cuda")
    scene = _scene(2000, 2, "cuda")
    results = {}
    for backend in ("gsplat", "torch"):
        rasterize_gaussians(*scene, vm, ks, 64, 64, backend=backend)  # warm-up (gsplat compiles here)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = rasterize_gaussians(*scene, vm, ks, 64, 64, backend=backend)
        torch.cuda.synchronize()
        results[backend] = (out, time.perf_counter() - start)
    (ref, t_ref), (ours, t_ours) = results["gsplat"], results["torch"]
    rgb_err = (ours.rgb - ref.rgb).abs().max().item()
    alpha_err = (ours.alpha - ref.alpha).abs().max().item()
    ok = rgb_err < 2e-3 and alpha_err < 2e-3
    print(f"rasterisers: max |rgb| diff {rgb_err:.2e}, max |alpha| diff {alpha_err:.2e}; gsplat {t_ref * 1e3:.1f} ms, torch {t_ours * 1e3:.1f} ms -> {'ok' if ok else 'FAIL'}")
    return ok


def check_bf16_critic() -> bool:
    from coherendream.critic.model import Critic
    from coherendream.critic.tiny import build_tiny_critic

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_critic(tmp, image_size=64)
        views = torch.rand(4, 4, 3, 64, 64, device="cuda")
        prompts = ["a red cube", "two blue spheres", "a green cone on top of a yellow cube", "a black torus"]
        fp32 = Critic.from_pretrained(path, dtype="float32", device="cuda")
        bf16 = Critic.from_pretrained(path, dtype="bfloat16", device="cuda")
        with torch.no_grad():
            m32 = fp32.score(views, prompts).margin.float()
        v = views.clone().requires_grad_()
        m16 = bf16.score(v, prompts).margin.float()
        m16.sum().backward()
        err = (m16.detach() - m32).abs().max().item()
        ok = err < 0.05 and v.grad is not None and torch.isfinite(v.grad).all().item() and v.grad.abs().sum().item() > 0
        print(f"bf16 critic: max |margin| diff vs fp32 {err:.3e}, grad on views finite and non-zero -> {'ok' if ok else 'FAIL'}")
        return ok


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks are for GPU machines")
    print(f"device: {torch.cuda.get_device_name(0)}")
    ok = check_rasterisers() & check_bf16_critic()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
