"""pytrain's peers on pytrain's model, each built the way its own users build it (bench/test_peer_step.py times
them beside pytrain's step in one sitting).

The model is a Llama: RMSNorm (eps 1e-5), rotary base 10000 over whole heads, no GQA, SwiGLU MLP, no biases,
an untied head, of the sizes in LlamaShape (pytrain's). A builder takes the shape and the dtype (torch.float32,
or torch.bfloat16 for the peer's own bf16 recipe), imports its package with pytest.importorskip (CI installs
no peer) and returns a PeerStep: the model, forward + backward on (inputs, labels) as the peer's training loop
does it (its own loss), the optimizer step (with the clipping at 1.0 its recipe has), zero_grad, and the recipe
in words. Every peer trains with AdamW at lr 1e-4 and weight decay 0.1.

The peers go in a venv of their own over the main environment (transformers comes with the test extra), with
torch pinned so that nothing replaces it:

    python -m venv --system-site-packages peers-venv && echo "torch==2.13.0" > constraints.txt
    peers-venv/bin/pip install -c constraints.txt megatron-core==0.16.1
    peers-venv/bin/pip install --no-deps torchtitan==0.3.0 litgpt==0.5.13
    peers-venv/bin/pip install -c constraints.txt spmd_types==0.2.3 tyro "lightning>=2.6.1" psutil==7.2.2
    PYTHONPATH=$PWD peers-venv/bin/python -m pytest bench/test_peer_step.py

--no-deps, then only what their model, loss and optimizer code imports: litgpt 0.5.13 pins huggingface-hub<1.4,
which would shadow the main environment's and break transformers 5 (ImportError: cannot import name
'ResolvedRevision' from 'huggingface_hub'), and torchtitan's dependencies (datasets<4.8, wandb, tensorboard,
torchdata, torch_checkpointing) serve its data loading and logging only.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

ROPE_BASE = 10000.0
NORM_EPS = 1e-5
LR, WEIGHT_DECAY, MAX_NORM = 1e-4, 0.1, 1.0
IGNORE_INDEX = -100
# Found with megatron-core 0.16.1 on torch 2.13.0+cpu; each point below fails alone (the first is what a plain
# run hits), so the local (non-TransformerEngine) layer spec cannot run a training step on a CPU-only torch.
MEGATRON_ON_CPU = (
    "megatron-core 0.16.1's GPTModel needs CUDA: RotaryEmbedding.get_emb moves inv_freq to "
    "torch.cuda.current_device() (AssertionError: Torch not compiled with CUDA enabled); without an attention "
    "mask the softmax builds its causal mask with device='cuda' (transformer/utils.get_default_causal_mask); "
    "DotProductAttention forks the CUDA RNG tracker on every call (Exception: cuda rng state model-parallel-rng "
    "is not added), and model_parallel_cuda_manual_seed, which adds it, calls torch.cuda.manual_seed"
)


@dataclass(frozen=True)
class LlamaShape:
    """The sizes every peer builds (the rest of the architecture: the module docstring)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int
    seq_len: int

    @classmethod
    def of(cls, shape: dict, pytrain_model: nn.Module, seq_len: int) -> "LlamaShape":
        """shape: bench/test_step_profile's FULL or SMOKE. The MLP width is read off pytrain's built model, so
        that each peer's parameter count equals pytrain's whatever width pytrain_step builds."""
        width = next(p.shape[0] for n, p in pytrain_model.named_parameters() if n.endswith("feed_forward.w1.weight"))
        sizes = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        return cls(**{k: shape[k] for k in sizes}, intermediate_size=width, seq_len=seq_len)


@dataclass
class PeerStep:
    model: nn.Module
    forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, labels) -> detached loss
    optimizer_step: Callable[[], object]  # clipping (where the recipe has it), then the update
    zero_grad: Callable[[], object]
    recipe: str

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(inputs, labels)
        self.optimizer_step()
        return loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # a DTensor's numel is its whole tensor's


