"""CLIP specifics: the zero-shot classifier and weight-space interpolation (WiSE-FT)."""
