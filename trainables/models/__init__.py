"""Clean (unpoisoned) models: upstream stages of attacks (LF needs one) and of comparisons."""
