"""The CPU/GPU speed choices: patches to transformers' modules and process settings that make training
faster without changing what it computes."""
