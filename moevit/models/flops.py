"""Parameters and forward FLOPs of a MoEViT per task, counted analytically and checked with fvcore.

Conventions (the numbers mean nothing without them):
- FLOPs = 2 x multiply-adds, per image (batch of one), forward pass only.
- Only contractions are counted: linears, the patch-embedding convolution, the attention
  matmuls (Q K^T and A V), router gates and the gate-weighted combine of the K expert outputs.
  Ignored as elementwise or data movement: biases, LayerNorms (norm1, norm2 and the final norm),
  GELU, softmax (attention and router), attention scaling, residual, position- and task-embedding
  adds, position-embedding resampling, top-k selection, and the dispatch gather/scatter.
- Sparse layers count the rows they compute: K expert rows per token, not E (dropless routing
  gives every token exactly K rows).
- Windowed attention (ViTDet, `window_size` w > 0) counts what it computes: the grid padded to a
  multiple of w goes through the qkv and output projections and each w x w window attends within
  itself (padding included); the prefix tokens attend among themselves, as a second call.
- fvcore (`FlopCountAnalysis`) counts one multiply-add as one flop and skips
  `scaled_dot_product_attention`; it also estimates LayerNorm at 5 flops per element. The
  comparison therefore takes fvcore's contraction operators x 2 and sets them against the
  analytic total without its SDPA components (`FVCORE_SKIPPED_COMPONENTS`).

Active parameters per token (the "activated parameters" of Switch Transformer / V-MoE tables):
every parameter a token of that task passes through, counting whole embedding tables as used:
the dense parameters, the task's own gates and task embedding, and K of the E experts in each
sparse layer (for the mixture of attention heads: K head experts' query and output projections;
its shared key/value projection and output bias are dense). Other tasks' gates and task
embeddings are never used by this task and are left out of both its task total and active count.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from timm.layers import Attention, Mlp
from torch import nn

from moevit.layers.moe_attention import MoEAttention
from moevit.layers.moe_mlp import MoEMlp
from moevit.models.moe_vit import MoEViT

ANALYTIC_COMPONENTS = (
    "patch_embed",  # the patch convolution
    "attention_projections",  # dense attention: qkv and output projection
    "attention_sdpa",  # dense attention: Q K^T and A V
    "mlp_dense",
    "routers",  # task gates of every sparse layer (MLP and attention)
    "mlp_experts",  # K expert MLPs per token
    "moa_shared_kv",  # mixture of attention heads: shared key/value projection
    "moa_head_experts",  # query and output projections of K head experts per token
    "moa_sdpa",  # the K queries per token attending over the shared keys
    "expert_combine",  # gate-weighted sum of each token's K expert outputs
)
FVCORE_SKIPPED_COMPONENTS = ("attention_sdpa", "moa_sdpa")  # both run as scaled_dot_product_attention
# fvcore operator names of contractions; its other counters (norms, upsampling, pooling) are
# estimates of elementwise work that the analytic count ignores.
FVCORE_CONTRACTION_OPS = ("linear", "conv", "einsum", "matmul", "bmm", "addmm", "mm")


# ------------------------------------------------------------------------------------- parameters
def count_parameters(model: MoEViT) -> dict:
    """{"total": int, "per_task": {task: int}, "active_per_token": {task: int}} (see module doc)."""
    total = sum(p.numel() for p in model.parameters())
    task_only = {task: sum(p.numel() for p in _task_parameters(model, task)) for task in model.tasks}
    all_task_only = sum(task_only.values())
    inactive_experts = sum(
        (layer.num_experts - layer.top_k) * _parameters_per_expert(name, layer)
        for name, layer in model.routed_layers()
    )
    per_task = {task: total - all_task_only + task_only[task] for task in model.tasks}
    return {
        "total": total,
        "per_task": per_task,
        "active_per_token": {task: per_task[task] - inactive_experts for task in model.tasks},
    }


def _task_parameters(model: MoEViT, task: str) -> Iterator[nn.Parameter]:
    """Parameters only `task` uses: its gate in every sparse layer and its task embedding."""
    for _, router in model.routers():
        yield from router.gates[task].parameters()
    if model.task_embed is not None:
        yield model.task_embed[task]


def _parameters_per_expert(name: str, layer: nn.Module) -> int:
    if isinstance(layer, MoEMlp):
        stacked = list(layer.experts.parameters())
    elif isinstance(layer, MoEAttention):
        stacked = [p for p in (layer.q_weight, layer.q_bias, layer.o_weight) if p is not None]
    else:
        raise TypeError(f"{name}: cannot count experts of routed layer {type(layer).__name__}")
    for p in stacked:  # expert weights are stacked (E, ...): slicing dim 0 gives one expert
        if p.shape[0] != layer.num_experts:
            raise ValueError(
                f"{name}: expert tensor of shape {tuple(p.shape)} is not stacked over {layer.num_experts} experts"
            )
    return sum(p[0].numel() for p in stacked)


# ---------------------------------------------------------------------------------------- analytic
def analytic_flops(model: MoEViT, image_size: int | tuple[int, int], task: str) -> dict:
    """Forward FLOPs of `model.forward_features` on one image, by component (see module doc).

    Returns {"image_size": (H, W), "tokens": prefix + (H/p)(W/p), "flops": {component: FLOPs},
    "gflops": total, "gflops_sdpa": the part fvcore skips, "gflops_without_sdpa": the rest}.
    """
    if task not in model.tasks:
        raise KeyError(f"unknown task {task!r}; this model has {model.tasks}")
    height, width = _image_hw(model, image_size)
    grid_hw = (height // model.patch_size, width // model.patch_size)
    grid = grid_hw[0] * grid_hw[1]
    tokens = model.num_prefix_tokens + grid
    macs: Counter[str] = Counter({component: 0 for component in ANALYTIC_COMPONENTS})
    patch_conv = model.patch_embed.proj
    macs["patch_embed"] += grid * patch_conv.weight.numel()  # one output column per patch, stride = kernel
    for i, block in enumerate(model.blocks):
        if block.window_size:
            _count_windowed_attention(
                macs, block.attn, grid_hw, block.window_size, model.num_prefix_tokens, f"blocks.{i}.attn"
            )
        else:
            _count_attention(macs, block.attn, tokens, f"blocks.{i}.attn")
        _count_mlp(macs, block.mlp, tokens, f"blocks.{i}.mlp")
    flops = {component: 2 * count for component, count in macs.items()}
    total = sum(flops.values())
    sdpa = sum(flops[component] for component in FVCORE_SKIPPED_COMPONENTS)
    return {
        "image_size": (height, width),
        "tokens": tokens,
        "flops": flops,
        "gflops": total / 1e9,
        "gflops_sdpa": sdpa / 1e9,
        "gflops_without_sdpa": (total - sdpa) / 1e9,
    }


def _linear_macs(module: nn.Module, rows: int) -> int:
    """Multiply-adds of every nn.Linear inside `module` applied to `rows` rows."""
    return rows * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _count_attention(macs: Counter[str], attn: nn.Module, tokens: int, name: str) -> None:
    if isinstance(attn, MoEAttention):
        rows = tokens * attn.top_k  # one query row per (token, selected head)
        macs["routers"] += tokens * attn.dim * attn.num_experts
        macs["moa_shared_kv"] += _linear_macs(attn.kv, tokens)
        macs["moa_head_experts"] += rows * (attn.q_weight[0].numel() + attn.o_weight[0].numel())
        macs["moa_sdpa"] += 2 * rows * tokens * attn.head_dim  # scores over all keys, then values
        macs["expert_combine"] += rows * attn.dim
    elif isinstance(attn, Attention):
        _count_dense_attention(macs, attn, tokens)
    else:
        raise TypeError(f"{name}: no FLOP formula for attention layer {type(attn).__name__}")


def _count_dense_attention(macs: Counter[str], attn: Attention, tokens: int, calls: int = 1) -> None:
    """timm's Attention run `calls` times on `tokens` tokens each."""
    macs["attention_projections"] += calls * _linear_macs(attn, tokens)
    macs["attention_sdpa"] += calls * 2 * attn.num_heads * tokens * tokens * attn.head_dim


