"""Backdoor attacks: each trains a backdoored model and registers its trigger."""
