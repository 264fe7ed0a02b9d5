"""Seed README 9.3 throughput, the NHWC claims of section 2 (tiers gpu, gpu8), throughput on this CPU."""
