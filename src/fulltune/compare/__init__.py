"""`fulltune compare`: each method trained and measured, side by side."""
