"""The configuration schema: the only place defaults live (with the per-format transform settings of
moevit.config.transforms, which it re-exports).

A run's YAML file maps onto `Config`; unknown keys and wrong types are errors (see loader.py).
Model sizes are the registered variant's (moevit.models.variants); a `None` here means "keep
the variant's value", so a config only names what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from moevit.config.errors import ConfigError
from moevit.config.transforms import (  # noqa: F401 (re-exported: part of the schema)
    FORMAT_TRANSFORMS,
    Ade20kTransforms,
    CocoTransforms,
    ImageNetTransforms,
)

TaskType = Literal["classification", "detection", "segmentation"]
DatasetFormat = Literal["imagenet", "coco", "ade20k"]
DatasetStorage = Literal["folder", "shards"]

# Which dataset format serves which task type.
FORMAT_TASK_TYPE: dict[str, str] = {
    "imagenet": "classification",
    "coco": "detection",
    "ade20k": "segmentation",
}


@dataclass
class MoEConfig:
    num_experts: int | None = None
    top_k: int | None = None
    expert_hidden: int | None = None  # None: the dense MLP width (lets dense weights upcycle)
    layers: str | list[int] | None = None  # "every:2", "last:4", "all", "none" or block indices
    task_embedding: bool | None = None
    attention_experts: int | None = None  # mixture of attention heads on MoE blocks; 0 = off
    attention_top_k: int | None = None
    attention_head_dim: int | None = None
    # Routing that cannot collapse at initialisation (issue 16): the gates' initial weights and the
    # training-only jitter of the router input (moevit.layers.router). None: the model's defaults.
    gate_init_std: float | None = None
    router_jitter: float | None = None
    # Expert capacity bound (issue 16): None is dropless; else each expert takes at most capacity_factor x
    # its even share of one forward's routed slots on its device, and the overflow passes the residual
    # (moevit.layers.capacity).
    capacity_factor: float | None = None
    # How the experts' matmuls run: "loop" (one GEMM per expert), "grouped" (`torch._grouped_mm`,
    # one kernel for all experts) or "auto" (the measured default per device: moevit.layers.experts,
    # docs/performance.md). None: the model's default ("auto"). Serves the plain model and the
    # expert-parallel wrapper alike; a grouped call the op cannot take runs the loop, with a warning.
    expert_impl: str | None = None

    def validate(self) -> None:
        if self.expert_impl is not None and self.expert_impl not in ("auto", "loop", "grouped"):
            raise ValueError(f"expert_impl must be auto, loop or grouped, got {self.expert_impl!r}")
        for name in ("num_experts", "top_k", "expert_hidden", "attention_top_k", "attention_head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.attention_experts is not None and self.attention_experts < 0:
            raise ValueError(f"attention_experts must be >= 0, got {self.attention_experts}")
        if self.capacity_factor is not None and not 0 < self.capacity_factor < float("inf"):
            raise ValueError(f"capacity_factor must be > 0 (or null: dropless), got {self.capacity_factor}")
        if self.gate_init_std is not None and not self.gate_init_std >= 0:
            raise ValueError(f"gate_init_std must be >= 0 (0: zero gates), got {self.gate_init_std}")
        if self.router_jitter is not None and not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1) (0: off), got {self.router_jitter}")


@dataclass
class ModelConfig:
    name: str = "moevit_tiny"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None
    # ViTDet's backbone for high-resolution inputs: attention within window_size x window_size token
    # windows in every block except `global_blocks`, which attend globally. 0: global everywhere.
    window_size: int | None = None
    global_blocks: list[int] | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Pretrained start (issue 16): a local checkpoint the model starts from (see moevit.artifacts.init).
    init: str | None = None
    # Upcycled experts (a dense timm/MAE `init`) get N(0, (this x the dense weight's std)^2) added to
    # their weight matrices, so identical copies can diverge; None or 0: exact copies.
    init_expert_noise: float | None = None

    def variant_overrides(self) -> dict:
        """Constructor arguments for `create_model`, only those this config sets."""
        not_constructor_arguments = ("name", "moe", "init", "init_expert_noise")
        overrides = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in not_constructor_arguments
        }
        moe = {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        moe["moe_layers"] = moe.pop("layers")
        return {key: value for key, value in {**overrides, **moe}.items() if value is not None}

    def validate(self) -> None:
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.window_size is not None and self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0: global attention), got {self.window_size}")
        if self.global_blocks is not None and any(index < 0 for index in self.global_blocks):
            raise ValueError(f"global_blocks must be block indices >= 0, got {self.global_blocks}")
        if self.init is not None and not self.init.strip():
            raise ValueError("init must name a local checkpoint file or directory (or be left out)")
        if self.init_expert_noise is not None:
            if self.init_expert_noise < 0:
                raise ValueError(f"init_expert_noise must be >= 0, got {self.init_expert_noise}")
            if self.init is None:
                raise ValueError(
                    "init_expert_noise needs init (the dense checkpoint whose experts it perturbs)"
                )


DEFAULT_IMAGE_SIZE = 224  # ImageNet's training resolution; also what a task without a dataset is built for


@dataclass
class DatasetConfig:
    format: DatasetFormat
    root: str
    # folder: `root` is the dataset in its own layout. shards: `root` holds one directory per split
    # (`root/{train_split}`, `root/{val_split}`), each written by `moevit data shard --out`; `format`
    # still names the dataset kind, which fixes the transforms and is checked against the shards.
    storage: DatasetStorage = "folder"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = DEFAULT_IMAGE_SIZE
    batch_size: int = 32
    # Classification training crops: RandomResizedCrop area range. timm/DeiT's (0.08, 1) suits
    # ImageNet photos; a dataset whose label needs the whole object in view wants a larger minimum.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # The format's transform settings: a mapping checked against FORMAT_TRANSFORMS[format] (an
    # ImageNetTransforms, CocoTransforms or Ade20kTransforms); read it through `transform_settings()`.
    transforms: dict[str, Any] = field(default_factory=dict)

    def transform_settings(self) -> ImageNetTransforms | CocoTransforms | Ade20kTransforms:
        """The `transforms` section as its format's settings class, defaults filled in."""
        from moevit.config.loader import build_config  # the loader imports this module

        return build_config(FORMAT_TRANSFORMS[self.format], self.transforms, source="transforms")

    def validate(self) -> None:
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError("image_size and batch_size must be >= 1")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        try:
            settings = self.transform_settings()
        except ConfigError as err:
            raise ValueError(f"transforms (format {self.format}): {err.message}") from None
        if isinstance(settings, Ade20kTransforms) and (settings.slide_stride or 0) > self.image_size:
            raise ValueError(
                f"transforms.slide_stride {settings.slide_stride} exceeds image_size {self.image_size} (the "
                "slide window): pixels between windows would get no prediction"
            )
        if isinstance(settings, ImageNetTransforms) and settings.mixes and self.batch_size % 2:
            # timm's Mixup in batch mode mixes image i with image B-1-i, so it refuses odd batches.
            raise ValueError(f"batch_size must be even with mixup or cutmix on, got {self.batch_size}")


