"""Trainables: one module per attack, defense, detector or sequela method, found by discovery
(secsweep.registry.discover); adding a method is adding a file."""
