"""Pre-processing: drift correction, normalisation, label contrast, classical baselines."""
