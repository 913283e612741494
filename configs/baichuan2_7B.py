# Baichuan2-7B (Hugging Face baichuan-inc/Baichuan2-7B-Base's config.json) as a pytrain model section; 7.51B
# parameters:
#   python -m pytrain.train --config configs/baichuan2_7B.py --dry_run
# Baichuan2-13B's ALiBi attention is not available: InternEvo's BAICHUAN2 trains rotary embeddings only.
model_type = "BAICHUAN2"
model = dict(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    mlp_ratio=8 / 3,  # intermediate_size 11008
    vocab_size=125696,
    layer_norm_epsilon=1e-6,
    no_bias=True,
    norm_head=True,  # NormHead: the LM head's rows L2-normalised at use
    dtype="torch.bfloat16",
)
data = dict(seq_len=4096, micro_num=4, micro_bsz=1)