def backward_and_detach(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def clipped_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()

    return step


@contextlib.contextmanager
def one_process_group():
    """A gloo group of this one process (torchtitan wraps its model in FSDP2 even on one device), torn down
    after; an existing default group is used as it is."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def transformers_step(shape: LlamaShape, dtype: torch.dtype) -> PeerStep:
    """LlamaForCausalLM (its default sdpa attention) and its own loss (labels=input_ids, shifted inside), with
    what transformers' Trainer defaults to: torch AdamW fused (optim adamw_torch_fused, betas 0.9/0.999), no
    weight decay on the norms, clip_grad_norm_ at 1.0. bf16: the model cast to bf16, AdamW over bf16 params."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype)
    decay = [p for n, p in model.named_parameters() if "norm" not in n]  # the Trainer's rule: no bias here
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        fused=True,
    )
    return PeerStep(
        model,
        lambda inputs, labels: backward_and_detach(model(input_ids=inputs, labels=inputs).loss),  # HF shifts
        clipped_step(model, optimizer),
        model.zero_grad,
        "LlamaForCausalLM (sdpa), its loss; AdamW fused, norms undecayed, clip 1.0 (Trainer defaults); "
        + ("bf16 model, AdamW over bf16 params" if dtype == torch.bfloat16 else "fp32"),
    )


def torchtitan_step(shape: LlamaShape, dtype: torch.dtype) -> PeerStep:
    """torchtitan's Llama3Model from layer configs as its flavors build them (fused wqkv, its inits), through
    its single-device path: parallelize_llama wraps the model in FSDP2 on a 1-rank mesh even without data
    parallelism, to install the mixed-precision policy (bf16: param dtype bf16, reduce fp32, fp32 masters, the
    default; fp32: mixed_precision_param float32). Its chunked loss (ChunkedLossWrapper: 8 chunks of lm_head +
    cross-entropy, summed / the valid tokens), its clip_grad_norm_ (foreach) at 1.0 and its default optimizer
    (default_adamw: torch AdamW fused, betas 0.9/0.95, eps 1e-8, everything decayed). Two departures, both needed
    on a CPU: its language models attend by FlexAttention (whose backward torch does not run on a CPU) or varlen,
    so each layer's inner attention is its ScaledDotProductAttention (is_causal), as its own graph_trainer tests
    swap it in; and it picks 'cuda' when torch finds no accelerator, so its mesh is put on 'cpu'. Activation
    checkpointing off (its Trainer.Config defaults to selective AC; pytrain's step recomputes nothing here).
    Needs a process group: build it inside one_process_group()."""
    pytest.importorskip("torchtitan")
    if not dist.is_initialized():
        raise RuntimeError("torchtitan_step needs a process group: build and run it inside peers.one_process_group()")
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims, parallel_dims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
        parallelize_llama,
    )

    dim, vocab = shape.hidden_size, shape.vocab_size
    config = Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=NORM_EPS, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            n_layers=shape.num_layers,
            dim=dim,
            n_heads=shape.num_attention_heads,
            hidden_dim=shape.intermediate_size,
            rope=ComplexRoPE.Config(dim=dim // shape.num_attention_heads, max_seq_len=shape.seq_len, theta=ROPE_BASE),
            attn_backend="flex",
        ),
    )
    for layer in config.layers:  # its flavors' flex config, then SDPA swapped in (docstring)
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    parallel_dims.device_type = "cpu"  # tools/utils.get_device_info: `_get_available_device_type() or "cuda"`
    parallelism = ParallelismConfig()
    dims = ParallelDims.from_config(parallelism, world_size=1)
    training = TrainingConfig(
        seq_len=shape.seq_len, mixed_precision_param="bfloat16" if dtype == torch.bfloat16 else "float32"
    )
    with torch.device("meta"):
        model = config.build()
    model = parallelize_llama(
        model,
        parallel_dims=dims,
        training=training,
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="",
    )
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    optimizers = default_adamw(lr=LR, weight_decay=WEIGHT_DECAY).build(model_parts=[model])
    loss_fn = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab)).build(
        compile_config=CompileConfig()
    )
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True  # the loss applies lm_head chunk by chunk, as its Trainer sets up
    context = dist_utils.get_spmd_context(parallel_dims=dims)

    def forward_backward(inputs, labels):
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)  # its loaders' per-document positions
        with context():
            hidden = model(inputs, positions=positions)
            loss, _ = loss_fn(hidden, labels, (labels != IGNORE_INDEX).sum())
            return backward_and_detach(loss)

    def optimizer_step():
        dist_utils.clip_grad_norm_(list(model.parameters()), MAX_NORM, foreach=True, pp_mesh=None, ep_enabled=False)
        optimizers.step()

    return PeerStep(
        model,
        forward_backward,
        optimizer_step,
        lambda: optimizers.zero_grad(set_to_none=training.disable_cuda_graphs),  # its Trainer's call
        "Llama3Model, FSDP2 on 1 rank, "
        + ("param bf16 / reduce fp32, fp32 masters" if dtype == torch.bfloat16 else "fp32")
        + "; SDPA inner attention; chunked loss (8); AdamW fused; clip 1.0 (foreach); no AC",
    )


