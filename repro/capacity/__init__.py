"""Seed README 9.2, maximum number of classes on 8 GPUs (tier gpu8): cases to be written."""
