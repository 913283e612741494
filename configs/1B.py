# A ~1.06B-parameter InternLM decoder for one GPU's MFU (bench/gpu/run.sh runs it on a lent H100/H200):
#   python -m pytrain.train --config configs/1B.py
# bf16 with fp32 master weights, pytrain's flash-attention, random tokens (throughput, not learning).
JOB_NAME = "1b"

model_type = "INTERNLM"
model = dict(
    num_layers=18,
    hidden_size=2048,
    num_attention_heads=16,
    vocab_size=32000,
    mlp_ratio=8 / 3,
    multiple_of=256,
    dtype="torch.bfloat16",
    use_flash_attn=True,
    checkpoint=False,
)
data = dict(seq_len=4096, micro_num=4, micro_bsz=2, total_steps=30, train_folder=None)
adam = dict(lr=3e-4, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.1)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0, overlap_sync_grad=True)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))
monitor = dict(log_every=1, tensorboard=dict(enable=False))
