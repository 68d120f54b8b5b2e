"""Audits of public models (SecurityNet; docs/methods.md, "Audits of public models"): model stealing,
membership inference, evasion and backdoor-detection false positives on one classifier each, a model
trained here (`clean`) or a registry model (`zoo`). The shared core is `secsweep.audit`."""
