"""MoE-Adapters (METHODS.md section 1) inserted into a frozen open_clip model, without editing open_clip.

Each chosen residual block of the image and text transformers is replaced by ``MoEResidualBlock``,
which owns the block's own ``ln_1/attn/ls_1/ln_2/mlp/ls_2`` modules (so the backbone's state-dict keys
do not change) plus a ``MoELayer``::

    h   = x + ls_1(Attn(ln_1(x)))
    out = h + ls_2(MLP(ln_2(h))) + sum_e g[:, e] * Expert_e(h)       g from h[:, 0] and the sample's task

Routing is per sample: ``task_ids`` (LongTensor [B]) picks each sample's router from the stacked
``w_gate [T, E, d]``, so one batch may mix tasks; ``ZERO_SHOT`` (-1) gives plain CLIP for that sample.
The inference path has no Python loop over samples and no data-dependent Python branch (ONNX export).

Experts of a block are stored stacked (``down_w [E, d, r]`` ...), and a sample's k experts are gathered
by index: the cost is k/E of running every expert. ``dense=True`` runs all E experts and weights them by
the sparse gate matrix instead (same result; about E/k times the adapter FLOPs).

Activate-freeze is kept as masks (``frozen [E]``) applied to gradients (``mask_frozen_grads``): with a
fresh AdamW per task and weight decay 0, an expert whose gradient is always zero never moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch
from torch import nn

from edgeclip.errors import UsageError
from edgeclip.manifest import (
    DEFAULT_MOE_BOTTLENECK,
    DEFAULT_MOE_DROPOUT,
    DEFAULT_MOE_ENCODERS,
    DEFAULT_MOE_EXPERTS,
    DEFAULT_MOE_NOISE_EPS,
    DEFAULT_MOE_SCALE,
    DEFAULT_MOE_TOP_K,
    FREEZE_RULES,
    MoEAdapters,
)

ZERO_SHOT = -1  # task id of a sample that must get plain CLIP (no adapter)
ENCODERS = ("image", "text")  # the encoders adapters can go into


@dataclass(frozen=True)
class MoEConfig:
    """Adapter settings; the defaults are the paper's (MoE-Adapters, arXiv 2403.11549; METHODS.md section 1),
    defined once in ``edgeclip.manifest`` (``DEFAULT_MOE_*``).

    n_experts E = 22 and top_k = 2 per block per encoder; bottleneck r = 64; expert output scale 0.1;
    noisy top-k gating while training (std = softplus(c W_n) + noise_eps). ``encoders``: which of
    ("image", "text") get adapters; ``last_blocks``: only the last N blocks (None = all); ``dense``:
    run all E experts weighted by the sparse gate (same result, for export). Raises UsageError on
    top_k outside [1, n_experts], bottleneck < 1, dropout outside [0, 1), unknown or empty encoders,
    or last_blocks < 1.
    """

    n_experts: int = DEFAULT_MOE_EXPERTS
    top_k: int = DEFAULT_MOE_TOP_K
    bottleneck: int = DEFAULT_MOE_BOTTLENECK
    scale: float = DEFAULT_MOE_SCALE  # expert output scale
    dropout: float = DEFAULT_MOE_DROPOUT  # inside each expert, after the ReLU
    noisy_gating: bool = True  # noisy top-k gating in train mode (never at inference)
    noise_eps: float = DEFAULT_MOE_NOISE_EPS  # added to softplus(c W_n): the noise never vanishes
    encoders: tuple[str, ...] = DEFAULT_MOE_ENCODERS
    last_blocks: int | None = None  # adapters in the last N blocks of each encoder; None = all
    dense: bool = False  # compute all experts and weight by the sparse gate (export alternative)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.n_experts < self.top_k:
            raise UsageError(f"Need 1 <= top_k <= n_experts, got top_k={self.top_k}, n_experts={self.n_experts}.")
        if self.bottleneck < 1 or not 0.0 <= self.dropout < 1.0:
            raise UsageError("bottleneck must be >= 1 and dropout in [0, 1).")
        unknown = set(self.encoders) - set(ENCODERS)
        if unknown or not self.encoders:
            raise UsageError(f"encoders must be a non-empty subset of {ENCODERS}, got {self.encoders}.")
        if self.last_blocks is not None and self.last_blocks < 1:
            raise UsageError("last_blocks must be >= 1 (or None for all blocks).")

    @classmethod
    def of(cls, adapters: MoEAdapters) -> "MoEConfig":
        """The configuration of the manifest's typed adapters section (``MoESettings.moe``); raises
        UsageError as the constructor does, TypeError for anything but a ``MoEAdapters``."""
        if not isinstance(adapters, MoEAdapters):
            raise TypeError(f"MoEConfig.of takes a manifest.MoEAdapters, not {type(adapters).__name__}")
        return cls(**msgspec.structs.asdict(adapters))


# A recorder receives (layer, task_ids [B], selected expert indices [B, k]) for every routed forward.
Recorder = Callable[["MoELayer", torch.Tensor, torch.Tensor], None]


@dataclass
class Routing:
    """What every MoE layer of one model reads during a forward: the samples' tasks, an optional recorder."""

    task_ids: torch.Tensor | None = None
    recorder: Recorder | None = None


