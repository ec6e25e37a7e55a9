"""Pure research code: the sigmoid-or-binary activation, models, data, training loop and metrics.

Imports TensorFlow, Keras and NumPy only; sweeps (Ray, Optuna, MLflow) plug in through callbacks.
"""
