# Qwen3-8B (Hugging Face Qwen/Qwen3-8B's config.json) as a pytrain model section; 8.19B parameters:
#   python -m pytrain.train --config configs/qwen3_8B.py --dry_run
# Start from the published weights with ckpt = dict(load_ckpt_info=dict(path=..., content=("model",), ckpt_type="hf")).
model_type = "QWEN3"
model = dict(
    num_layers=36,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=8,
    head_dim=128,
    mlp_ratio=3.0,  # intermediate_size 12288
    vocab_size=151936,
    layer_norm_epsilon=1e-6,
    rope_base=1e6,
    qkv_bias=False,
    dtype="torch.bfloat16",
)
data = dict(seq_len=4096, micro_num=4, micro_bsz=1)
