"""Continual learning: grow a trained multi-task model by experts and a task, without forgetting (issue 7).

`moevit expand` (expand.py, cli.py) adds N experts to every MoE MLP layer and a router, head and task
embedding for a new task; the tasks trained before keep their gates over the old experts only.
`moevit train` on the config it writes starts from the expanded weights and freezes everything the old
tasks use (freeze.py, start.py), so their outputs stay bit-identical while the new task trains.
"""