class MoELayer(nn.Module):
    """The experts of one block and one router per task (METHODS.md section 1, MoE-Adapters arXiv 2403.11549).

    Parameters (float32, E experts, width d, bottleneck r, T tasks): ``down_w`` [E, d, r] (Kaiming-uniform),
    ``down_b`` [E, r], ``up_w`` [E, r, d] and ``up_b`` [E, d] (zero: a fresh layer adds exactly nothing);
    routers ``w_gate`` and ``w_noise`` [T, E, d] (zero-init, no bias). Buffers: ``router_valid`` [T, E]
    bool (experts a task's router may select), ``frozen`` [E] bool (activate-freeze), ``counts`` [T, E]
    int64 (training selections per task). ``routing`` is shared with the model's other layers and carries
    each sample's task id; ``encoder`` is "image" or "text".
    """

    def __init__(self, width: int, config: MoEConfig, routing: Routing, encoder: str = "image") -> None:
        super().__init__()
        self.width, self.config, self.encoder = width, config, encoder
        self.routing = routing  # shared with the model's other layers; not a module, not saved
        e, d, r = config.n_experts, width, config.bottleneck
        self.down_w = nn.Parameter(_kaiming_down(e, d, r))  # [E, d, r]
        self.down_b = nn.Parameter(torch.zeros(e, r))
        self.up_w = nn.Parameter(torch.zeros(e, r, d))  # zero: a fresh adapter adds exactly nothing
        self.up_b = nn.Parameter(torch.zeros(e, d))
        # Routers stored [T, E, d] (each row one expert's gate vector) so that a sample's logits are
        # row-wise dot products whose rounding does not depend on how many tasks or experts exist.
        self.w_gate = nn.Parameter(torch.zeros(0, e, d))
        self.w_noise = nn.Parameter(torch.zeros(0, e, d))
        self.register_buffer("router_valid", torch.zeros(0, e, dtype=torch.bool))  # [T, E]
        self.register_buffer("frozen", torch.zeros(e, dtype=torch.bool))  # [E]
        self.register_buffer("counts", torch.zeros(0, e, dtype=torch.int64))  # [T, E] training selections
        self.dropout = nn.Dropout(config.dropout)

    @property
    def n_experts(self) -> int:
        """E, the experts in this layer's pool (grows with ``grow``)."""
        return int(self.down_w.shape[0])

    @property
    def n_tasks(self) -> int:
        """T, the routers (one per task) this layer holds."""
        return int(self.w_gate.shape[0])

    # ----- pool and routers -------------------------------------------------------------------
    def add_router(self) -> None:
        """Append a new task's router: zero gate and noise weights [E, d]; it may select every expert of
        the pool, frozen ones included (METHODS.md section 1: one router per task, no fixed limit)."""
        d, e = self.width, self.n_experts
        zeros = self.w_gate.new_zeros(1, e, d)
        self.w_gate = nn.Parameter(torch.cat([self.w_gate.detach(), zeros]))
        self.w_noise = nn.Parameter(torch.cat([self.w_noise.detach(), zeros.clone()]))
        self.router_valid = torch.cat([self.router_valid, self.router_valid.new_ones(1, e)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(1, e)])

    def grow(self, n_new: int) -> None:
        """Append ``n_new`` fresh experts (zero output); existing routers can never select them."""
        if n_new <= 0:
            return
        d, r, t = self.width, self.config.bottleneck, self.n_tasks
        ref = self.down_w
        self.down_w = nn.Parameter(torch.cat([ref.detach(), _kaiming_down(n_new, d, r).to(ref)]))
        self.down_b = nn.Parameter(torch.cat([self.down_b.detach(), ref.new_zeros(n_new, r)]))
        self.up_w = nn.Parameter(torch.cat([self.up_w.detach(), ref.new_zeros(n_new, r, d)]))
        self.up_b = nn.Parameter(torch.cat([self.up_b.detach(), ref.new_zeros(n_new, d)]))
        self.w_gate = nn.Parameter(torch.cat([self.w_gate.detach(), ref.new_zeros(t, n_new, d)], dim=1))
        self.w_noise = nn.Parameter(torch.cat([self.w_noise.detach(), ref.new_zeros(t, n_new, d)], dim=1))
        self.router_valid = torch.cat([self.router_valid, self.router_valid.new_zeros(t, n_new)], dim=1)
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(n_new)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(t, n_new)], dim=1)

    def resize(self, n_experts: int, n_tasks: int) -> None:
        """Shape the layer for a saved state (fresh pool and routers; the values come from the state).

        Raises UsageError when the layer already has more experts or routers than asked for.
        """
        self.grow(n_experts - self.n_experts)
        while self.n_tasks < n_tasks:
            self.add_router()
        if self.n_experts != n_experts or self.n_tasks != n_tasks:
            raise UsageError(
                f"Cannot shrink an MoE layer from {self.n_experts} experts / {self.n_tasks} routers "
                f"to {n_experts} / {n_tasks}: load the state into a fresh model."
            )

    # ----- forward ----------------------------------------------------------------------------
    def gate(self, cls_token: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing of each sample by its task's router (METHODS.md section 1).

        cls_token: [B, d], the first token of h; task_ids: [B] int64 (``ZERO_SHOT`` = -1 allowed).
        logits = c W_g^t, plus N(0,1) * (softplus(c W_n^t) + noise_eps) in train mode with noisy gating;
        experts the task's router may not select get -inf. Returns (selected experts [B, k] int64, their
        weights [B, k] in cls_token's dtype): softmax over the k selected logits, 0 for ``ZERO_SHOT`` samples.
        """
        safe_ids = task_ids.clamp(min=0)  # [B]
        logits = _row_dot(cls_token, _rows(self.w_gate, safe_ids))  # [B, E]
        if self.training and self.config.noisy_gating:
            raw = _row_dot(cls_token, _rows(self.w_noise, safe_ids))
            std = nn.functional.softplus(raw) + self.config.noise_eps
            logits = logits + torch.randn_like(logits) * std
        valid = self.router_valid[safe_ids]  # [B, E]: experts added after a task are not its to choose
        logits = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
        top_idx = top_k_indices(logits, self.config.top_k)  # [B, k]: ONNX TopK's tie rule on every device
        top_logits = logits.gather(1, top_idx)
        weights = torch.softmax(top_logits.float(), dim=1).to(cls_token.dtype)
        weights = weights * (task_ids >= 0).to(weights.dtype)[:, None]
        return top_idx, weights

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter term scale * sum_e g_e Expert_e(h) for batch-first ``h`` [B, L, d] -> [B, L, d].

        The tasks come from the shared ``routing`` (set by ``MoECLIP.route``); raises UsageError when
        none are set. Calls the routing's recorder, if any, with the selections.
        """
        task_ids = self.routing.task_ids
        if task_ids is None:
            raise UsageError("An MoE-adapted model needs task ids: call encode_image/encode_text with task_ids.")
        idx, weights = self.gate(h[:, 0], task_ids)
        if self.routing.recorder is not None:
            self.routing.recorder(self, task_ids, idx)
        out = self._dense(h, idx, weights) if self.config.dense else self._gathered(h, idx, weights)
        return out * self.config.scale

    def _gathered(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        down_w, down_b = _rows(self.down_w, idx).to(dtype), _rows(self.down_b, idx).to(dtype)  # [B,k,d,r], [B,k,r]
        up_w, up_b = _rows(self.up_w, idx).to(dtype), _rows(self.up_b, idx).to(dtype)  # [B,k,r,d], [B,k,d]
        hidden = torch.einsum("bld,bkdr->bklr", h, down_w) + down_b[:, :, None, :]  # [B, k, L, r]
        hidden = self.dropout(torch.relu(hidden))
        out = torch.einsum("bklr,bkrd->bkld", hidden, up_w) + up_b[:, :, None, :]  # [B, k, L, d]
        return torch.einsum("bk,bkld->bld", weights, out)

    def _dense(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        gates = torch.zeros(h.shape[0], self.n_experts, dtype=dtype, device=h.device)
        gates = gates.scatter(1, idx, weights)  # [B, E], k non-zeros per row
        hidden = torch.einsum("bld,edr->belr", h, self.down_w.to(dtype)) + self.down_b.to(dtype)[None, :, None, :]
        hidden = self.dropout(torch.relu(hidden))  # [B, E, L, r]
        out = torch.einsum("belr,erd->beld", hidden, self.up_w.to(dtype)) + self.up_b.to(dtype)[None, :, None, :]
        return torch.einsum("be,beld->bld", gates, out)


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] (int64) of the k largest entries along the last axis, largest first, and among
    equal values the lower index first: the ONNX TopK rule (its spec), on CPU and CUDA alike.

    ``torch.topk`` leaves the order of ties to the kernel (on equal gate logits torch picked experts
    [14, 16] on CPU and [1, 0] on CUDA, the exported graph [0, 1]); a stable descending sort does not.
    The routers (``MoELayer.gate``), the selections the freeze rules record, and the exported graph
    therefore agree, e.g. on all-zero routers. -inf entries sort last. While torch.export traces (the
    ONNX export) this is ``torch.topk``, which becomes ONNX TopK, whose spec is this same rule
    (onnxruntime follows it: ``test_all_zero_routers_export_parity``); the exporter has no stable sort.
    """
    if torch.compiler.is_exporting():
        return torch.topk(values, k, dim=-1).indices
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def _rows(stack: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``stack[idx]`` for an index tensor of any shape, through index_select: its backward (index_add)
    is deterministic on CPU, unlike advanced indexing's (index_put with accumulate)."""
    return stack.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *stack.shape[1:])


def _row_dot(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, d] . [B, E, d] -> [B, E] as a multiply and a reduction over the contiguous last axis.

    Unlike a matmul, whose kernel (and so rounding) may change with the number of columns, each
    logit here is the same row reduction whatever E and T are: a frozen task routes bit-identically
    after later tasks were added or the pool grew.
    """
    return (w.to(c.dtype) * c[:, None, :]).sum(dim=-1)


def _kaiming_down(n: int, width: int, bottleneck: int) -> torch.Tensor:
    """Down-projections [n, d, r], each initialised as nn.Linear(d, r)'s weight (Kaiming-uniform, a=sqrt(5))."""
    w = torch.empty(n, bottleneck, width)
    for i in range(n):
        nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))
    return w.transpose(1, 2).contiguous()


