"""MLflow tracking: the runs of jobs, stages, sweeps and fetches (`runs`), and a trained model
as an MLflow pyfunc (`pyfunc`). Below `data/` and `train/`: both log through it."""
