# Gemma-7B (Hugging Face google/gemma-7b's config.json; InternEvo's configs/7B_gemma.py model section) as a pytrain
# model section; 8.54B parameters (the head is the embedding, tied):
#   python -m pytrain.train --config configs/gemma_7B.py --dry_run
# Gemma-2B: num_layers=18, hidden_size=2048, num_attention_heads=8, num_kv_attention_heads=1 (multi-query), 2.51B.
model_type = "GEMMA"
model = dict(
    num_layers=28,
    hidden_size=3072,
    num_attention_heads=16,
    num_kv_attention_heads=16,
    head_dim=256,
    mlp_ratio=8,  # intermediate_size 24576
    vocab_size=256000,
    layer_norm_epsilon=1e-6,
    no_bias=True,
    use_swiglu=False,  # GeGLU (tanh-approximate GELU)
    add_unit_offset=True,  # RMSNorm by (1 + weight)
    tie_word_embeddings=True,
    embed_split_hidden=False,  # a tied head is split over the vocabulary under tensor parallelism
    dtype="torch.bfloat16",
)
data = dict(seq_len=8192, micro_num=4, micro_bsz=1)
