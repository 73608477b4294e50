"""Errors that stop a training run; importable without torch, so the CLI can catch them cheaply."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or inf objective on some rank."""
