# A ~110M-parameter InternLM decoder (GPT-2 small width) for measuring parallel layouts on CPU:
#   torchrun --nproc_per_node=2 -m pytrain.train --config configs/100M.py --set parallel.pipeline.size=2
# Random tokens (train_folder=None): throughput, not learning.
JOB_NAME = "100m"

model_type = "INTERNLM"
model = dict(
    num_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    vocab_size=16384,
    mlp_ratio=8 / 3,
    multiple_of=256,
    dtype="torch.float32",
    use_flash_attn=True,
    checkpoint=False,
)
data = dict(seq_len=256, micro_num=4, micro_bsz=2, total_steps=10, train_folder=None)
adam = dict(lr=3e-4, weight_decay=0.01)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))
monitor = dict(log_every=1)