def _count_windowed_attention(
    macs: Counter[str], attn: nn.Module, grid_hw: tuple[int, int], window: int, prefix: int, name: str
) -> None:
    """timm's Attention once on every zero-padded w x w window, once on the prefix tokens (block.py)."""
    if not isinstance(attn, Attention):  # the model refuses anything else in a windowed block
        raise TypeError(f"{name}: no FLOP formula for windowed attention layer {type(attn).__name__}")
    windows = math.ceil(grid_hw[0] / window) * math.ceil(grid_hw[1] / window)
    _count_dense_attention(macs, attn, window * window, calls=windows)
    if prefix:
        _count_dense_attention(macs, attn, prefix)


def _count_mlp(macs: Counter[str], mlp: nn.Module, tokens: int, name: str) -> None:
    if isinstance(mlp, MoEMlp):
        rows = tokens * mlp.top_k
        experts = mlp.experts
        macs["routers"] += tokens * experts.dim * mlp.num_experts
        # fc1 (hidden x dim) and fc2 (dim x hidden) per row, from the sizes rather than the weights: a
        # training run counts its model after the experts were sharded over ranks (moevit.parallel).
        macs["mlp_experts"] += rows * 2 * experts.dim * experts.hidden
        macs["expert_combine"] += rows * experts.dim
    elif isinstance(mlp, Mlp):
        macs["mlp_dense"] += _linear_macs(mlp, tokens)
    else:
        raise TypeError(f"{name}: no FLOP formula for MLP layer {type(mlp).__name__}")


