"""What a trial does: tasks and models, pruning, fine-tuning and measurement.

Imports torch and torch-pruning, never ray, optuna or mlflow: everything here runs the same
in a Ray worker, in the driver and in a plain script.
"""
from __future__ import annotations
