"""Training one task of MoE-Adapters (METHODS.md section 1), on one device or several with torchrun.

Yu et al., "Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters",
CVPR 2024 (arXiv 2403.11549).

Per task: a new router, AdamW (weight decay 0) with warm-up + cosine schedule, cross-entropy with
label smoothing over the task's classes, logits = 100 * cos(image, text) where the class prompts are
re-encoded through the adapted text encoder every step; then activate-freeze and pool growth.

Distributed data parallel is PyTorch's own: under ``torchrun`` (WORLD_SIZE > 1) the same code wraps
the model in ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU) and each rank takes its slice of
the global batch. Which image a draw picks and how it is cropped depend only on (seed, draw number),
so a run on N processes sees exactly the images and crops of a run on one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgeclip.domain import MIN_IMAGES_PER_CLASS, MIN_TASK_IMAGES, MINIMUM_TEXT
from edgeclip.errors import DomainError, ImageError, UsageError
from edgeclip.images import decode_for, decode_image, default_workers, preprocess
from edgeclip.manifest import (
    DEFAULT_MOE_BATCH_SIZE,
    DEFAULT_MOE_FREEZE_RULE,
    DEFAULT_MOE_ITERATIONS,
    DEFAULT_MOE_LR,
    DEFAULT_MOE_WARMUP,
    Preprocess,
)
from edgeclip.train.backbone import preprocess_of
from edgeclip.train.moe import (
    FREEZE_RULES,
    MoECLIP,
    MoELayer,
    SelectionSet,
    count_selections,
    exact_fp32,
    freeze_experts,
    grow_pools,
    mask_frozen_grads,
    set_trainable,
)

log = logging.getLogger(__name__)

Sample = tuple[str | Path, int]  # (image path, class index within the task)
Tokenize = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """One task's training recipe; defaults are the paper's full-shot values (5-shot: shots=5, 500 iterations),
    defined once in ``edgeclip.manifest`` (``DEFAULT_MOE_*``).

    ``lr`` is the AdamW peak rate, ``warmup`` and ``iterations`` are optimizer steps, ``batch_size``
    images per step over all ranks, ``crop_scale`` RandomResizedCrop's area fraction. Raises UsageError
    on out-of-range values, an unknown freeze rule or precision."""

    iterations: int = DEFAULT_MOE_ITERATIONS
    batch_size: int = DEFAULT_MOE_BATCH_SIZE  # global batch (split across DDP ranks)
    lr: float = DEFAULT_MOE_LR
    warmup: int = DEFAULT_MOE_WARMUP
    label_smoothing: float = 0.2
    logit_scale: float = 100.0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    shots: int | None = None  # training images per class; None = all
    seed: int = 0
    freeze_rule: str = DEFAULT_MOE_FREEZE_RULE  # 'strict' (edgeclip) or 'paper' (top-k most selected per block)
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'
    precision: str = "auto"  # 'auto' (bf16/fp16 autocast on CUDA, fp32 on CPU), 'fp32', 'bf16', 'fp16'
    workers: int | None = None  # DataLoader worker processes; None: from the cores and device (loader_workers)
    # called on rank 0 after every step with (step, iterations, loss): the caller reports progress (on stderr)
    on_step: Callable[[int, int, float], None] | None = None
    exact_preprocess: bool = False  # decode at full resolution (the bundle's preprocess.exact), else reduced

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise UsageError("iterations and batch_size must be >= 1, lr > 0, warmup >= 0.")
        if self.shots is not None and self.shots < 1:
            raise UsageError("shots must be >= 1 (or None for every image).")
        if self.freeze_rule not in FREEZE_RULES:
            raise UsageError(f"freeze_rule must be one of {FREEZE_RULES}, got '{self.freeze_rule}'.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UsageError(f"precision must be auto, fp32, bf16 or fp16, got '{self.precision}'.")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"workers must be >= 0 (or None for the default), got {self.workers}.")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError("crop_scale must satisfy 0 < low <= high <= 1.")


@dataclass
class TaskResult:
    """What training one task produced: expert counts and freezes per layer, losses, speed, samples."""
    task: int  # the router index of the learned task
    counts: dict[str, np.ndarray]  # layer -> training selections per expert (this task)
    frozen: dict[str, np.ndarray]  # layer -> experts newly frozen after this task
    grown: dict[str, int]  # layer -> experts added to the pool after this task
    losses: list[float]  # mean training loss per iteration (over all ranks)
    images_per_s: float  # global images per second over the training loop
    samples: list[Sample]  # the training images used (after shots and skipping)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images


# ----- data ----------------------------------------------------------------------------------------
# Training decodes with edgeclip.images, the path classify and the RAIL/gate embeddings use (EXIF
# orientation, colour mapping, fast reduced decode); the random crop is applied on top of it.
def _train_cover(cfg: Preprocess, crop_scale: tuple[float, float]) -> int:
    """Pixels a training decode must keep so that the smallest random crop still covers the input."""
    return math.ceil(cfg.image_size / math.sqrt(crop_scale[0]))


def _check_image(path: str, cfg: Preprocess | None = None) -> str | None:
    """None when the image decodes (the shared decoder), otherwise the error message naming the file."""
    try:
        if cfg is None:
            decode_image(path, cover=1)
        else:
            decode_for(path, cfg)
        return None
    except ImageError as exc:
        return str(exc)


def select_samples(
    samples: Sequence[Sample], n_classes: int, shots: int | None, seed: int, cfg: Preprocess | None = None
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Readable training images: up to ``shots`` per class (a seeded choice), unreadable ones reported
    (each named in a logged warning).

    Refuses (DomainError), before anything is trained, a task with fewer than 2 classes, a class left
    with fewer than ``MIN_IMAGES_PER_CLASS`` readable images or a task with fewer than ``MIN_TASK_IMAGES``;
    UsageError for a label outside [0, n_classes). Returns (chosen samples, [(path, reason)] skipped).
    """
    if n_classes < 2:
        raise DomainError(f"A task needs at least 2 classes, got {n_classes}.")
    by_class: dict[int, list[str]] = {c: [] for c in range(n_classes)}
    for path, label in samples:
        if not 0 <= int(label) < n_classes:
            raise UsageError(f"Class index {label} of {path} is outside 0..{n_classes - 1}.")
        by_class[int(label)].append(str(path))
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    short: list[str] = []
    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        for label, paths in by_class.items():
            order = [paths[i] for i in rng.permutation(len(paths))]
            taken: list[str] = []
            bad = 0
            step = len(order) if shots is None else shots
            start = 0
            while start < len(order) and (shots is None or len(taken) < shots):
                batch = order[start : start + step]
                for path, reason in zip(batch, pool.map(lambda p: _check_image(p, cfg), batch)):
                    if reason is None:
                        if shots is None or len(taken) < shots:
                            taken.append(path)
                    else:
                        skipped.append((path, reason))
                        bad += 1
                start += step
            if len(taken) < MIN_IMAGES_PER_CLASS:
                short.append(f"Class {label} ({len(taken)} readable, {bad} unreadable)")
            chosen += [(p, label) for p in taken]
    for _path, reason in skipped:
        log.warning("left out of training: %s", reason)
    if short:
        raise DomainError(f"Too few readable training images: {', '.join(short)}; {MINIMUM_TEXT}.")
    if len(chosen) < MIN_TASK_IMAGES:
        raise DomainError(f"Only {len(chosen)} readable training image(s) ({len(skipped)} unreadable); {MINIMUM_TEXT}.")
    return chosen, skipped


