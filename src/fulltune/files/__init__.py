"""Files on disk that fulltune writes and reads back: run and output folders (who owns what, atomic
replacement, locks), manifests, and safetensors + JSON state (never a pickle)."""
