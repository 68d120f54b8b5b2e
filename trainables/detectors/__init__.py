"""Backdoor-sample detectors on encoders (kind "sample_detector"; DeDe, ASSET, DECREE): each file
says how its detector fits and scores, `secsweep.sample_detection` does the victim, the test sets,
the metrics and the downstream-defense protocol."""
