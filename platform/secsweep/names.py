"""Metric and tag names shared by trainables, Tune results, MLflow and reports."""

ASR = "asr"                    # attack success rate, fraction in [0, 1]
CLEAN_ACC = "clean_acc"        # accuracy on the clean test set, fraction in [0, 1]
DEVICE_HOURS = "device_hours"  # GPU-hours on GPUs, else CPU wall-hours, cumulative for the trial
EPOCH = "epoch"                # 1-based epoch index; epoch 0 = before the defense
LR = "lr"                      # learning rate at the end of the epoch
AGREEMENT = "agreement"
AUC = "auc"
TPR = "tpr"
FPR = "fpr"
ACCURACY = "accuracy"
DER = "der"                    # defense effectiveness rating, see secsweep.ops.metrics.der

TAG_TRIAL_ID = "trial_id"
TAG_SWEEP = "sweep"
TAG_GIT_COMMIT = "git_commit"
