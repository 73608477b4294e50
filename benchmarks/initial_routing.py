"""How balanced the routing of a freshly built (or freshly upcycled) model is: each MoE layer's busiest/mean
expert load at initialisation, in eval mode, on random inputs and on the synthetic images.

For each start (a fresh `--model`; the same shape upcycled from a randomly initialised dense timm ViT, no
download) and each gate initialisation (zeros, the old default; `--gate-init-std`, None: the model's
default; the default gates with selection biases calibrated as a training run does before step 1,
moevit.train.router_calibration, on `--calib` other images of the same kind), one eval-mode forward per
input kind of each of `--batch` sizes (the first N of the same images):

- random: standard normal pixels;
- synthetic: the embedded classification images (moevit.data.synth, rendered in memory at their native
  size), through the real evaluation transform (timm's resize + centre crop to the model's size, ImageNet
  normalisation).

Prints one line per (start, gate init, inputs, batch) with the ratio of every MoE layer (1.0: even; E/K: every
token on the same K experts) and the worst one. Not a test: tests/unit/test_initial_routing.py asserts.

    PYTHONPATH=. python benchmarks/initial_routing.py --model moevit_small --batch 8,64,128 --calib 512 [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import timm
import torch
from torchvision import tv_tensors

from moevit.data.synth.imagenet import render_classification_image
from moevit.data.synth.spec import HUE_FAMILIES, IMAGENET_CLASSES, IMAGENET_IMAGE_SIZE, sample_rng
from moevit.data.transforms import build_transforms
from moevit.models.moe_vit import MoEViT
from moevit.models.registry import create_model
from moevit.models.upcycle import upcycle_timm_vit
from moevit.train.router_calibration import calibrate_task

TASK = "probe"
# The dense timm ViT each variant upcycles from (same width, depth and heads).
DENSE_VIT = {
    "moevit_debug": None,
    "moevit_tiny": "vit_tiny_patch16_224",
    "moevit_small": "vit_small_patch16_224",
    "moevit_base": "vit_base_patch16_224",
}


def synthetic_images(count: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """`count` synthetic classification images (classes in turn), as the evaluation transform feeds them."""
    transform = build_transforms("classification", train=False, image_size=image_size)
    images = []
    for i in range(count):
        family = HUE_FAMILIES[IMAGENET_CLASSES[i % len(IMAGENET_CLASSES)]]
        picture = render_classification_image(
            sample_rng(seed, "initial routing", i), family, IMAGENET_IMAGE_SIZE
        )
        pixels = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).contiguous()
        images.append(transform({"image": tv_tensors.Image(pixels), "key": str(i)})["image"])
    return torch.stack([image.as_subclass(torch.Tensor) for image in images])


def random_images(count: int, image_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def load_ratios(model: MoEViT, images: torch.Tensor, task: str = TASK) -> dict[str, float]:
    """{layer: busiest/mean expert load} of one eval-mode forward."""
    was_training = model.training
    model.eval()
    try:
        routing = model.forward_backbone(images, task).routing
    finally:
        model.train(was_training)
    return {layer: r.busiest_over_mean() for layer, r in routing.items()}


def build_start(start: str, model_name: str, seed: int, **router_args) -> MoEViT:
    """A fresh `model_name`, or one upcycled from a randomly initialised dense timm ViT of its shape."""
    if start == "fresh":
        torch.manual_seed(seed)
        return create_model(model_name, tasks=[TASK], **router_args)
    dense_name = DENSE_VIT[model_name]
    if dense_name is None:
        raise ValueError(f"{model_name} has no dense timm counterpart to upcycle from")
    with torch.device("meta"):  # only the variant's E and K are read
        layer = next(iter(create_model(model_name, tasks=[TASK]).mlp_layers().values()))
    torch.manual_seed(seed)
    dense = timm.create_model(dense_name, pretrained=False)
    return upcycle_timm_vit(dense, layer.num_experts, layer.top_k, [TASK], **router_args)


def report(model: str, start: str, gates: str, inputs: str, batch: int, ratios: dict[str, float]) -> dict:
    layers = " ".join(f"{value:.2f}" for value in ratios.values())
    print(
        f"{model} {start:8s} {gates:12s} {inputs:9s} {batch:4d} images, busiest/mean per layer: {layers}"
        f"  (max {max(ratios.values()):.2f})",
        flush=True,
    )
    return {"start": start, "gates": gates, "inputs": inputs, "batch": batch, "ratios": ratios}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moevit_small")
    parser.add_argument("--batch", default="128", help="images per forward; a comma list measures each")
    parser.add_argument("--calib", type=int, default=512, help="calibration images (0: no calibrated rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gate-init-std", type=float, default=None, help="None: the model's default")
    parser.add_argument("--starts", default="fresh,upcycled")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    inits = {"zero gates": {"gate_init_std": 0.0}, "default init": {}}
    if args.gate_init_std is not None:
        inits["default init"] = {"gate_init_std": args.gate_init_std}
    batches = [int(size) for size in args.batch.split(",")]
    rows = []
    for start in args.starts.split(","):
        for init_name, router_args in inits.items():
            model = build_start(start, args.model, args.seed, **router_args)
            size = model.patch_embed.img_size[0]
            for inputs, make in (("random", random_images), ("synthetic", synthetic_images)):
                images = make(max(batches), size, args.seed)
                for batch in batches:
                    ratios = load_ratios(model, images[:batch])
                    rows.append(report(args.model, start, init_name, inputs, batch, ratios))
                if init_name == "default init" and args.calib:
                    # Calibrated on other images of the kind (another seed), measured on the same batches.
                    calibrated = copy.deepcopy(model)
                    calibration = make(args.calib, size, args.seed + 1)
                    calibrate_task(
                        calibrated, TASK, list(calibration.split(max(batches))), torch.device("cpu")
                    )
                    for batch in batches:
                        ratios = load_ratios(calibrated, images[:batch])
                        rows.append(report(args.model, start, "calibrated", inputs, batch, ratios))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
