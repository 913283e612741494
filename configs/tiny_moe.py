# The tiny mixture-of-experts config: a 1.8M-parameter Mixtral-style decoder (1.05M active per token: 4
# experts, top-2, GShard routing with capacity) trained on CPU on the bundled stdlib corpus (byte tokens):
#   python -m pytrain.train --config configs/tiny_moe.py
# The step line shows moe_loss, the load-balancing loss (sum over the layers, about 1 each when balanced).
JOB_NAME = "tiny_moe"
SEQ_LEN = 128

model_type = "MIXTRALMOE"
model = dict(
    checkpoint=False,
    num_attention_heads=8,
    num_kv_attention_heads=4,
    qkv_bias=False,
    vocab_size=256,  # bytes
    hidden_size=128,
    num_layers=4,
    mlp_ratio=2,
    multiple_of=64,
    dtype="torch.float32",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=10000,
    use_flash_attn=True,
    num_experts=4,
    top_k=2,
    moe_type="GShard",
    moe_layer_kwargs=dict(capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4),
)
loss = dict(label_smoothing=0, moe_loss_coeff=0.01)
data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,
    micro_bsz=4,
    total_steps=200,
    train_folder="builtin:stdlib",
)
adam = dict(lr=2e-3, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=2e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
# expert size 1: every data-parallel rank holds all 4 experts (InternEvo's default -1 splits them over the
# data-parallel ranks: expert parallelism)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1), pipeline=dict(size=1), expert=dict(size=1))
monitor = dict(log_every=10)
