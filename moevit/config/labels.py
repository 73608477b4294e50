"""Label conventions shared by the readers that write labels and the heads and metrics that read them."""

# Segmentation pixels no loss or metric counts: padding, and ADE20K's "other" class (0) once
# reduce_zero_label shifts the labels (mmsegmentation's convention).
IGNORE_INDEX = 255
