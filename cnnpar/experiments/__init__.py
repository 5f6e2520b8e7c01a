"""Experiments over many training runs: sweeps of a grid (`cnnpar sweep`), the accuracy map (`cnnpar map`),
their presets as data, the launchers that start each run, and the resumable runner under both."""
