"""What a run leaves behind and reads back: checkpoints, resume checks, sharded states, exports, model cards."""