@dataclass
class TaskConfig:
    type: TaskType
    num_classes: int
    data: DatasetConfig | None = None
    head_options: dict[str, Any] = field(default_factory=dict)  # head constructor arguments (moevit.heads)
    loss_weight: float = 1.0  # static weight; the loss balancer may change it during training

    @property
    def image_size(self) -> int:
        """The input size the task's head is built for: its dataset's, else the default."""
        return self.data.image_size if self.data is not None else DEFAULT_IMAGE_SIZE

    def validate(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if self.data is not None and FORMAT_TASK_TYPE[self.data.format] != self.type:
            raise ValueError(
                f"dataset format {self.data.format!r} serves {FORMAT_TASK_TYPE[self.data.format]}, not {self.type}"
            )
        if "label_smoothing" in self.head_options:
            # One place sets smoothing: the training targets (ImageNetTransforms), so it cannot apply twice.
            raise ValueError(
                "head_options.label_smoothing is not a head option; set data.transforms.label_smoothing"
            )


@dataclass
class AuxLossConfig:
    """Coefficients of the auxiliary MoE losses (moevit.layers.aux_losses)."""

    load_balance: float = 0.01  # Switch Transformer's alpha
    z_loss: float = 0.001  # ST-MoE's router z-loss coefficient
    mutual_information: float = 0.01  # Mod-Squad's MI loss; 0 turns task specialisation pressure off
    # Tasks a step does not train enter the MI loss through a running estimate of their task-expert
    # rows (moevit.train.task_expert_estimate); this is the weight of the old row at each update of a
    # task's row. One update already sums a whole global batch of tokens, so a short memory suffices,
    # and a long one would hold routing from before the latest updates.
    mutual_information_decay: float = 0.5

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.mutual_information_decay >= 1:
            raise ValueError(f"mutual_information_decay must be < 1, got {self.mutual_information_decay}")


@dataclass
class TaskSamplingConfig:
    """Which task(s) each step trains (moevit.data.schedule.TaskSchedule)."""

    strategy: Literal["all", "weighted", "round_robin"] = (
        "all"  # "all": one micro-batch of every task per step
    )
    ratios: dict[str, float] | None = None  # "weighted": relative probability of each task per step
    temperature: float | None = None  # "weighted" without ratios: p_t ~ dataset_size_t ** (1 / T)

    def validate(self) -> None:
        if self.strategy != "weighted" and (self.ratios is not None or self.temperature is not None):
            raise ValueError(f"ratios and temperature apply to strategy 'weighted', not {self.strategy!r}")
        if self.ratios is not None and self.temperature is not None:
            raise ValueError("give either ratios or temperature, not both")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.ratios is not None and any(r <= 0 for r in self.ratios.values()):
            raise ValueError(f"ratios must be > 0, got {self.ratios}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05  # timm/DeiT's ViT default
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0  # global norm; 0 disables
    # Layer-wise lr decay (issue 16; BEiT/ViTDet): block i of n gets lr x layer_decay ** (n - i), the
    # embeddings lr x layer_decay ** (n + 1), final norm and heads lr; 1 is off (moevit.parallel.engine).
    layer_decay: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay, warmup_steps and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] (1: off), got {self.layer_decay}")


@dataclass
class LossBalancingConfig:
    """How the task losses are weighted each step (moevit.train.balancing); every method multiplies
    each task's `loss_weight`."""

    method: Literal["static", "uncertainty", "dwa"] = "static"  # static: the loss_weights alone
    temperature: float = 2.0  # DWA's softmax temperature T (Liu et al. 2019 use 2)
    window: int = 50  # DWA: steps averaged into one loss measurement (the paper averages an epoch)
    lr: float = 0.01  # uncertainty weighting: Adam learning rate of the per-task log-variances

    def validate(self) -> None:
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0, got {self.temperature} and {self.lr}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@dataclass
class WandbConfig:
    """Weights & Biases logging of the metrics.jsonl records (moevit.train.wandb_sink), from rank 0.

    Needs the `wandb` package; a run that asks for it without the package stops before training."""

    enabled: bool = False
    project: str = "moevit"
    name: str | None = None  # None: wandb picks one
    mode: Literal["offline", "online"] = "offline"  # offline: files under the run dir, `wandb sync` later

    def validate(self) -> None:
        if not self.project:
            raise ValueError("project must not be empty")


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    eval_batches: int | None = None  # cap on evaluation batches per task; None: the whole split
    checkpoint_every: int = 500  # 0: only at the end
    keep_last: int = 2  # complete checkpoints kept in the run dir
    num_workers: int = 2  # DataLoader workers per task and rank
    # Consecutive steps with a NaN/inf loss on some rank (each skipped by all ranks together) that stop
    # training: a few are a bad batch, a run of them a diverged model. 0: never stop.
    max_bad_steps: int = 5
    # Expert usage for pruning (moevit.train.usage_plots): an exponential moving average of each task's
    # routed slots per expert, as Mod-Squad keeps; the weight of the old value at each step that trains
    # the task. 0.9 averages about the last 10 such steps: the routing of the model as it ends, not of
    # the early steps before the tasks specialised.
    usage_ema_decay: float = 0.9
    # Memory and schedule (issue 16): micro-batches per optimizer step (DeepSpeed's
    # gradient_accumulation_steps) and activation checkpointing of every transformer block.
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False
    # One device's dense peak TFLOPS at the run's precision, for the logged MFU (moevit.train.mfu); None:
    # the table of common GPUs by device name, and no MFU on a device it does not list (or on CPU).
    peak_tflops: float | None = None
    # Routing balanced from step 1 (issue 16): images of each task's train split on which a fresh run fits
    # its gates' per-expert selection biases before the first step (moevit.train.router_calibration).
    # 0: off (the biases stay zero: plain top-k). A resumed run loads the biases instead.
    router_calibration_images: int = 512
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sampling: TaskSamplingConfig = field(default_factory=TaskSamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_balancing: LossBalancingConfig = field(default_factory=LossBalancingConfig)

    def validate(self) -> None:
        for name in ("steps", "log_every", "keep_last", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "eval_every",
            "checkpoint_every",
            "num_workers",
            "max_bad_steps",
            "router_calibration_images",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if not 0 <= self.usage_ema_decay < 1:
            raise ValueError(f"usage_ema_decay must be in [0, 1), got {self.usage_ema_decay}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")


@dataclass
class ParallelConfig:
    """Device layout. World size comes from the launcher; ep_size must divide it and the expert count."""

    ep_size: int = 1  # ranks that share one copy of the experts (expert parallelism)
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU

    def validate(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")


@dataclass
class ContinualConfig:
    """Continual learning after `moevit expand` (moevit.continual): the new task trains, the old ones
    keep their outputs bit for bit. `moevit expand` writes this section; a config rarely edits it."""

    init: str | None = None  # the `moevit expand --out` dir: training starts from its model.pt
    # task -> n: that task routes among experts 0..n-1 of every MoE MLP layer only (architecture:
    # the tasks trained before the expansion never reach the experts added for later ones).
    task_experts: dict[str, int] = field(default_factory=dict)
    frozen_experts: int = 0  # experts 0..n-1 of every MoE MLP layer (the pre-expansion ones) get no update
    train_tasks: list[str] | None = None  # tasks that train (None: all); the others are only evaluated
    # Also train the weights every task shares (patch embedding, attention, norms, dense MLPs); off by
    # default because the old tasks' outputs then change.
    train_shared: bool = False

    def validate(self) -> None:
        if self.frozen_experts < 0:
            raise ValueError(f"frozen_experts must be >= 0, got {self.frozen_experts}")
        bad = {task: n for task, n in self.task_experts.items() if n < 1}
        if bad:
            raise ValueError(f"task_experts must be >= 1, got {bad}")
        if self.train_tasks is not None and not self.train_tasks:
            raise ValueError("train_tasks: name at least one task (or leave it out: every task trains)")


@dataclass
class Config:
    tasks: dict[str, TaskConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    continual: ContinualConfig | None = None  # set by `moevit expand` (moevit.continual)
    seed: int = 0
    output_dir: str = "runs/default"

    def only_tasks(self, tasks: list[str]) -> Config:
        """This config with only `tasks` (in that order), their sampling ratios included."""
        ratios = self.train.sampling.ratios
        sampling = replace(
            self.train.sampling, ratios=None if ratios is None else {t: ratios[t] for t in tasks}
        )
        return replace(
            self, tasks={t: self.tasks[t] for t in tasks}, train=replace(self.train, sampling=sampling)
        )

    def train_tasks(self) -> list[str]:
        """The tasks that train, in config order: a continual run's `continual.train_tasks`, else all."""
        if self.continual is None or self.continual.train_tasks is None:
            return list(self.tasks)
        return [task for task in self.tasks if task in self.continual.train_tasks]

    def training_view(self) -> Config:
        """This config with only the tasks that train: what the loader, loss balancer and step see
        (evaluation keeps every task, so a continual run still measures the old ones)."""
        tasks = self.train_tasks()
        return self if tasks == list(self.tasks) else self.only_tasks(tasks)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        if self.continual is not None:
            for key, names in (
                ("train_tasks", self.continual.train_tasks or []),
                ("task_experts", list(self.continual.task_experts)),
            ):
                unknown = sorted(set(names) - set(self.tasks))
                if unknown:
                    raise ValueError(f"'continual.{key}' names {unknown}; the tasks are {list(self.tasks)}")
            if self.model.init is not None:  # two starts would silently overwrite one another
                raise ValueError("'model.init' and 'continual' both set the starting weights: keep one")
        ratios = self.train.sampling.ratios
        if ratios is not None and set(ratios) != set(self.tasks):
            raise ValueError(f"train.sampling.ratios names {sorted(ratios)}, tasks are {sorted(self.tasks)}")
        num_experts = self.model.moe.num_experts
        if num_experts is not None and num_experts % self.parallel.ep_size:
            raise ValueError(
                f"parallel.ep_size={self.parallel.ep_size} does not divide model.moe.num_experts={num_experts}"
            )
