"""Training and evaluation: the loop, checkpoints, COCO evaluation, logs."""
