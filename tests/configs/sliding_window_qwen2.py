# QWEN2 with sliding-window attention on (as Qwen2's long-context configs have it): layers 28 and above of a 32-layer
# model see the last 4096 tokens.
model_type = "QWEN2"
model = dict(num_layers=32, hidden_size=256, num_attention_heads=8, num_kv_attention_heads=2, vocab_size=1024,
             use_sliding_window=True, sliding_window=4096, max_window_layers=28)
