"""The one error type of the config system: what is wrong, at which key, and where it came from."""


class ConfigError(ValueError):
    """A config that cannot be accepted.

    The message reads ``SOURCE: PROBLEM``, e.g.
    ``configs/demo.yaml: unknown key 'model.moe.topk' (did you mean 'top_k'?)`` or
    ``override 'train.lr=abc': 'train.lr' must be float, got str 'abc'``.
    It subclasses ValueError so callers that already treat bad values as ValueError keep working.

    Args:
        source: where the bad value came from: a file path (``path:line:column`` for YAML syntax
            errors), ``override 'a.b=1'``, or ``<dict>`` for configs built in code.
        message: the problem, naming the dotted key path.
    """

    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
