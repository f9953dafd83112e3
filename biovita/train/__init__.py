"""Two-stage training on Ray Train + DeepSpeed (the application layer over the library)."""
