#!/usr/bin/env python3
"""The Python baseline of benches/perf.rs: Kensa's scoring written the way a user would write it
with PyTorch, as an anomalib-style PatchCore inference loop.

Same TorchScript backbone file, same bank file (a Kensa `.kbank`, read with safetensors), same
images and the same maths as Kensa (k x k average pooling, L2-normalised patch features, nearest
neighbour by `torch.cdist` -> 1 - cos, mean over layers, bilinear upsampling, Gaussian blur with
sigma 4, image score = max of the map; the input size and the per-layer aggregation are read from the
bank, as Kensa does), one image at a time: PIL decode, resize, normalise,
forward, nearest neighbour, post-process.

    python tools/baseline/patchcore_loop.py --backbone B.pt --bank bottle.kbank --out scores.json DIR

Prints one JSON line: images, seconds from process start (imports included), steady-state
images per second (after the first image), and writes {path: image score} to --out.
"""
import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def list_images(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p, followlinks=True):
                for f in files:
                    if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
                        out.append(os.path.join(root, f))
        else:
            out.append(p)
    return sorted(out)


def gaussian_kernel(sigma):
    radius = round(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma * sigma))
    return k / k.sum()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=0, help="input side (default: the bank's)")
    p.add_argument("images", nargs="+")
    a = p.parse_args()
    torch.set_grad_enabled(False)

    meta = json.load(open(a.backbone + ".json"))
    model = torch.jit.load(a.backbone).eval()
    tensors = load_file(a.bank)
    bank = [tensors[k] for k in sorted(k for k in tensors if k.startswith("layer"))]
    # The bank's recipe (as Kensa scores it): input size and per-layer aggregation.
    with safe_open(a.bank, framework="pt") as f:
        recipe = json.loads(f.metadata()["kensa"])
    size = a.size or recipe["input_size"]
    aggregation = recipe.get("aggregation") or [3] * len(bank)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    k = gaussian_kernel(4.0)
    pad = k.numel() // 2

    scores = {}
    files = list_images(a.images)
    t_first = None
    for i, path in enumerate(files):
        img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
        x = (x - mean) / std
        feats = model(x)
        layer_maps = []
        for f, b, agg in zip(feats, bank, aggregation):
            if agg > 1:
                f = F.avg_pool2d(f, agg, 1, agg // 2, count_include_pad=False)
            f = F.normalize(f, dim=1)
            _, c, h, w = f.shape
            emb = f.permute(0, 2, 3, 1).reshape(-1, c)
            d = torch.cdist(emb, b).min(dim=1).values  # |a-b|^2 = 2 - 2cos for unit vectors
            s = (d * d / 2).view(1, 1, h, w)
            layer_maps.append(F.interpolate(s, size=(size, size), mode="bilinear", align_corners=False))
        m = torch.stack(layer_maps).mean(0)
        m = F.conv2d(F.pad(m, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
        scores[path] = float(m.max())
        if i == 0:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    with open(a.out, "w") as f:
        json.dump(scores, f)
    steady = (len(files) - 1) / (t_end - t_first) if len(files) > 1 else math.nan
    print(json.dumps({"images": len(files), "seconds": t_end - T_START, "steady_img_s": steady,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    sys.exit(main())
