"""Continual learning on the batched backend: task streams, methods (plugins), metrics, and the runner."""
