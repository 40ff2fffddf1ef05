"""Training under DeepSpeed: engine, EMA, schedules, checkpoints, metrics."""
