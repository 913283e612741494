# Qwen3-30B-A3B (Hugging Face Qwen/Qwen3-30B-A3B's config.json, InternEvo's configs/qwen3_30B_A3B.py model section)
# as a pytrain model section; 30.53B parameters, 3.35B active per token:
#   python -m pytrain.train --config configs/qwen3_30B_A3B.py --dry_run
model_type = "QWEN3MOE"
model = dict(
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    num_kv_attention_heads=4,
    head_dim=128,
    mlp_ratio=768 / 2048,  # each expert 768 wide
    vocab_size=151936,
    layer_norm_epsilon=1e-6,
    rope_base=1e6,
    qkv_bias=False,
    num_experts=128,
    top_k=8,
    moe_type="Dropless",
    moe_layer_kwargs=dict(normalize_expert_weights=True),  # norm_topk_prob
    dtype="torch.bfloat16",
)
data = dict(seq_len=4096, micro_num=4, micro_bsz=1)
