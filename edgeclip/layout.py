"""Every name a bundle version uses, defined once: its files, the graphs' inputs and outputs, and the
keys of the learned tensors. The exporter (``edgeclip.export``) writes what this module names and the
runtime (``edgeclip.edgeapp``) reads it; neither spells a file name or a tensor key itself.

The gated graph contract (``graphs/gated.onnx``, docs/ARCHITECTURE.md):

- inputs: ``pixels`` [B,3,S,S] float32 (preprocessed images), ``label_text`` [L,D] float32 (frozen
  text embeddings of the label space; rows 0..C-1 are the learned classes in global order);
- outputs: ``scores`` [B,L] float32 (probability-like), ``route`` [B] int64 (task index, -1 =
  zero-shot), ``gate_ratio`` [B,T] float32 (DDAS err_t / thr_t), ``embedding`` [B,D] float32 (unit rows).

The learned tensors (``learned.safetensors``, packed by ``edgeclip.train.decision.learned_tensors``):

- ``zs_text`` [C,D] float32: frozen text embeddings of the learned classes, global order;
- ``task.offset``, ``task.size`` [T] int64: each task's columns;
- ``gate.<key>`` stacked over tasks (``GATE_KEYS``), ``gate.k`` [T] int64 for the linear gate;
- the head: ``rail.w_r`` [D,H] and ``rail.w`` [H,C] (RAIL primal), ``rail.memory`` [N,D] and
  ``rail.alpha`` [N,C] (RAIL dual), or ``task_text`` [C,D] (MoE: each task's adapted text classifier).
"""

from __future__ import annotations

OPSET = 18  # run by onnxruntime >= 1.14 and TensorRT 10

# -- files of a version ---------------------------------------------------------------------------
MANIFEST = "manifest.json"
GRAPHS_DIR = "graphs"
IMAGE_GRAPH, IMAGE_DATA = "image_encoder.onnx", "image_encoder.data"
TEXT_GRAPH, TEXT_DATA = "text_encoder.onnx", "text_encoder.data"
GATED_GRAPH = "gated.onnx"
# optional int8 CPU variant (`edgeclip export --int8`): the encoder with its MatMul/Gemm weights
# quantised to int8 (dynamic), and the gated graph composed on top of it
IMAGE_INT8_GRAPH, IMAGE_INT8_DATA = "image_encoder_int8.onnx", "image_encoder_int8.data"
GATED_INT8_GRAPH = "gated_int8.onnx"
INT8_GRAPHS = (IMAGE_INT8_GRAPH, IMAGE_INT8_DATA, GATED_INT8_GRAPH)
# optional fp16 variant (`edgeclip export --precision fp16`): the encoders' float tensors and compute
# in float16 with float32 inputs and outputs (cast at the embedding), and the gated graph composed on
# top of them (its decision stays float32)
IMAGE_FP16_GRAPH, IMAGE_FP16_DATA = "image_encoder_fp16.onnx", "image_encoder_fp16.data"
GATED_FP16_GRAPH = "gated_fp16.onnx"
MOE_FP16_GRAPH, MOE_FP16_DATA = "moe_encoder_fp16.onnx", "moe_encoder_fp16.data"  # MoE bundles with tasks
FP16_GRAPHS = (IMAGE_FP16_GRAPH, IMAGE_FP16_DATA, GATED_FP16_GRAPH)
# precision -> (gated graph, plain image encoder, the encoders' weights file) that the runtime reads
# the decision alone, from the frozen embedding (classify's path through the embedding cache, edgeapp/library.py):
# inputs embedding [B,D], label_text [L,D]; outputs scores, route, gate_ratio (export/compose.build_head_graph)
HEAD_GRAPH = "head.onnx"
HEAD_SHARED_DATA = "head.shared.data"  # RAIL primal's W_r, identical in every version (stored once)
PRECISION_GRAPHS = {
    "fp32": ("gated.onnx", IMAGE_GRAPH, IMAGE_DATA),
    "fp16": (GATED_FP16_GRAPH, IMAGE_FP16_GRAPH, IMAGE_FP16_DATA),
    "int8": (GATED_INT8_GRAPH, IMAGE_INT8_GRAPH, IMAGE_INT8_DATA),
}
# MoE: the adapted image encoder (its backbone tensors point at image_encoder.data)
MOE_GRAPH, MOE_DATA = "moe_encoder.onnx", "moe_encoder.data"
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_FILE = f"tokenizer/{VOCAB_NAME}"
HF_TOKENIZER_NAME = "tokenizer.json"  # Hugging Face tokenizer of SigLIP/CLIPA-style models (manifest backbone.text)
HF_TOKENIZER_FILE = f"tokenizer/{HF_TOKENIZER_NAME}"
LEARNED = "learned.safetensors"  # what inference needs (read by classify), rewritten by each add-task
RAIL_PROJECTION = "rail_projection.safetensors"  # rail.w_r alone: written once, inherited (edgeclip.learned)
RAIL_STATE = "rail_state.safetensors"  # RAIL learning state (read by add-task only); primal: older bundles only


