"""Experiment tracking (MLflow): the trainer's tracker, pipeline runs, fallback replay, model registry."""
