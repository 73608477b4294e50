"""What the `real` preset draws: the real datasets' image sizes, label structure and file-format quirks.

The `real` preset rehearses the paper configs (configs/paper/) at true resolution on a CPU: a few dozen
images per dataset, in the same layouts as the toy presets, but sized and labelled like ImageNet-1k,
COCO 2017 and ADE20K so that resolution-dependent code (resizing, cropping, padding, sliding windows,
mapping boxes back) and label-dependent code (80 gapped category ids, crowd regions, empty images,
150 classes with an ignored "other") run on what the real datasets give them. The images stay
learnable in spirit: every label is a visible property (hue, texture, lightness) of what it labels.
"""

# (height, width) choices, one drawn uniformly per image from a generator of its own (spec.sample_rng
# with a "size" key), so that the drawing of the picture does not depend on its size draw. Repeats
# weight the common sizes.
# ImageNet: most images are 500 px on the long side, about 4:3 landscape; some 3:2, square or portrait.
IMAGENET_SIZES = (
    (375, 500),
    (375, 500),
    (375, 500),
    (333, 500),
    (500, 375),
    (500, 500),
    (400, 500),
    (281, 500),
)
# COCO 2017: 640 px on the long side, mostly 480 or 427 px on the other; about a quarter portrait.
COCO_SIZES = ((480, 640), (480, 640), (427, 640), (425, 640), (640, 480), (640, 427), (512, 640), (360, 640))
# ADE20K SceneParsing: typically 512 px on the short side at about 4:3 (683 x 512); some square,
# wider or portrait.
ADE20K_SIZES = (
    (512, 683),
    (512, 683),
    (512, 683),
    (683, 512),
    (512, 512),
    (512, 768),
    (512, 640),
    (384, 512),
)

# ImageNet-1k's train set holds one PNG stored as .JPEG and 22 CMYK JPEGs (and about 0.3 % grayscale,
# spec.IMAGENET_GRAYSCALE_FRACTION): one of each here, in train, so that the reader's decode-by-content
# and colour conversion run. (split, class index, image index) -> format.
IMAGENET_ODD_FILES = {("train", 0, 0): "PNG", ("train", 1, 0): "CMYK"}

# COCO 2017's 80 category ids: 1..90 without these ten.
COCO_ID_GAPS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in COCO_ID_GAPS)
# Categories that occur, one per hue family (spec.HUE_FAMILIES, +-HUE_JITTER_DEG["imagenet"]), at ids
# on either side of gaps and at both ends, so that the id <-> contiguous label mapping matters (id 90 is
# label 79); the other 70 categories are listed but never annotated, as a subset of COCO would be.
COCO_USED_CATEGORIES = {
    "red": 1,
    "orange": 11,
    "yellow": 13,
    "lime": 25,
    "green": 27,
    "teal": 31,
    "azure": 44,
    "blue": 46,
    "violet": 67,
    "magenta": 90,
}
COCO_MAX_OBJECTS = 20  # COCO averages 7.3 instances per image; a tail of images holds 20 or more
# Object widths before rotation, log-uniform: COCO's small (< 32^2 px area), medium and large objects
# all occur, so COCOeval's APs / APm / APl are all defined.
COCO_OBJECT_SIZE = (12.0, 256.0)
# Every CROWD_PERIOD-th image (index % period == 1) holds one crowd region: a cluster of small
# overlapping objects of one category, annotated once with iscrowd 1 and an uncompressed RLE mask, as
# COCO annotates crowds of people or cars. Every EMPTY_PERIOD-th image (index % period == period - 1)
# holds no object at all (COCO 2017 train has about 1 % such images); deterministic positions rather
# than random draws so that every split of a few dozen images has both.
COCO_CROWD_PERIOD = 4
COCO_EMPTY_PERIOD = 8
COCO_CROWD_EXTENT = (64.0, 128.0)  # side of the square the crowd's members are scattered over
COCO_CROWD_MEMBERS = (10, 20)  # inclusive
COCO_CROWD_MEMBER_SIZE = (14.0, 28.0)

# ADE20K: 150 classes, each a visible (texture, hue family, lightness) triple: 5 x 10 x 3 = 150.
# PNG value 1 + (texture * 10 + hue family) * 3 + lightness; 0 is "other" (a smooth gradient region,
# spec.ADE20K_OTHER_FRACTION of the regions), ignored under reduce_zero_label.
ADE20K_LIGHTNESS = {"dark": (0.30, 0.42), "mid": (0.55, 0.67), "light": (0.82, 0.95)}  # HSV value ranges
ADE20K_REGIONS = (6, 14)  # regions per image, inclusive; ADE20K images hold about 9 classes on average
ADE20K_BORDER_WARP_PX = 24.0  # region borders bent by up to this much (scaled from the toy's 6 px at 64 px)
