"""A synthetic downstream classification set, in the ImageNet folder layout, of classes the demo never saw.

The demo's classification classes are 10 hue families 36 degrees apart (spec.HUE_FAMILIES). This set's
10 classes are the hues half-way between them (18, 54, ... degrees), drawn with a narrower spread, so the
vocabulary is familiar (the pretrained experts know colours, shapes and textures) and the labels are
new and finer: a downstream task for fine-tuning pruned models (`moevit finetune`) and for continual
learning (`moevit expand`). Written by `moevit data synth --out DIR --downstream`:

    DIR/downstream/{train,val}/<wnid>/*.JPEG, DIR/downstream/LOC_synset_mapping.txt
"""

from pathlib import Path

from moevit.data.synth.imagenet import render_classification_image, wnid
from moevit.data.synth.spec import HUE_FAMILIES, IMAGENET_IMAGE_SIZE, JPEG_QUALITY, sample_rng

# Each class sits half-way between two neighbouring demo families ("red-orange" at 18 degrees, ...).
_FAMILY_NAMES = list(HUE_FAMILIES)
DOWNSTREAM_CLASSES = {
    f"{name}-{_FAMILY_NAMES[(i + 1) % len(_FAMILY_NAMES)]}": HUE_FAMILIES[name] + 18.0
    for i, name in enumerate(_FAMILY_NAMES)
}
# +-8 degrees: well inside the 18 degrees to the nearest class on either side (demo families included).
DOWNSTREAM_HUE_JITTER_DEG = 8.0
# Fewer images than the demo's classification set: downstream sets are the small ones.
DOWNSTREAM_SIZES = {"tiny": {"train": 12, "val": 6}, "small": {"train": 80, "val": 40}}
DATASET_DIR = "downstream"


def write_downstream(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> dict:
    """Writes DIR/downstream (replacing an earlier one); returns {"num_classes", "images": {split: n}}."""
    if size not in DOWNSTREAM_SIZES:
        raise ValueError(f"unknown synthetic data size {size!r}; expected one of {sorted(DOWNSTREAM_SIZES)}")
    seen = sorted(set(DOWNSTREAM_CLASSES.values()) & set(HUE_FAMILIES.values()))
    if seen:  # the demo's hues changed under us: the set would no longer be new to the model
        raise ValueError(f"downstream hues {seen} are also demo classes (spec.HUE_FAMILIES)")
    root = Path(out_dir) / DATASET_DIR
    counts = DOWNSTREAM_SIZES[size]
    for split, count in counts.items():
        for index, hue_deg in enumerate(DOWNSTREAM_CLASSES.values()):
            folder = root / split / wnid(index)
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.JPEG"):
                old.unlink()
            for n in range(count):
                rng = sample_rng(seed, "downstream", split, index, n)
                image = render_classification_image(
                    rng, hue_deg, IMAGENET_IMAGE_SIZE, jitter_deg=DOWNSTREAM_HUE_JITTER_DEG
                )
                name = (
                    f"{wnid(index)}_{n + 1}.JPEG"
                    if split == "train"
                    else f"ILSVRC2012_val_{index * count + n + 1:08d}.JPEG"
                )
                image.save(folder / name, format="JPEG", quality=JPEG_QUALITY)
    mapping = "".join(f"{wnid(i)} {name}\n" for i, name in enumerate(DOWNSTREAM_CLASSES))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return {
        "num_classes": len(DOWNSTREAM_CLASSES),
        "images": {s: c * len(DOWNSTREAM_CLASSES) for s, c in counts.items()},
    }
