"""Encoder pre-training: self-supervised (SimCLR, MoCo, BYOL, SimSiam) and supervised."""