class _Draws(Dataset):
    """Item n = the n-th image drawn for training: epochs of seeded permutations, a seeded crop per draw."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, seed: int,
                 decode: Callable[[str | Path], Image.Image] | None = None) -> None:
        self.samples, self.transform, self.seed = list(samples), transform, seed
        self.decode = decode or (lambda path: decode_image(path).image)
        self._epoch, self._order = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return self._order

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        path, label = self.samples[int(self._permutation(draw // n)[draw % n])]
        rgb = self.decode(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + draw) % 2**63)
            return self.transform(rgb), label


class _RankBatches:
    """Batch sampler: at step s, rank r takes draws [s*G + r*b, s*G + (r+1)*b) of the global batch G."""

    def __init__(self, steps: int, global_batch: int, rank: int, world: int) -> None:
        self.steps, self.global_batch, self.rank, self.local = steps, global_batch, rank, global_batch // world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.steps):
            start = step * self.global_batch + self.rank * self.local
            yield list(range(start, start + self.local))


def _transforms(clip: nn.Module, crop_scale: tuple[float, float]) -> tuple[Callable, Callable]:
    """(training, eval) transforms of a decoded RGB image (``edgeclip.images.decode_image``) to a
    float32 tensor [3, S, S]: training is a random resized crop (the augmentation) with the model's
    filter, ToTensor and Normalize; eval is ``edgeclip.images.preprocess``, classify's transform."""
    from torchvision import transforms as T

    cfg = preprocess_of(clip)
    interpolation = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    train = T.Compose(
        [
            T.RandomResizedCrop((cfg.image_size, cfg.image_size), scale=crop_scale, interpolation=interpolation),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )

    def evaluate(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, cfg))

    return train, evaluate


