"""secsweep: hyperparameter sweeps for machine-learning security experiments.

Layering (imports point one way):
    ops -> data / models / poison -> config / registry / context / stages
        -> runtime / sweep / tracking (the only modules importing ray or mlflow)
        -> trainables -> sweeps
"""

__version__ = "0.1.0"