class MoEResidualBlock(nn.Module):
    """open_clip's ResidualAttentionBlock with an MoE adapter in parallel to the MLP (METHODS.md section 1):
    out = h + ls_2(MLP(ln_2(h))) + MoE(h) with h = x + ls_1(Attn(ln_1(x))); the experts read h, not ln_2(h).

    It takes over the original block's submodules under the same names, so the backbone's
    parameter names are unchanged; the adapter adds ``<block>.moe.*``.
    """

    def __init__(self, block: nn.Module, moe: MoELayer) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ls_1 = block.ln_1, block.attn, block.ls_1
        self.ln_2, self.mlp, self.ls_2 = block.ln_2, block.mlp, block.ls_2
        self.batch_first = bool(getattr(block.attn, "batch_first", True))
        self.moe = moe

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks block 0
        """The dtype of the block's MLP weights (what open_clip casts inputs to)."""
        return self.mlp.c_fc.weight.dtype

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """open_clip's block signature: ``q_x`` [B, L, d] (or [L, B, d] when not batch_first) -> same shape.

        k_x and v_x are ignored (self-attention only); ``attn_mask`` [L, L] (the text encoder's causal mask).
        """
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        y = self.ln_1(q_x)
        h = q_x + self.ls_1(self.attn(y, y, y, need_weights=False, attn_mask=mask)[0])
        adapter = self.moe(h if self.batch_first else h.transpose(0, 1))  # the layer reads [B, L, d]
        if not self.batch_first:
            adapter = adapter.transpose(0, 1)
        return h + self.ls_2(self.mlp(self.ln_2(h))) + adapter


