"""Training: optimizer, schedule, checkpoints, metrics and the loop."""
