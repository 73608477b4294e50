"""Saved things: run directories, checkpoints, model directories and expert usage files."""
