"""`vwe bench infer`: images/s of the 4-scale + flip CAM inference, against the published code's way.

Both take the same VOC-sized images (uint8, 375 x 500 by default) and the same network (random weights:
speed does not depend on their values). The published code's way is what the published code did: per image
and scale, PIL resize, float32 NumPy normalisation, the image and its flip in one fp32 NCHW forward of
the whole network (word heads included), a pickled dict per image. vwe's way: the CAM path only,
images of equal size batched with their flips, frozen BatchNorm folded into the convolutions,
channels_last, autocast per `infer.mixed_precision`, resizing on uint8 tensors, an .npz per image.
"""
from __future__ import annotations

import copy
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vwe.formats.cams import CamRecord, write_cam
from vwe.formats.config import Config
from vwe.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_pair
from vwe.runtime.device import autocast as device_autocast, synchronize
from vwe.runtime.files import atomic_write
from vwe.runtime.errors import VweError
from vwe.stages.infer import device_scales, keep_positive, multiscale_cams
from vwe.nets.backbone import FROZEN_NORMS, fold_frozen_bn
from vwe.bench.launches import pace_note, step_launches
from vwe.bench.train import peak_tflops
from vwe.nets.cam import build_model


def _images(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(n)]


def _labels(n: int, classes: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(n):
        v = torch.zeros(classes)
        v[rng.choice(classes, size=2, replace=False)] = 1
        out.append(v)
    return out


def published_path(model: torch.nn.Module, images: list[np.ndarray], labels: list[torch.Tensor],
                    scales: list[float], out: Path, device: torch.device) -> None:
    """The published code's way, one image at a time."""
    feats: dict = {}
    hook = model.backbone.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    for i, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        high = strided = 0
        for s in scales:
            im = Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC)
            x = (np.asarray(im, np.float32) / 255.0 - mean) / std
            x = np.stack([x, x[:, ::-1]]).transpose(0, 3, 1, 2).copy()
            with torch.no_grad():
                model(torch.from_numpy(x).to(device))  # the whole network, as the published code ran it
                cam = F.relu(F.conv2d(feats["f"], model.classifier.weight))
            cam = torch.maximum(cam[0:1], cam[1:2].flip(-1))
            high = high + F.interpolate(cam, (h, w), mode="bilinear", align_corners=False)[0]
            strided = strided + F.interpolate(cam, (-(-h // 4), -(-w // 4)), mode="bilinear",
                                              align_corners=False)[0]
        keys, (hr, st) = keep_positive(lab, high, strided)
        np.save(out / f"{i}.npy", {"keys": keys, "cam": st.cpu().numpy(), "high_res": hr.cpu().numpy()},
                allow_pickle=True)
    hook.remove()


def ours(model: torch.nn.Module, images: list[np.ndarray], labels: list[torch.Tensor], scales: list[float],
         out: Path, device: torch.device, batch: int, autocast, store, channels_last: bool,
         resize: str = "bicubic") -> None:
    """vwe's inference path on the same images (equal sizes here, so batches are full)."""
    for start in range(0, len(images), batch):
        group = [Image.fromarray(im) for im in images[start:start + batch]]
        w, h = group[0].size
        per_scale = []
        for s in scales:  # what the inference loader does: uint8 resize, image + flip
            pairs = [resize_pair(g, s, True, resize) for g in group]
            per_scale.append(torch.cat([p[0:1] for p in pairs] + [p[1:2] for p in pairs]))
        high, strided = multiscale_cams(model, per_scale, (h, w), device, channels_last, autocast)
        for j in range(len(group)):
            keys, (hr, st) = keep_positive(labels[start + j], high[j], strided[j])
            write_cam(out / f"{start + j}.npz",
                      CamRecord(keys, st.cpu().numpy().astype(store), hr.cpu().numpy().astype(store), "bench"))


def _timed(device: torch.device, fn, *args) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - t0


def cam_flops(model: torch.nn.Module, size: tuple[int, int], scales: list[float], device: torch.device) -> float:
    """FLOPs of the CAM path for one image: every scale, the image and its flip (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    h, w = size
    with torch.no_grad(), counter:
        for s in scales:
            model.cam(torch.zeros(2, 3, round(h * s), round(w * s), device=device))
    return float(counter.get_total_flops())


COMPILE_SIZES = [(375, 500), (333, 500), (500, 375)]  # common VOC image sizes


def _model_config(cfg: Config):
    """cfg.model with random weights (speed does not depend on them) and no gradient checkpointing."""
    mcfg = copy.deepcopy(cfg.model)
    mcfg.pretrained, mcfg.grad_checkpointing = "none", False
    return mcfg


def _fast(net: torch.nn.Module, mcfg) -> tuple[torch.nn.Module, int]:
    """vwe's inference form of `net`, in place: frozen BN folded (how many layers), channels_last per config."""
    folded = fold_frozen_bn(net) if mcfg.norm in FROZEN_NORMS else 0
    return (net.to(memory_format=torch.channels_last) if mcfg.channels_last else net), folded


def _device_name(device: torch.device) -> str:
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def _peak(cfg: Config, device: torch.device) -> float:
    """The device's peak TFLOP/s in the precision of cfg.infer.mixed_precision."""
    return peak_tflops(device, "bf16" if cfg.infer.mixed_precision == "bf16" else "no")


def compile_comparison(cfg: Config, device: torch.device, rounds: int) -> dict:
    """The CAM network eager against torch.compile (inductor, weight freezing, dynamic shapes, so VOC's
    many image sizes share one graph): seconds per image over a few VOC sizes at every scale with its
    flip, the best of `rounds` passes after a first (compiling) pass, and the largest difference."""
    mcfg = _model_config(cfg)
    torch.manual_seed(0)
    net, _ = _fast(build_model(mcfg).eval().to(device), mcfg)
    fmt = torch.channels_last if mcfg.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, round(h * s), round(w * s), generator=gen).to(device).contiguous(memory_format=fmt)
              for h, w in COMPILE_SIZES for s in cfg.infer.scales]
    autocast = functools.partial(device_autocast, cfg.infer.mixed_precision, device)
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(net.cam, dynamic=True)

    def one_pass(fn) -> float:
        """Seconds for every input (all sizes and scales)."""
        return _timed(device, lambda: [fn(x) for x in inputs])

    # rounds alternate between the two, so drift in the machine's speed hits both alike
    with torch.no_grad(), autocast(), torch._inductor.config.patch(freezing=True):
        first_eager, first_compiled = one_pass(net.cam), one_pass(compiled)
        eager, comp = [], []
        for _ in range(rounds):
            eager.append(one_pass(net.cam) / len(COMPILE_SIZES))
            comp.append(one_pass(compiled) / len(COMPILE_SIZES))
        diff = max(float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))
                   for a, b in ((net.cam(x), compiled(x)) for x in inputs[:len(cfg.infer.scales)]))
    flops = sum(cam_flops(net, size, list(cfg.infer.scales), device) for size in COMPILE_SIZES) / len(COMPILE_SIZES)
    peak = _peak(cfg, device)
    best_e, best_c = min(eager), min(comp)
    return {"device": _device_name(device),
            "threads": torch.get_num_threads(), "backbone": mcfg.backbone, "mixed_precision": cfg.infer.mixed_precision,
            "channels_last": mcfg.channels_last, "image_sizes": COMPILE_SIZES, "scales": list(cfg.infer.scales),
            "gflops_per_image": round(flops / 1e9, 1), "peak_tflops": round(peak, 3),
            "eager_s_per_image": [round(t, 4) for t in eager], "compiled_s_per_image": [round(t, 4) for t in comp],
            "first_pass_s": {"eager": round(first_eager, 1), "compiled": round(first_compiled, 1)},
            "gain_pct": round(100 * (best_e / best_c - 1), 1),
            "eager_mfu": round(flops / best_e / (peak * 1e12), 3) if peak else None,
            "compiled_mfu": round(flops / best_c / (peak * 1e12), 3) if peak else None,
            "max_rel_diff": round(diff, 5),
            # graphs dynamo compiled: 1 when every size and scale shares the dynamic-shape graph
            "compiled_graphs": counters["stats"]["unique_graphs"]}


