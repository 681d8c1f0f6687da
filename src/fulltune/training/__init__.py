"""Training: the trainer's loop, the task definitions it runs, the optimizer and schedule, lean mode."""
