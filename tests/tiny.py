"""Training options shared by the tests: a one-block ResNet on 32x32 images, in-process data."""

TINY_TRAIN = ["--arch", "resnet10", "--size", "32", "--batch-size", "16", "--workers", "0"]
