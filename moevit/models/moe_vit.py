"""Sparse Mixture-of-Experts Vision Transformer with task-conditioned routing.

A ViT (Dosovitskiy et al. 2021) made of timm's parts: patch embedding, attention blocks, norms
and position-embedding resampling. Selected blocks replace their MLP with `MoEMlp` (experts
shared by all tasks, one router per task, as in Mod-Squad, Chen et al. CVPR 2023) and,
optionally, their attention with a mixture of attention heads. For high-resolution inputs, blocks
can attend within windows of the patch grid, a few global blocks excepted (ViTDet, `window_size`).
Parameter names follow timm's `VisionTransformer`, so dense weights load by name (see `upcycle.py`).

Single-device code: expert parallelism is applied from outside (moevit.parallel).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from timm.layers import LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moevit.layers.experts import DEFAULT_EXPERT_IMPL, check_expert_impl
from moevit.layers.moe_attention import MoEAttention
from moevit.layers.moe_mlp import MoEMlp
from moevit.layers.router import DEFAULT_GATE_INIT_STD, Routing, TaskRouter
from moevit.models.block import TaskBlock, routes_tasks
from moevit.models.layer_specs import moe_mlp_specs
from moevit.models.placement import resolve_moe_layers


@dataclass
class BackboneOutput:
    tokens: torch.Tensor  # (B, prefix + N, D), after the final norm
    intermediates: list[torch.Tensor] = field(default_factory=list)  # (B, D, H, W) per requested block
    routing: dict[str, Routing] = field(default_factory=dict)  # "blocks.3.mlp" -> its routing


class MoEViT(nn.Module):
    """ViT backbone whose MoE layers route tokens with one gate per task.

    Args:
        tasks: task names; each MoE layer gets one router per task.
        img_size: training resolution; other sizes resample the position embedding.
        patch_size: patch edge in pixels.
        in_chans: input channels.
        embed_dim: token width (D).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: dense MLP hidden width as a multiple of D.
        qkv_bias: bias on the qkv projection (timm's ViT default).
        num_experts: experts per MoE layer (E), shared by all tasks; or {block index: E} for every
            MoE block (pruned models, see moevit.prune). In the mapping form a layer's top_k is
            clamped to its E, and a block with E = 1 gets a plain MLP of width `expert_hidden`
            (top-1 routing over one expert gives it weight 1: the same function without a router).
        top_k: experts per token (K).
        expert_hidden: hidden width of one expert; None keeps the dense MLP's width, so a dense
            ViT's MLP weights can initialise every expert (upcycling).
        moe_layers: which blocks are MoE, see `placement.resolve_moe_layers`.
        task_embedding: add a learned, zero-initialised per-task vector to every token.
        attention_experts: experts of the optional mixture of attention heads on MoE blocks (0 = off).
        attention_top_k: head experts per token when `attention_experts` > 0.
        attention_head_dim: width of one head expert.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        class_token: prepend a class token (timm's default ViT).
        task_experts: task -> n: in every MoE MLP layer that task routes among experts 0..n-1 only
            (continual learning: tasks trained before an expansion keep their experts, bit for bit;
            see moevit.continual); or task -> {block index: n}, per MoE block (a pruned expanded
            model, see moevit.prune). Tasks not named route among all experts of the layer.
        window_size: ViTDet's windowed attention: blocks not in `global_blocks` attend within
            window_size x window_size windows of the patch grid (zero-padded to a multiple of it),
            their prefix tokens among themselves only (see block.py); 0 = global attention everywhere.
        global_blocks: indices of the blocks that attend over all tokens when `window_size` > 0.
        capacity_factor: expert capacity bound of every MoE MLP layer (moevit.layers.capacity);
            None: dropless.
        gate_init_std: std of every gate's normal initial weights (0: zero gates, which tie every
            expert: all tokens then go to the same k experts). Only fresh models depend on it; loaded
            weights replace it. See moevit.layers.router.
        router_jitter: training-only multiplicative noise on the router inputs, uniform in
            [1 - router_jitter, 1 + router_jitter] (Switch's input jitter); 0 = off. Eval never jitters.
        expert_impl: how every MoE MLP layer's expert matmuls run: "loop", "grouped"
            (`torch._grouped_mm`) or "auto" (the measured default per device); see
            moevit.layers.experts. The same function and choice run behind the expert-parallel wrapper.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_experts: int | Mapping[int, int] = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        moe_layers: str | Sequence[int] = "every:2",
        task_embedding: bool = False,
        attention_experts: int = 0,
        attention_top_k: int = 2,
        attention_head_dim: int = 64,
        drop_path_rate: float = 0.0,
        class_token: bool = True,
        task_experts: Mapping[str, int | Mapping[int, int]] | None = None,
        window_size: int = 0,
        global_blocks: Sequence[int] = (),
        capacity_factor: float | None = None,
        gate_init_std: float = DEFAULT_GATE_INIT_STD,
        router_jitter: float = 0.0,
        expert_impl: str = DEFAULT_EXPERT_IMPL,
    ):
        super().__init__()
        check_expert_impl(expert_impl)
        if not tasks:
            raise ValueError("MoEViT needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names repeat: {list(tasks)}")
        self.tasks = list(tasks)
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_prefix_tokens = 1 if class_token else 0
        self.moe_layer_indices = resolve_moe_layers(moe_layers, depth)
        expert_hidden = expert_hidden or int(embed_dim * mlp_ratio)
        mlp_specs = moe_mlp_specs(self.moe_layer_indices, num_experts, top_k, self.tasks, task_experts)
        self.window_size, self.global_blocks = _check_windows(window_size, global_blocks, depth)
        windowed = [i for i in range(depth) if window_size and i not in self.global_blocks]
        windowed_moa = [i for i in windowed if i in mlp_specs] if attention_experts else []
        if windowed_moa:
            raise ValueError(
                f"attention_experts > 0 (mixture of attention heads) cannot run in windowed blocks "
                f"{windowed_moa}: add them to global_blocks or set window_size 0"
            )

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",  # keeps the grid shape for position-embedding resampling
            strict_img_size=False,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.task_embed = (
            nn.ParameterDict({task: nn.Parameter(torch.zeros(1, 1, embed_dim)) for task in self.tasks})
            if task_embedding
            else None
        )

        # On the CPU whatever the default device: a model built on the meta device (sizing) needs the values.
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            block = TaskBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
                window_size=window_size if i in windowed else 0,
            )
            spec = mlp_specs.get(i)
            if spec is not None:
                block.mlp = (
                    Mlp(embed_dim, expert_hidden)
                    if spec.plain
                    else MoEMlp(
                        embed_dim,
                        expert_hidden,
                        spec.num_experts,
                        spec.top_k,
                        self.tasks,
                        task_experts=spec.task_experts,
                        capacity_factor=capacity_factor,
                        gate_init_std=0.0,  # drawn last, see _init_gates
                        router_jitter=router_jitter,
                        expert_impl=expert_impl,
                    )
                )
                if attention_experts:
                    block.attn = MoEAttention(
                        embed_dim,
                        attention_experts,
                        attention_top_k,
                        attention_head_dim,
                        self.tasks,
                        qkv_bias,
                        gate_init_std=0.0,  # drawn last, see _init_gates
                        router_jitter=router_jitter,
                    )
            self.blocks.append(block)
        self.norm = LayerNorm(embed_dim)  # timm's, eps=1e-6 like its ViT
        # Recompute each block's activations in the backward instead of keeping them (training only);
        # set by the trainer from train.activation_checkpointing, see `_run_block`.
        self.activation_checkpointing = False
        self._init_weights()
        self._init_gates(gate_init_std)

    def _init_weights(self) -> None:
        # timm's ViT init. Experts initialise themselves the same way; gates are not nn.Linear and keep
        # their own small random init (moevit.layers.router: zero gates would collapse the routing).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_weights_vit_timm(module)

    def _init_gates(self, std: float) -> None:
        # Drawn last and on a fork of torch's generator, so every other weight of the model, and a head
        # built after it, draws exactly what it did when gates were zero-initialised: only the gates differ.
        on_cuda = self.pos_embed.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.pos_embed.device] if on_cuda else []):
            for _, router in self.routers():
                for gate in router.gates.values():
                    gate.reset_parameters(std)

    # ----------------------------------------------------------------- forward
    def forward_backbone(
        self, x: torch.Tensor, task: str, intermediate_indices: int | Sequence[int] = ()
    ) -> BackboneOutput:
        """Tokens, optional intermediate feature maps, and the routing of every task-routed layer.

        Args:
            x: images (B, C, H, W); any size divisible by the patch size.
            task: which routers to use.
            intermediate_indices: blocks whose outputs to return as (B, D, H/p, W/p) maps: an int
                n means the last n blocks, a sequence names block indices.
        """
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this model has {self.tasks}")
        wanted = self._intermediate_set(intermediate_indices)
        x = self.patch_embed(x)
        batch, grid_h, grid_w, dim = x.shape
        x = self._add_position_and_prefix(x.reshape(batch, grid_h * grid_w, dim), (grid_h, grid_w))
        if self.task_embed is not None:
            x = x + self.task_embed[task]

        out = BackboneOutput(tokens=x)
        for i, block in enumerate(self.blocks):
            x, block_routing = self._run_block(block, x, task, (grid_h, grid_w))
            for name, routing in block_routing.items():
                out.routing[f"blocks.{i}.{name}"] = routing
            if i in wanted:
                spatial = x[:, self.num_prefix_tokens :].reshape(batch, grid_h, grid_w, dim)
                out.intermediates.append(spatial.permute(0, 3, 1, 2).contiguous())
        out.tokens = self.norm(x)
        return out

    def _run_block(
        self, block: TaskBlock, x: torch.Tensor, task: str, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, Routing]]:
        """One block; with activation checkpointing (training with gradients on), through
        torch.utils.checkpoint: only the block's input is kept, and the backward reruns the block.

        The routing records come out of the checkpoint like any output and keep their gradients. The
        rerun is the same computation: the CPU and CUDA RNG states (drop path, router noise drawn from
        torch's generators) and the autocast state are replayed, and the blocks keep no running state
        a second forward would count twice (expert usage is counted by the training loop from the
        records). Early stop is off, so the rerun always runs the whole block: under expert
        parallelism it runs the block's all-to-alls again, and every rank must run all of them.
        """
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return block(x, task, grid)
        with set_checkpoint_early_stop(False):
            return checkpoint(block, x, task, grid, use_reentrant=False)

    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Normalised tokens (B, prefix + N, D), like timm's `forward_features`."""
        return self.forward_backbone(x, task).tokens

    def forward_intermediates(
        self, x: torch.Tensor, task: str, indices: int | Sequence[int] = 4
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final tokens, feature maps) for dense heads; `indices` as in timm."""
        out = self.forward_backbone(x, task, indices)
        return out.tokens, out.intermediates

    def _intermediate_set(self, indices: int | Sequence[int]) -> set[int]:
        depth = len(self.blocks)
        if isinstance(indices, int):
            return set(range(depth - indices, depth))
        return {i % depth for i in indices}

    def _add_position_and_prefix(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(
                pos_embed,
                new_size=list(grid),
                old_size=list(self.patch_embed.grid_size),
                num_prefix_tokens=self.num_prefix_tokens,
            )
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + pos_embed

    # ---------------------------------------------------------- introspection
    def window_args(self) -> dict:
        """The constructor arguments of the windowed attention, {} when every block is global: what a
        saved record must carry to rebuild this model (moevit.prune.extract)."""
        if not self.window_size:
            return {}
        return {"window_size": self.window_size, "global_blocks": list(self.global_blocks)}

    def mlp_layers(self) -> dict[str, MoEMlp]:
        """The MoE MLP layers by name (`blocks.<i>.mlp`), in forward order: the experts pruning and
        continual learning act on (attention-head experts are left whole)."""
        return {name: module for name, module in self.routed_layers() if isinstance(module, MoEMlp)}

    def routed_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) of every task-routed layer, in forward order."""
        for i, block in enumerate(self.blocks):
            for part in ("attn", "mlp"):
                module = getattr(block, part)
                if routes_tasks(module):
                    yield f"blocks.{i}.{part}", module

    def routers(self) -> Iterator[tuple[str, TaskRouter]]:
        for name, module in self.routed_layers():
            yield name, module.router

    def set_force_balanced_routing(self, enabled: bool) -> None:
        """Round-robin routing (tests): every expert gets tokens, every parameter a gradient."""
        for _, router in self.routers():
            router.force_balanced = enabled

    def no_weight_decay(self) -> set[str]:
        """Parameter names a trainer should not decay (timm's hook), besides 1-D ones and biases: the
        embeddings, and the gates (decay would pull every task's logits towards uniform routing)."""
        names = {"pos_embed", "cls_token"}
        if self.task_embed is not None:
            names |= {f"task_embed.{task}" for task in self.tasks}
        names |= {
            f"{layer}.router.{name}"
            for layer, router in self.routers()
            for name, _ in router.named_parameters()
        }
        return names


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn per-block activation checkpointing on or off in every MoEViT inside `model` (a backbone or
    a MultiTaskModel); returns how many backbones it set."""
    backbones = [module for module in model.modules() if isinstance(module, MoEViT)]
    for backbone in backbones:
        backbone.activation_checkpointing = enabled
    return len(backbones)


def _check_windows(window_size: int, global_blocks: Sequence[int], depth: int) -> tuple[int, tuple[int, ...]]:
    """(window_size, sorted global block indices); ValueError naming a bad value."""
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
        raise ValueError(f"window_size must be an int >= 0 (0: global attention), got {window_size!r}")
    bad = [i for i in global_blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"global_blocks {bad} are not block indices of this {depth}-block model (0..{depth - 1})"
        )
    return window_size, tuple(sorted(set(global_blocks)))
