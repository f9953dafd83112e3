"""BioVITA Bench: build (official layout), extract features (Ray Data), score, report."""
