"""MLflow: tracked runs, the model registry (versions and aliases), gates as data, variant
comparison and plots."""
