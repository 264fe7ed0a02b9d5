"""Seed README 9.3 throughput and the NHWC claims of section 2 (tiers gpu, gpu8): cases to be written."""