def encoder_transformers(clip: nn.Module) -> dict[str, nn.Module]:
    """The open_clip ``Transformer`` of each encoder ('image', 'text') of a CLIP or CustomTextCLIP."""
    found: dict[str, nn.Module] = {}
    visual = getattr(clip, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        found["image"] = visual.transformer
    text = getattr(clip, "transformer", None)
    if text is None and hasattr(clip, "text"):
        text = getattr(clip.text, "transformer", None)
    if text is not None and hasattr(text, "resblocks"):
        found["text"] = text
    return found


class MoECLIP(nn.Module):
    """A frozen open_clip model with MoE adapters (MoE-Adapters, arXiv 2403.11549; METHODS.md section 1).

    ``clip`` is modified in place: its parameters are frozen and the chosen residual blocks of each
    encoder in ``config.encoders`` are replaced by ``MoEResidualBlock``. The model starts with no task:
    call ``add_task`` before encoding with a task id >= 0. Raises UsageError when the model lacks an
    asked-for encoder or its blocks are not open_clip's plain ResidualAttentionBlock.
    """

    def __init__(self, clip: nn.Module, config: MoEConfig | None = None) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock

        self.config = config or MoEConfig()
        self.routing = Routing()
        self.clip = clip
        for param in clip.parameters():
            param.requires_grad_(False)
        transformers = encoder_transformers(clip)
        for encoder in self.config.encoders:
            if encoder not in transformers:
                raise UsageError(f"This open_clip model has no transformer {encoder} encoder for MoE adapters.")
            blocks = transformers[encoder].resblocks
            n = len(blocks) if self.config.last_blocks is None else min(self.config.last_blocks, len(blocks))
            for i in range(len(blocks) - n, len(blocks)):
                block = blocks[i]
                if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
                    raise UsageError(
                        f"MoE adapters support open_clip's ResidualAttentionBlock, not {type(block).__name__}."
                    )
                width = int(block.ln_1.normalized_shape[0])
                moe = MoELayer(width, self.config, self.routing, encoder).to(block.mlp.c_fc.weight.device)
                blocks[i] = MoEResidualBlock(block, moe)

    # ----- structure --------------------------------------------------------------------------
    def named_layers(self) -> Iterator[tuple[str, MoELayer]]:
        """(name, layer) of every MoE layer, named inside the CLIP model: 'visual.transformer.resblocks.11.moe'."""
        for name, module in self.clip.named_modules():
            if isinstance(module, MoELayer):
                yield name, module

    def encoder_of(self, layer_name: str) -> str:
        """The encoder ("image" or "text") of the MoE layer named ``layer_name`` (as ``named_layers`` names it)."""
        return self.clip.get_submodule(layer_name).encoder

    @property
    def n_tasks(self) -> int:
        """The number of tasks (routers per layer) learned or being learned."""
        return next(layer for _, layer in self.named_layers()).n_tasks

    def add_task(self) -> int:
        """Add one zero-initialised router per layer for a new task; returns its task index (0-based)."""
        for _, layer in self.named_layers():
            layer.add_router()
        return self.n_tasks - 1

    def backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the frozen CLIP backbone: every parameter outside the MoE layers."""
        for name, param in self.clip.named_parameters():
            if ".moe." not in name:
                yield name, param

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every MoE layer's parameters: experts and all tasks' routers (what the optimiser is given)."""
        return [p for _, layer in self.named_layers() for p in layer.parameters()]

    # ----- forward ----------------------------------------------------------------------------
    @contextmanager
    def route(self, task_ids: torch.Tensor | int, batch: int, device: torch.device) -> Iterator[None]:
        """Context in which every MoE layer routes by ``task_ids`` ([B] int64, or one int for all ``batch``
        samples; -1 = plain CLIP); the previous routing is restored on exit."""
        if isinstance(task_ids, int):
            task_ids = torch.full((batch,), task_ids, dtype=torch.long, device=device)
        previous = self.routing.task_ids
        self.routing.task_ids = task_ids.to(device=device, dtype=torch.long)
        try:
            yield
        finally:
            self.routing.task_ids = previous

    @contextmanager
    def recording(self, recorder: Recorder) -> Iterator[None]:
        """Call ``recorder`` with every layer's expert selections inside the block."""
        previous = self.routing.recorder
        self.routing.recorder = recorder
        try:
            yield
        finally:
            self.routing.recorder = previous

    def encode_image(
        self, images: torch.Tensor, task_ids: torch.Tensor | int, normalize: bool = False
    ) -> torch.Tensor:
        """Image embeddings [B, D] of preprocessed ``images`` [B, 3, S, S], routed by each sample's task
        (LongTensor [B] or one int; -1 = plain CLIP); unit rows when ``normalize``."""
        with self.route(task_ids, images.shape[0], images.device):
            return self.clip.encode_image(images, normalize=normalize)

    def encode_text(
        self, tokens: torch.Tensor, task_ids: torch.Tensor | int, normalize: bool = False
    ) -> torch.Tensor:
        """Text embeddings [N, D] of ``tokens`` [N, ctx] int64, routed by task (LongTensor [N] or one int;
        -1 = plain CLIP); unit rows when ``normalize``."""
        with self.route(task_ids, tokens.shape[0], tokens.device):
            return self.clip.encode_text(tokens, normalize=normalize)

    def forward(
        self,
        images: torch.Tensor,
        image_tasks: torch.Tensor | int,
        tokens: torch.Tensor,
        text_tasks: torch.Tensor | int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image [B, D] and text [N, D] embeddings in one call (what DistributedDataParallel
        wraps); ``image_tasks`` / ``text_tasks`` as in ``encode_image`` / ``encode_text``."""
        return (
            self.encode_image(images, image_tasks, normalize=True),
            self.encode_text(tokens, text_tasks, normalize=True),
        )


# ----- activate-freeze -----------------------------------------------------------------------------
def set_trainable(model: MoECLIP, task: int) -> None:
    """Backbone frozen; adapters trainable for ``task`` (activate-freeze, METHODS.md section 1).

    Frozen experts and other tasks' routers stay ``requires_grad`` but are masked by ``mask_frozen_grads``.
    Raises UsageError when ``task`` has no router.
    """
    if not 0 <= task < model.n_tasks:
        raise UsageError(f"Task {task} has no router (the model has {model.n_tasks}).")
    for _, param in model.backbone_parameters():
        param.requires_grad_(False)
    for param in model.adapter_parameters():
        param.requires_grad_(True)


@torch.no_grad()
def mask_frozen_grads(model: MoECLIP, task: int) -> None:
    """Zero the gradients of frozen experts and of every router but ``task``'s (call before optimizer.step).

    Multiplies by masks only (no boolean indexing): nothing waits for the device (no CUDA sync per step)."""
    for _, layer in model.named_layers():
        keep = (~layer.frozen).to(layer.down_w.dtype)
        for param in (layer.down_w, layer.down_b, layer.up_w, layer.up_b):
            if param.grad is not None:
                param.grad.mul_(keep.view(-1, *([1] * (param.dim() - 1))))
        for param in (layer.w_gate, layer.w_noise):
            if param.grad is not None:
                own = torch.zeros(param.shape[0], dtype=param.grad.dtype, device=param.grad.device)
                own[task] = 1
                param.grad.mul_(own.view(-1, *([1] * (param.dim() - 1))))


def count_selections(layer: MoELayer, task_ids: torch.Tensor, idx: torch.Tensor) -> None:
    """Recorder that adds each sample's selected experts to ``layer.counts[task]`` (activate-freeze counts).

    task_ids: [B] int64 (``ZERO_SHOT`` samples add 0); idx: [B, k] int64 selected experts. Integer
    additions only and no boolean indexing: exact in any order, and no CUDA sync per layer and step.
    """
    with torch.no_grad():
        rows = task_ids.clamp(min=0)[:, None].expand_as(idx)
        seen = (task_ids >= 0).to(layer.counts.dtype)[:, None].expand_as(idx)
        layer.counts.index_put_((rows, idx), seen, accumulate=True)


class SelectionSet:
    """Recorder collecting which experts each layer selected (for the strict freeze rule).

    ``selected``: id(layer) -> [E] bool; called as a ``Recorder`` (layer, task_ids [B], idx [B, k]).
    """

    def __init__(self, model: MoECLIP) -> None:
        self.selected = {
            id(layer): torch.zeros(layer.n_experts, dtype=torch.bool) for _, layer in model.named_layers()
        }

    def __call__(self, layer: MoELayer, task_ids: torch.Tensor, idx: torch.Tensor) -> None:
        hit = idx[task_ids >= 0].flatten().cpu()
        self.selected[id(layer)][hit] = True


def freeze_experts(
    model: MoECLIP, task: int, rule: str, selected: SelectionSet | None = None
) -> dict[str, np.ndarray]:
    """Freeze experts after ``task`` (activate-freeze, METHODS.md section 1); returns the newly frozen mask
    per layer (layer name -> [E] bool numpy).

    'paper': the top_k most-selected experts per block during training (``layer.counts[task]``).
    'strict': every expert in ``selected`` (the task router's clean selections on its training
    images and prompts), so the task's outputs on those inputs can never change again.
    Raises UsageError on an unknown rule, or 'strict' without ``selected``.
    """
    if rule not in FREEZE_RULES:
        raise UsageError(f"Unknown freeze rule '{rule}'; use one of {FREEZE_RULES}.")
    if rule == "strict" and selected is None:
        raise UsageError("The strict freeze rule needs the experts the task selected (SelectionSet).")
    newly: dict[str, np.ndarray] = {}
    for name, layer in model.named_layers():
        mask = torch.zeros(layer.n_experts, dtype=torch.bool)
        if rule == "paper":
            counts = layer.counts[task].cpu()
            top = top_k_indices(counts, model.config.top_k)  # ties: the lower expert index, as routing
            mask[top[counts[top] > 0]] = True
        else:
            mask = selected.selected[id(layer)].clone()
        newly[name] = (mask & ~layer.frozen.cpu()).numpy()
        layer.frozen |= mask.to(layer.frozen.device)
    return newly


def grow_pools(model: MoECLIP) -> dict[str, int]:
    """Give every block at least top_k unfrozen experts (``MoELayer.grow``); returns layer name -> experts
    added, for the layers that grew. The paper's fixed pool of 22 may otherwise freeze completely."""
    added: dict[str, int] = {}
    for name, layer in model.named_layers():
        free = int((~layer.frozen).sum())
        if free < model.config.top_k:
            layer.grow(model.config.top_k - free)
            added[name] = model.config.top_k - free
    return added


# ----- parameter counts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterCount:
    """Adapter parameter counts (numbers of scalars, not bytes) of an ``MoECLIP``."""

    experts: int
    routers: int  # gate + noise matrices of all tasks
    per_router: int  # one task's gate + noise matrices over all layers

    @property
    def total(self) -> int:
        """Experts plus routers."""
        return self.experts + self.routers


def parameter_count(model: MoECLIP, n_tasks: int | None = None) -> ParameterCount:
    """Adapter parameters: every layer's experts plus ``n_tasks`` routers (default: the model's)."""
    experts = per_router = 0
    for _, layer in model.named_layers():
        experts += sum(p.numel() for p in (layer.down_w, layer.down_b, layer.up_w, layer.up_b))
        per_router += 2 * layer.width * layer.n_experts  # gate + noise, [E, d] each
    tasks = model.n_tasks if n_tasks is None else n_tasks
    return ParameterCount(experts=experts, routers=tasks * per_router, per_router=per_router)


# ----- state (safetensors: flat string keys, no pickle) ----------------------------------------------
def moe_state(model: MoECLIP) -> dict[str, torch.Tensor]:
    """Every adapter tensor (experts, routers, router masks, frozen masks, counts) under '<layer>.<name>',
    as detached CPU copies (for safetensors; no pickle)."""
    return {
        f"{name}.{key}": value.detach().cpu().clone()  # a snapshot, not a view of live parameters
        for name, layer in model.named_layers()
        for key, value in layer.state_dict().items()
    }


def initial_moe_state(clip: nn.Module, config: MoEConfig, seed: int) -> dict[str, np.ndarray]:
    """The adapters of a bundle with no task (seeded down-projections, zero up-projections) on the frozen
    open_clip model ``clip``, as ``moe_state`` numpy arrays; the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.numpy() for k, v in moe_state(MoECLIP(clip, config)).items()}


def load_moe_state(model: MoECLIP, state: dict[str, Any]) -> None:
    """Load ``moe_state`` output (torch tensors or numpy arrays) into a model built with the same config;
    layers are resized to the state's experts and routers first. Raises UsageError when a layer's tensors
    are missing or the state has layers this model lacks (another config)."""
    for name, layer in model.named_layers():
        prefix = f"{name}."
        own = {k[len(prefix):]: torch.as_tensor(v) for k, v in state.items() if k.startswith(prefix)}
        if "down_w" not in own or "w_gate" not in own:
            raise UsageError(f"The MoE state has no tensors for layer '{name}': was it saved with another config?")
        layer.resize(int(own["down_w"].shape[0]), int(own["w_gate"].shape[0]))
        layer.load_state_dict(own, strict=True)
    known = {f"{name}." for name, _ in model.named_layers()}
    stray = [k for k in state if not any(k.startswith(p) for p in known)]
    if stray:
        raise UsageError(f"The MoE state has tensors for layers this model lacks, e.g. '{stray[0]}'.")


@contextmanager
def exact_fp32() -> Iterator[None]:
    """float32 matmuls and convolutions on CUDA inside the block (TF32 off: PyTorch lets cuDNN
    convolutions use TF32 by default), for what must match the exported float32 graphs: the strict
    rule's selections, frozen embeddings, text classifiers. No effect on a CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ----- per-task text classifier --------------------------------------------------------------------
@torch.no_grad()
def text_classifier(
    model: MoECLIP,
    task: int,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], torch.Tensor],
    batch_size: int = 256,
) -> np.ndarray:
    """Class text embeddings [C, D] float32 numpy, unit rows, through the adapted text encoder with ``task``'s
    router (``ZERO_SHOT`` for plain CLIP): each class's prompts averaged, then re-normalised.

    templates: format strings with one ``{}``; tokenize: list of prompts -> [N, ctx] int64. Since the
    text routing reads only the start token, this is computed once per task (METHODS.md section 1).
    The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [t.format(c) for c in class_names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start : start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, task, normalize=True).float().cpu())
    model.train(was_training)
    feats = torch.cat(chunks).reshape(len(class_names), len(templates), -1).mean(dim=1)
    return nn.functional.normalize(feats, dim=-1).numpy().astype(np.float32)


__all__ = [
    "ZERO_SHOT",
    "MoEConfig",
    "MoELayer",
    "MoEResidualBlock",
    "MoECLIP",
    "Routing",
    "SelectionSet",
    "ParameterCount",
    "count_selections",
    "encoder_transformers",
    "exact_fp32",
    "freeze_experts",
    "grow_pools",
    "initial_moe_state",
    "load_moe_state",
    "mask_frozen_grads",
    "moe_state",
    "parameter_count",
    "set_trainable",
    "text_classifier",
    "top_k_indices",
]
