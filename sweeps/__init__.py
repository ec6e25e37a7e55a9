"""Orchestration: sweep specs and their validation, search spaces, the Ray Tune trainable and
runner, MLflow tracking, cluster entry points and templates."""
