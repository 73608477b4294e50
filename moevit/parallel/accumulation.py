"""Gradient accumulation on the DeepSpeed engine: the boundary of each micro-batch, and dropping an
accumulated step whose loss turned out NaN or inf on some rank (moevit.train.step).

The boundary is set explicitly before every backward (`set_gradient_accumulation_boundary`), not left
to DeepSpeed's micro-step counter: a skipped step calls `engine.step()` fewer times than
`gradient_accumulation_steps`, and the counter would then put the next boundary in the wrong place.
"""

from __future__ import annotations


def mark_boundary(engine, is_last: bool) -> None:
    """Tell the engine whether the next backward is the last micro-batch of its optimizer step (a stand-in
    engine without accumulation has no such method and needs none)."""
    if hasattr(engine, "set_gradient_accumulation_boundary"):
        engine.set_gradient_accumulation_boundary(is_last)


def discard_accumulated_gradients(engine) -> None:
    """Forget the gradients of the micro-batches already run in this step, on every ZeRO stage, the way
    DeepSpeed's ZeRO optimizer itself drops an overflowed step: no update, no LR step, and the next step
    starts accumulating from zero. Call it on every rank together (they all skip the same step)."""
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "averaged_gradients"):  # ZeRO 1 and 2: partitioned gradient buffers
        optimizer.zero_grad(set_to_none=True)
        for group in list(optimizer.averaged_gradients):
            optimizer.averaged_gradients[group] = None
        for group in list(getattr(optimizer, "all_grad_tensors", {})):
            optimizer.all_grad_tensors[group] = None
        if hasattr(optimizer, "micro_step_id"):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    if hasattr(engine, "zero_grad"):
        engine.zero_grad()
    elif optimizer is not None:
        optimizer.zero_grad()
