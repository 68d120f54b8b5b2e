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
# the same metrics on the validation split (held out of the training data): what sweeps select on
VAL_ASR = "val_asr"
VAL_CLEAN_ACC = "val_clean_acc"
VAL_DER = "val_der"
ASR_BEFORE = "asr_before"                # the backdoored model's metrics, before the defense
CLEAN_ACC_BEFORE = "clean_acc_before"
VAL_ASR_BEFORE = "val_asr_before"
VAL_CLEAN_ACC_BEFORE = "val_clean_acc_before"
IMPLANTED = "backdoor_implanted"         # 1.0 if the victim's val ASR before the defense reached the floor

TAG_TRIAL_ID = "trial_id"
TAG_SWEEP = "sweep"
TAG_GIT_COMMIT = "git_commit"
