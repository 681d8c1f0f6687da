"""What a run tells people: the run logger (metrics.jsonl, TensorBoard, trackers), report.html and its plots."""
