# QWEN2 with sliding-window attention on (as Qwen2's long-context configs have it): a feature pytrain lacks.
model_type = "QWEN2"
model = dict(num_layers=2, hidden_size=256, num_attention_heads=8, num_kv_attention_heads=2, vocab_size=1024,
             use_sliding_window=True, sliding_window=4096, max_window_layers=28)