def litgpt_step(shape: LlamaShape, dtype: torch.dtype) -> PeerStep:
    """litgpt's GPT with a Llama Config, set up as its pretrain.py does: a Lightning Fabric (bf16: precision
    'bf16-mixed', autocast over fp32 weights: the fp32 masters; fp32: '32-true'), its GPT-NeoX init
    (initialize_weights), AdamW through instantiate_torch_optimizer (fused only on CUDA: for-loop on a CPU;
    betas 0.9/0.95 as its pretraining configs), chunked_cross_entropy, fabric.clip_gradients at 1.0. Eager:
    pretrain.py also wraps the model in torch.compile."""
    pytest.importorskip("litgpt")
    import lightning
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights
    from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer

    config = Config(
        name="pytrain-llama",
        block_size=shape.seq_len,
        n_layer=shape.num_layers,
        n_embd=shape.hidden_size,
        n_head=shape.num_attention_heads,
        n_query_groups=shape.num_attention_heads,
        vocab_size=shape.vocab_size,
        padded_vocab_size=shape.vocab_size,
        intermediate_size=shape.intermediate_size,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=NORM_EPS,
        mlp_class_name="LLaMAMLP",
        rotary_percentage=1.0,
        rope_base=int(ROPE_BASE),
        parallel_residual=False,
    )
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    fabric = lightning.Fabric(accelerator="cpu", devices=1, precision=precision, loggers=[])
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.max_seq_length = shape.seq_len
    model = fabric.setup(model)
    optimizer = instantiate_torch_optimizer(
        {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": (0.9, 0.95)},
        },
        model.parameters(),
        fused=fabric.device.type == "cuda",
    )
    optimizer = fabric.setup_optimizers(optimizer)

    def forward_backward(inputs, labels):
        loss = chunked_cross_entropy(model(inputs), labels)
        fabric.backward(loss)
        return loss.detach()

    def optimizer_step():
        fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)
        optimizer.step()

    return PeerStep(
        model,
        forward_backward,
        optimizer_step,
        optimizer.zero_grad,
        f"GPT (Llama config), Fabric {precision}; chunked_cross_entropy; AdamW for-loop (fused only on CUDA); "
        "clip 1.0; eager (pretrain.py compiles)",
    )


def megatron_step(shape: LlamaShape, dtype: torch.dtype) -> PeerStep:
    """megatron-core's GPTModel (model only) would be built with the local layer spec; on a CPU it cannot run
    (MEGATRON_ON_CPU), so it is skipped with that reason wherever it is installed."""
    pytest.importorskip("megatron.core")
    pytest.skip(MEGATRON_ON_CPU)


PEERS = {
    "transformers": transformers_step,
    "torchtitan": torchtitan_step,
    "litgpt": litgpt_step,
    "megatron-core": megatron_step,
}
