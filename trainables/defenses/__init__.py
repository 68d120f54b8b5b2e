"""Backdoor defenses: each takes a backdoored model (a cached attack stage) and repairs it."""
