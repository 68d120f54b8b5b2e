"""Backdoor sequela (docs/methods.md §6): attacks on defended models."""
