"""Data: the Parquet media store, the synthetic dataset, the converter, Ray Data pipelines."""
