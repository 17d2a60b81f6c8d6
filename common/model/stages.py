"""MobileFaceNet stage names in forward order: what `train_from` refers to.

Kept apart from common/model/mobilefacenet.py so that configs validate without importing torch (every CLI command
loads the configs module; importing torch costs seconds)."""

STAGES = (
    "conv1",
    "conv2_dw",
    "conv_23",
    "conv_3",
    "conv_34",
    "conv_4",
    "conv_45",
    "conv_5",
    "sep",
    "GDC_dw",
    "features",
)

EMBEDDING_DIM = 128  # the embedder's output size
