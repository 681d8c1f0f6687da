"""Where a run executes: device and precision, ranks and distributed wrapping, memory, RNG states."""
