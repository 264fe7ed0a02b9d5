"""Seed README 9.2, maximum number of classes: bisection trials (tiers cpu, gpu8) and plsc's memory model."""