def _image_hw(model: MoEViT, image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {image_size!r}")
    height, width = size
    p = model.patch_size
    if height < p or width < p or height % p or width % p:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of the patch size {p}")
    return height, width


# ------------------------------------------------------------------------------------------ fvcore
class _FeaturesForTracing(nn.Module):
    """forward(images) = model.forward_features(images, task), then `head` if one is given.

    fvcore traces a module's forward with tensor inputs only, so the task is bound here. A
    task head plugs in as `head`, a module taking the backbone's tokens (B, prefix + N, D);
    its operators are reported apart from the backbone's.
    """

    def __init__(self, backbone: MoEViT, task: str, head: nn.Module | None):
        super().__init__()
        self.backbone, self.task, self.head = backbone, task, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images, self.task)
        return tokens if self.head is None else self.head(tokens)


@contextmanager
def _balanced_eval(model: MoEViT, head: nn.Module | None) -> Iterator[None]:
    """Eval mode and forced-balanced routing for the duration, previous state restored after.

    Routing shapes depend on the data; forced-balanced routing gives every token exactly K
    rows, which is what the analytic count assumes (and dropless routing always does). Eval
    mode keeps dropout out of the trace.
    """
    modules = [*model.modules(), *(head.modules() if head is not None else ())]
    training = {module: module.training for module in modules}
    forced = {router: router.force_balanced for _, router in model.routers()}
    for module in modules:
        module.training = False
    model.set_force_balanced_routing(True)
    try:
        yield
    finally:
        for module, mode in training.items():
            module.training = mode
        for router, mode in forced.items():
            router.force_balanced = mode


def fvcore_flops(
    model: MoEViT, image_size: int | tuple[int, int], task: str, head: nn.Module | None = None
) -> dict:
    """fvcore's count of `model.forward_features(images, task)` on one image, converted to FLOPs.

    Returns {"gflops": 2 x fvcore's contraction operators of the backbone (comparable to the
    analytic "gflops_without_sdpa"), "by_operator": fvcore's raw backbone counts (one
    multiply-add = 1, LayerNorm estimated at 5 per element), "unsupported_ops": operators fvcore
    met but could not count, with how often (scaled_dot_product_attention among them)}; with a
    `head`, also "gflops_head": 2 x its contraction operators.
    """
    if task not in model.tasks:
        raise KeyError(f"unknown task {task!r}; this model has {model.tasks}")
    height, width = _image_hw(model, image_size)
    reference = next(model.parameters())
    images = torch.zeros(
        1, model.patch_embed.proj.in_channels, height, width, device=reference.device, dtype=reference.dtype
    )
    wrapper = _FeaturesForTracing(model, task, head)
    # Imported here, not at module level: the analytic count (and the MFU of training, which uses it)
    # must work where fvcore is not installed (benchmarks/gpu_check.py on a bare GPU machine).
    with warnings.catch_warnings():
        # Importing fvcore.nn scripts its focal loss with torch.jit.script, which torch now flags as
        # deprecated; the warning says nothing about flop counting, so `moevit flops` hides it.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    analysis = (
        FlopCountAnalysis(wrapper, images)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")
    )
    with _balanced_eval(model, head), torch.no_grad():
        everything = analysis.by_operator()  # the trace runs here, inside the context
        head_ops = analysis.by_operator("head") if head is not None else Counter()
        unsupported = dict(analysis.unsupported_ops())
    backbone_ops = everything - head_ops
    result = {
        "gflops": _contraction_flops(backbone_ops) / 1e9,
        "by_operator": dict(backbone_ops),
        "unsupported_ops": unsupported,
    }
    if head is not None:
        result["gflops_head"] = _contraction_flops(head_ops) / 1e9
    return result


def _contraction_flops(by_operator: Mapping[str, float]) -> float:
    return 2 * sum(by_operator.get(op, 0) for op in FVCORE_CONTRACTION_OPS)