def distinct_sizes(n: int) -> list[tuple[int, int]]:
    """n VOC-like image sizes (h, w), all different: long side 500, short side 250-499, both orientations."""
    return [(500, 499 - k // 2) if k % 2 else (499 - k // 2, 500) for k in range(n)]


def sizes_comparison(cfg: Config, device: torch.device, n: int) -> dict:
    """Seconds per image on the device (every scale, the image and its flip, one image per forward, as
    `vwe infer` runs where sizes differ) at one size seen before, over n sizes each met for the first
    time, then over the same n sizes again. The first pass minus the second is what meeting a new input
    shape costs (on a GPU, cuDNN builds an execution plan per convolution and shape); the second pass
    against the repeated size is what the size itself costs. On a GPU the three passes run again without
    cuDNN, on other sizes (`without_cudnn`). The scales are made beforehand: only the network, the CAM
    upsampling and one copy to the host per image are timed."""
    mcfg = _model_config(cfg)
    torch.manual_seed(0)
    net, _ = _fast(build_model(mcfg).eval().to(device), mcfg)
    autocast = functools.partial(device_autocast, cfg.infer.mixed_precision, device)
    scales, gen = list(cfg.infer.scales), torch.Generator().manual_seed(0)

    def inputs(size: tuple[int, int]) -> list[torch.Tensor]:
        image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=gen).to(device)
        return device_scales(image, scales, cfg.infer.flip, cfg.data.resize)

    def one_pass(batches: list[tuple[tuple[int, int], list[torch.Tensor]]]) -> float:
        """Seconds per image over `batches`, each image's CAMs brought to the host as `vwe infer` does."""
        def go():
            for size, per_scale in batches:
                high, _ = multiscale_cams(net, per_scale, size, device, mcfg.channels_last, autocast,
                                          cfg.infer.flip)
                high.cpu()
        return _timed(device, go) / len(batches)

    known = [((375, 500), inputs((375, 500)))]  # the repeated size's one image

    def three_passes(sizes: list[tuple[int, int]]) -> dict:
        same = known * n
        fresh = [(size, inputs(size)) for size in sizes]
        one_pass(same[:2])  # the repeated size's first meeting is not part of its figure
        repeated = one_pass(same)
        first, second = one_pass(fresh), one_pass(fresh)
        return {"repeated_size_s_per_image": round(repeated, 4), "new_sizes_first_s_per_image": round(first, 4),
                "new_sizes_again_s_per_image": round(second, 4),
                "new_shape_cost_s_per_image": round(first - second, 4)}

    sizes = distinct_sizes(2 * n)
    figures = {"device": _device_name(device), "threads": torch.get_num_threads(), "backbone": mcfg.backbone,
               "mixed_precision": cfg.infer.mixed_precision, "scales": scales, "flip": cfg.infer.flip, "images": n,
               **three_passes(sizes[:n])}
    # one image at the repeated size: the ops it dispatches and (GPU) its kernels, against its seconds
    figures["pace"] = step_launches(lambda: one_pass(known), device)
    if device.type == "cuda":  # PyTorch's own convolutions (im2col and cuBLAS) build no per-shape cuDNN plan
        with torch.backends.cudnn.flags(enabled=False):
            figures["without_cudnn"] = three_passes(sizes[n:])
    return figures


def sizes_lines(f: dict) -> list[str]:
    """The printed form of sizes_comparison's figures."""
    def block(g: dict, label: str) -> list[str]:
        return [f"  {label}one size, seen before: {g['repeated_size_s_per_image']}",
                f"  {label}{f['images']} new sizes, first meeting: {g['new_sizes_first_s_per_image']}",
                f"  {label}the same sizes, second meeting: {g['new_sizes_again_s_per_image']}",
                f"  {label}cost of meeting a new size: {g['new_shape_cost_s_per_image']} s per image"]
    lines = [f"CAM network on {f['device']} ({f['backbone']}, {f['mixed_precision']}, scales {f['scales']}"
             f"{' + flips' if f['flip'] else ''}, one image per forward), seconds per image:", *block(f, "")]
    if "without_cudnn" in f:
        lines += block(f["without_cudnn"], "without cuDNN (other sizes): ")
    lines.append(f"  pace at the repeated size: {pace_note(f['pace'], f['repeated_size_s_per_image'], 'image')}")
    return lines


def run(cfg: Config, args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compare = getattr(args, "compare", None)
    if compare not in (None, "compile", "sizes"):
        raise VweError(f"vwe bench infer --compare takes 'compile' or 'sizes', got {compare!r}")
    if compare == "sizes":
        f = sizes_comparison(cfg, device, n=args.steps or 8)
        print("\n".join(sizes_lines(f)))
        if args.json:
            atomic_write(args.json, json.dumps(f, indent=2))
        return 0
    if compare == "compile":
        f = compile_comparison(cfg, device, rounds=args.steps or 3)
        print(f"CAM network, eager vs torch.compile (inductor, freezing, dynamic shapes), {f['device']}, "
              f"{f['mixed_precision']}, {f['backbone']}, sizes {f['image_sizes']} x scales {f['scales']} + flips:")
        print(f"  eager    s/image {f['eager_s_per_image']} (first pass {f['first_pass_s']['eager']} s), "
              f"MFU {f['eager_mfu']}")
        print(f"  compiled s/image {f['compiled_s_per_image']} (first pass, compiling, "
              f"{f['first_pass_s']['compiled']} s), MFU {f['compiled_mfu']}")
        print(f"  gain {f['gain_pct']}% (best passes); largest relative difference {f['max_rel_diff']}; "
              f"{f['compiled_graphs']} compiled graph(s)")
        if args.json:
            atomic_write(args.json, json.dumps(f, indent=2))
        return 0
    n = args.steps or 4
    size = (375, 500)
    scales = list(cfg.infer.scales)
    mcfg = _model_config(cfg)
    images, labels = _images(n, size), _labels(n, mcfg.num_classes)

    torch.manual_seed(0)
    base = build_model(mcfg).eval().to(device).to(memory_format=torch.contiguous_format)
    fast, folded = _fast(copy.deepcopy(base), mcfg)
    autocast = functools.partial(device_autocast, cfg.infer.mixed_precision, device)
    store = np.float16 if cfg.infer.dtype == "float16" else np.float32

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.mkdir(), b.mkdir()
        published_path(base, images[:1], labels[:1], scales, a, device)  # warm-up
        # warm-up on every batch shape the timed run meets (a full batch and the remainder): a GPU's
        # first use of a shape loads and selects kernels
        warm = min(n, cfg.infer.batch_size + n % cfg.infer.batch_size)
        ours(fast, images[:warm], labels[:warm], scales, b, device, cfg.infer.batch_size, autocast, store,
             mcfg.channels_last, cfg.data.resize)
        t_base = _timed(device, published_path, base, images, labels, scales, a, device)
        t_ours = _timed(device, ours, fast, images, labels, scales, b, device, cfg.infer.batch_size, autocast, store,
                        mcfg.channels_last, cfg.data.resize)
        # the two paths must agree on what they compute (up to mixed precision and fp16 storage)
        ref = np.load(a / "0.npy", allow_pickle=True).item()["high_res"]
        with np.load(b / "0.npz") as z:
            diff = float(np.abs(z["high_res"].astype(np.float32) - ref).max())

    flops = cam_flops(fast, size, scales, device)
    peak_fp32, peak_ours = peak_tflops(device, "no"), _peak(cfg, device)
    figures = {
        "device": _device_name(device),
        "threads": torch.get_num_threads(), "backbone": mcfg.backbone, "norm": mcfg.norm,
        "bn_folded": folded, "image_size": list(size), "images": n, "scales": scales,
        "batch_size": cfg.infer.batch_size, "mixed_precision": cfg.infer.mixed_precision,
        "straightforward_img_s": round(n / t_base, 3), "vwe_img_s": round(n / t_ours, 3),
        "speedup": round(t_base / t_ours, 2), "max_abs_diff_high_res": round(diff, 4),
        "gflops_per_image": round(flops / 1e9, 2),
        # MFU against the device's peak in each path's precision (CPU: measured matmul peak)
        "straightforward_mfu": round(flops * n / t_base / (peak_fp32 * 1e12), 4) if peak_fp32 else None,
        "vwe_mfu": round(flops * n / t_ours / (peak_ours * 1e12), 4) if peak_ours else None,
    }
    print(f"inference ({mcfg.backbone}, {n} images {size[1]}x{size[0]}, scales {scales}, + flips, {device}):")
    print(f"  published code (fp32 NCHW, whole network, per image, pickle): {figures['straightforward_img_s']:.3f} img/s")
    print(f"  vwe (CAM path, batch {cfg.infer.batch_size}, folded BN {folded}, channels_last {mcfg.channels_last}, "
          f"{cfg.infer.mixed_precision}): {figures['vwe_img_s']:.3f} img/s  -> {figures['speedup']:.2f}x")
    print(f"  max |high_res difference| between the two: {diff:.4f}")
    print(f"  {figures['gflops_per_image']} GFLOP per image (CAM path, all scales and flips); MFU published code "
          f"{figures['straightforward_mfu']}, vwe {figures['vwe_mfu']}")
    if args.json:
        atomic_write(args.json, json.dumps(figures, indent=2))
    return 0
