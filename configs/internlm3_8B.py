# InternLM3-8B (Hugging Face internlm/internlm3-8b-instruct's config.json) as a pytrain model section; 8.80B parameters:
#   python -m pytrain.train --config configs/internlm3_8B.py --dry_run
# Its dynamic-NTK rope scaling (factor 6) acts past max_position_embeddings (32k positions) as transformers' does.
model_type = "INTERNLM3"
model = dict(
    num_layers=48,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=2,
    mlp_ratio=2.5,  # intermediate_size 10240
    vocab_size=128512,
    no_bias=True,
    rope_base=50000000,
    rope_type="dynamic",
    rope_scaling_factor=6.0,
    max_position_embeddings=32768,
    layer_norm_epsilon=1e-5,
    dtype="torch.bfloat16",
)
data = dict(seq_len=4096, micro_num=4, micro_bsz=1)
