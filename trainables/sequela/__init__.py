"""Backdoor sequela (METHODS.md §6): attacks on defended models."""
