"""Metric names shared by the training loop, Ray Tune, MLflow and the analysis (DESIGN section 3).

Per-epoch metrics are logged with step = epoch (1-based); final ones only with the last epoch.
`model/binary_units` counts the units that the study's activation binarizes, per example (bits);
`time/setup_s` is the time to build and compile the model before the first epoch.
"""

EPOCH_METRICS = (
    "train/loss", "train/accuracy",
    "val/accuracy_binary", "val/accuracy_soft", "val/binary_gap", "val/accuracy_binary_best",
    "act/ones_fraction", "act/bit_entropy", "act/saturated_fraction", "act/flip_rate",
    "time/epoch_s", "time/eval_s",
)
FINAL_METRICS = ("test/accuracy_binary", "test/accuracy_soft")
# the epoch whose weights the test metrics are of: the last, or with a patience the best by the monitor
TEST_EPOCH = "test/epoch"
# beside FINAL_METRICS, not in it (a run without it is not unfinished): the test binary accuracy with
# the binary twin's thresholds recalibrated on the validation set (study.calibration)
CALIBRATED = "test/accuracy_binary_calibrated"
# constant per trial (per attempt, for the set-up time), reported every epoch
TRIAL_CONSTANTS = ("model/params", "model/binary_units", "time/setup_s")

# The environment variable that lets the CPU stand in for GPUs TensorFlow cannot see (Ray's
# logical GPUs in tests, a laptop); without it such a trial fails at once (`study.runtime`).
GPU_STAND_IN = "STUDY_GPU_STAND_IN"
