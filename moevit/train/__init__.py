"""Training: the loop (loop.py) and one step (step.py), loss balancing, the training data, reporting
(progress bar, metrics.jsonl, TensorBoard, expert-usage plots), the run directory and the CLI commands
`moevit train` / `moevit eval`. Parallelism and checkpoints come from moevit.parallel."""
