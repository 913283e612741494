# The tiny config: a ~5M-parameter InternLM decoder trained on CPU on the bundled stdlib corpus
# (byte-level tokens), a few hundred steps in a few minutes on 2 cores:
#   torchrun --nproc_per_node=2 -m pytrain.train --config configs/tiny.py
JOB_NAME = "tiny"
SEQ_LEN = 128

model_type = "INTERNLM"
model = dict(
    checkpoint=False,
    num_attention_heads=8,
    embed_split_hidden=True,
    vocab_size=256,  # bytes
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=256,
    num_layers=6,
    mlp_ratio=8 / 3,
    apply_post_layer_norm=False,
    dtype="torch.float32",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)
data = dict(
    seq_len=SEQ_LEN,
    micro_num=1,
    micro_bsz=8,
    total_steps=300,
    train_folder="builtin:stdlib",
)
adam = dict(lr=2e-3, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=2e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1, interleaved_overlap=True))
monitor = dict(log_every=10)