# ----------------------------------------------------------------------------------------- reports
def flops_report(
    model: MoEViT,
    image_sizes: Mapping[str, int | tuple[int, int]],
    heads: Mapping[str, nn.Module] | None = None,
) -> dict:
    """Parameters and GFLOPs of every task, analytic against fvcore.

    Args:
        model: the backbone.
        image_sizes: task -> input size (int or (H, W)); every task of the model needs one.
        heads: optional task -> head module taking the backbone tokens; fvcore counts it apart
            ("gflops_head_fvcore"), there is no analytic formula for heads.

    "relative_difference" is (fvcore - analytic) / analytic over what fvcore counts: fvcore's
    contractions x 2 against the analytic total without its SDPA components.
    """
    missing = [task for task in model.tasks if task not in image_sizes]
    unknown = [task for task in image_sizes if task not in model.tasks]
    if missing or unknown:
        raise ValueError(
            f"image_sizes must name exactly the model's tasks {model.tasks}: missing {missing}, unknown {unknown}"
        )
    heads = heads or {}
    unknown_heads = [task for task in heads if task not in model.tasks]
    if unknown_heads:
        raise ValueError(f"heads given for tasks the model does not have: {unknown_heads}")
    params = count_parameters(model)
    tasks = {}
    for task in model.tasks:
        analytic = analytic_flops(model, image_sizes[task], task)
        counted = fvcore_flops(model, image_sizes[task], task, heads.get(task))
        comparable = analytic["gflops_without_sdpa"]
        row = {
            "image_size": list(analytic["image_size"]),
            "tokens": analytic["tokens"],
            "params_total": params["total"],
            "params_task": params["per_task"][task],
            "params_active_per_token": params["active_per_token"][task],
            "gflops_analytic": analytic["gflops"],
            "gflops_analytic_sdpa": analytic["gflops_sdpa"],
            "gflops_fvcore": counted["gflops"],
            "relative_difference": (counted["gflops"] - comparable) / comparable,
            "analytic_gflops_by_component": {k: v / 1e9 for k, v in analytic["flops"].items() if v},
            "fvcore_unsupported_ops": counted["unsupported_ops"],
        }
        if "gflops_head" in counted:
            row["gflops_head_fvcore"] = counted["gflops_head"]
        tasks[task] = row
    return {"conventions": _CONVENTIONS, "tasks": tasks}


_CONVENTIONS = (
    "FLOPs = 2 x multiply-adds per image, forward, contractions only (biases, norms, activations, "
    "softmax and other elementwise ops ignored); sparse layers count top_k expert rows per token. "
    "gflops_fvcore = 2 x fvcore's contraction counts, which exclude scaled_dot_product_attention; "
    "relative_difference compares it with gflops_analytic - gflops_analytic_sdpa. Active parameters "
    "per token: dense parameters + the task's gates and embedding + top_k experts per sparse layer."
)


_TABLE_COLUMNS = (  # (header, cell of a report row)
    ("image", lambda row: "{}x{}".format(*row["image_size"])),
    ("tokens", lambda row: str(row["tokens"])),
    ("params", lambda row: f"{row['params_total'] / 1e6:.2f}M"),
    ("task params", lambda row: f"{row['params_task'] / 1e6:.2f}M"),
    ("active/token", lambda row: f"{row['params_active_per_token'] / 1e6:.2f}M"),
    ("GFLOPs", lambda row: f"{row['gflops_analytic']:.3f}"),
    ("of it SDPA", lambda row: f"{row['gflops_analytic_sdpa']:.3f}"),
    ("fvcore GFLOPs", lambda row: f"{row['gflops_fvcore']:.3f}"),
    ("fvcore vs analytic", lambda row: f"{100 * row['relative_difference']:+.2f}%"),
)


def task_table(columns, tasks: Mapping[str, dict]) -> list[str]:
    """The lines of an aligned text table: a header of the `columns`' headers, a rule, then one row per
    task (its name left-aligned, each column's cell of the task's row right-aligned).

    Args:
        columns: (header, cell) pairs, cell(row) -> str.
        tasks: task name -> its report row.
    """
    rows = [["task", *(header for header, _ in columns)]]
    rows += [[task, *(cell(row) for _, cell in columns)] for task, row in tasks.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_flops_table(report: dict) -> str:
    """An aligned text table of a `flops_report`, one row per task, conventions underneath."""
    lines = task_table(_TABLE_COLUMNS, report["tasks"])
    return "\n".join([*lines, "", textwrap.fill(report["conventions"], width=len(lines[0]))])


def run_flops(model: MoEViT, image_sizes: Mapping[str, int | tuple[int, int]], as_json: bool) -> str:
    """What `moevit flops CONFIG [--json]` prints."""
    report = flops_report(model, image_sizes)
    return json.dumps(report, indent=2) if as_json else format_flops_table(report)