def loader_workers(device: torch.device, cores: int | None = None) -> int:
    """Default DataLoader worker processes: on CUDA one per core but one (the training process
    keeps one), at most 8; on CPU none below 4 cores (the training step uses every core and decoding
    is a few percent of it), else one, so decoding overlaps the step."""
    cores = cores or default_workers()
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores < 4 else 1


def training_loader(draws: Dataset, batches: "_RankBatches", device: torch.device, workers: int | None,
                    seed: int) -> DataLoader:
    """The training DataLoader: ``workers`` processes (None: ``loader_workers``) that decode
    through ``edgeclip.images`` and crop; the dataset holds paths and picklable callables only, no
    model state. Pinned memory on CUDA (the copy overlaps the step), persistent workers, two batches
    prefetched per worker. Which image a draw picks and its crop are seeded by the draw alone
    (``_Draws``), so the batches do not depend on the number of workers; the workers' own seeds
    derive from ``seed``."""
    workers = loader_workers(device) if workers is None else workers
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    return DataLoader(
        draws, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed), **extra,
    )


# ----- devices and processes -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device


def _setup_distributed(device_setting: str) -> _Dist:
    """Rank, world size and device; joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_setting == "auto" else device_setting.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f"device '{device_setting}' asked for CUDA, but no CUDA device is available.")
    if world <= 1:
        device = torch.device(("cuda" if use_cuda else "cpu") if device_setting == "auto" else device_setting)
        return _Dist(0, 1, device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _autocast(device: torch.device, precision: str) -> tuple[Callable[[], object], bool]:
    """(autocast context factory, whether a GradScaler is needed)."""
    if device.type != "cuda" or precision == "fp32":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            raise UsageError(f"precision '{precision}' needs a CUDA device; use fp32 (or auto) on CPU.")
        return nullcontext, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16


def _all_reduce(tensor: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----- training -----------------------------------------------------------------------------------
def _isolated_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on a forked torch RNG: the seeds it sets (routing noise and dropout draw from torch's
    global generator, which they take no generator argument for) never leak to the caller."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return run


@_isolated_rng
def train_task(
    model: MoECLIP,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    template: str,
    settings: TrainSettings | None = None,
    tokenize: Tokenize | None = None,
) -> TaskResult:
    """Learn one task: add its router, train, freeze experts by ``settings.freeze_rule``, grow the pools.

    ``template`` is one prompt with '{}' for the class name, e.g. 'a photo of a {}.'.
    Under torchrun every rank calls this with the same arguments; all ranks end with the same model.
    Raises UsageError when the template lacks '{}', the batch does not split evenly over the ranks,
    or the device or precision asks for CUDA that is not there; DomainError as ``select_samples``.
    """
    settings = settings or TrainSettings()
    if "{}" not in template:
        raise UsageError(f"The prompt template needs '{{}}' for the class name, got '{template}'.")
    dist_ = _setup_distributed(settings.device)
    if settings.batch_size % dist_.world:
        raise UsageError(f"batch_size {settings.batch_size} is not divisible by the {dist_.world} processes.")
    if tokenize is None:
        import open_clip

        tokenize = open_clip.tokenize
    cfg = preprocess_of(model.clip, settings.exact_preprocess)
    chosen, skipped = select_samples(samples, len(class_names), settings.shots, settings.seed, cfg)

    task = model.add_task()
    model.to(dist_.device)
    set_trainable(model, task)
    torch.manual_seed(settings.seed + dist_.rank)  # routing noise and dropout, different per rank
    train_tf, eval_tf = _transforms(model.clip, settings.crop_scale)
    loader = training_loader(
        _Draws(chosen, train_tf, settings.seed, decode=_Decoder(cfg, _train_cover(cfg, settings.crop_scale))),
        _RankBatches(settings.iterations, settings.batch_size, dist_.rank, dist_.world),
        dist_.device, settings.workers, settings.seed,
    )
    tokens = tokenize([template.format(c) for c in class_names]).to(dist_.device)

    params = [p for p in model.adapter_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)  # wd 0 keeps frozen experts exact
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, settings.warmup, settings.iterations)
    )
    autocast, needs_scaler = _autocast(dist_.device, settings.precision)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    net: nn.Module = model
    if dist_.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Selection counts are per rank until summed after the task: no buffer sync in forward.
        ddp_args = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers": False}
        net = DistributedDataParallel(
            model,
            device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None,
            find_unused_parameters=not model.config.noisy_gating,  # w_noise is unused without noise
            **no_sync,
        )
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    def record(layer: MoELayer, task_ids: torch.Tensor, idx: torch.Tensor) -> None:
        if layer.encoder == "image" or dist_.rank == 0:  # every rank encodes the same prompts: count once
            count_selections(layer, task_ids, idx)

    report = settings.on_step if dist_.rank == 0 else None
    pending: torch.Tensor | None = None  # the last step's mean loss, read after the next step is queued

    def read_loss(mean_loss: torch.Tensor) -> None:
        losses.append(float(mean_loss))  # waits for that step only: the device stays a step ahead
        if report is not None:
            report(len(losses), settings.iterations, losses[-1])

    with model.recording(record):
        for images, labels in loader:
            images = images.to(dist_.device, non_blocking=True)
            labels = labels.to(dist_.device, non_blocking=True)
            with autocast():
                image_feats, text_feats = net(images, task, tokens, task)
            # the logits (100 cos) and the loss in float32 on every device, outside autocast
            logits = settings.logit_scale * image_feats.float() @ text_feats.float().t()
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            mask_frozen_grads(model, task)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            schedule.step()
            if pending is not None:
                read_loss(pending)
            pending = _all_reduce(loss.detach().float().clone(), dist_.world) / dist_.world
        if pending is not None:
            read_loss(pending)
    elapsed = time.perf_counter() - start
    del loader  # its worker processes end here
    del net
    model.eval()
    for name, layer in model.named_layers():
        _all_reduce(layer.counts[task], dist_.world)
    counts = {name: layer.counts[task].cpu().numpy().copy() for name, layer in model.named_layers()}

    selected = None
    if settings.freeze_rule == "strict":
        selected = task_selections(model, task, chosen, tokens, eval_tf, dist_, cfg=cfg)
    frozen = freeze_experts(model, task, settings.freeze_rule, selected)
    torch.manual_seed(settings.seed)  # new experts start identical on every rank
    grown = grow_pools(model)
    for param in model.adapter_parameters():
        param.requires_grad_(False)
    return TaskResult(
        task=task,
        counts=counts,
        frozen=frozen,
        grown=grown,
        losses=losses,
        images_per_s=settings.iterations * settings.batch_size / elapsed,
        samples=chosen,
        skipped=skipped,
    )


@torch.no_grad()
def task_selections(
    model: MoECLIP,
    task: int,
    samples: Sequence[Sample],
    tokens: torch.Tensor,
    transform: Callable,
    dist_: _Dist | None = None,
    batch_size: int = DEFAULT_MOE_BATCH_SIZE,
    cfg: Preprocess | None = None,
) -> SelectionSet:
    """Every expert ``task``'s router selects with clean gating on its training images (decoded as
    classify decodes them, for ``cfg``; then ``transform``) and its prompts (text routing is
    prompt-independent). Ranks share the images and merge the sets."""
    cfg = cfg or preprocess_of(model.clip)
    dist_ = dist_ or _Dist(0, 1, next(model.parameters()).device)
    selected = SelectionSet(model)
    model.eval()
    mine = list(samples)[dist_.rank :: dist_.world]
    with model.recording(selected), exact_fp32():  # float32 as the exported graph routes
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            images = torch.stack([transform(decode_for(p, cfg).image) for p, _ in chunk]).to(dist_.device)
            model.encode_image(images, task)
        model.encode_text(tokens[:1], task)
    for layer_id, mask in selected.selected.items():
        merged = _all_reduce(mask.to(torch.int32).to(dist_.device), dist_.world, op="max")
        selected.selected[layer_id] = merged.cpu().bool()
    return selected


@dataclass(frozen=True)
class _Decoder:
    """Picklable (DataLoader workers) shared decode of a training image, reduced to ``cover`` pixels."""

    cfg: Preprocess
    cover: int

    def __call__(self, path: str | Path) -> Image.Image:
        return decode_for(path, self.cfg, cover=self.cover).image


__all__ = ["TrainSettings", "TaskResult", "cosine_with_warmup", "select_samples", "task_selections", "train_task"]