def rail_task_state(task: int) -> str:
    """RAIL primal: what task ``task`` (0-based) learned, its embeddings ``x`` and global labels, in a file
    of its own that later versions inherit (a version adds only what it learned)."""
    return f"rail_task.{task:04d}.safetensors"
MOE_STATE = "moe.safetensors"  # MoE adapters and routers (read by MoE add-task and eval)


def graph_file(name: str) -> str:
    """A graph's path inside a bundle version: ``graphs/<name>``."""
    return f"{GRAPHS_DIR}/{name}"


MOE_GRAPH_FILES = (graph_file(MOE_GRAPH), graph_file(MOE_DATA))

# -- graph inputs and outputs ---------------------------------------------------------------------
PIXELS, EMBEDDING = "pixels", "embedding"  # image encoder: [B,3,S,S] float32 -> [B,D]
TOKENS, TEXT_EMBEDDING = "tokens", "text_embedding"  # text encoder: [N,ctx] int64 -> [N,D]
LABEL_TEXT = "label_text"  # gated graph's second input [L,D]
SCORES, ROUTE, GATE_RATIO = "scores", "route", "gate_ratio"
GATED_OUTPUTS = (SCORES, ROUTE, GATE_RATIO, EMBEDDING)
TASK_IDS, ADAPTED = "task_ids", "adapted_embedding"  # MoE encoder: second input [B] int64, output [B,D]
ZERO_SHOT_ROUTE = -1  # the route of an image that fits no learned task

# -- learned tensors --------------------------------------------------------------------------------
ZS_TEXT, TASK_OFFSET, TASK_SIZE = "zs_text", "task.offset", "task.size"
GATE_K = "gate.k"  # [T] int64, linear gate: rank of each task (components are zero-padded to max k)
GATE_KEYS = {
    "linear": ("mu", "components"),  # [T,D], [T,K,D]
    # error = mean((z - relu(z W1 + b1) W2 - b2)^2) / scale^2 with z = (x - mu) scale
    "mlp": ("mu", "scale", "w1", "b1", "w2", "b2"),  # [T,D], [T], [T,D,H], [T,H], [T,H,D], [T,D]
}
TASK_TEXT = "task_text"  # MoE head [C,D]: each task's adapted text classifier (its own router), global order
RAIL_PREFIX = "rail."  # RAIL head tensors in learned.safetensors: rail.<key>


def gate_key(key: str) -> str:
    """The learned-tensor name of a stacked gate tensor: ``gate.<key>``."""
    return f"gate.{key}"


def rail_key(key: str) -> str:
    """The learned-tensor name of a RAIL head tensor: ``rail.<key>``."""
    return f"{RAIL_PREFIX}{key}"

# -- derived state outside the versions ---------------------------------------------------------------
RAIL_SOLVER_CACHE = "cache/rail"  # RAIL primal's inverse P and float64 W between add-tasks (edgeapp/rail_solver.py)
