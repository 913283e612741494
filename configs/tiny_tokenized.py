# The tiny model trained on your own text, tokenized in InternLM's format (byte-level, so nothing to install):
#   python -m pytrain.data.tokenize --text_input_path raw/train --bin_output_path data/tiny/train --tokenizer byte
#   python -m pytrain.data.tokenize --text_input_path raw/valid --bin_output_path data/tiny/valid --tokenizer byte
#   python -m pytrain.train --config configs/tiny_tokenized.py
# raw/train/<type>/*.txt: one sample per non-empty line (or .json/.jsonl records); each top-level folder is a
# dataset type. tests/test_tokenized_config.py builds such folders and runs this config.
JOB_NAME = "tiny_tokenized"
SEQ_LEN = 128

model_type = "INTERNLM"
model = dict(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    vocab_size=256,  # bytes
    mlp_ratio=8 / 3,
    dtype="torch.float32",
    use_flash_attn=True,
)
data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,
    micro_bsz=4,
    total_steps=200,
    train_folder="data/tiny/train",
    valid_folder="data/tiny/valid",
    valid_every=50,
    valid_micro_num=2,
    min_length=8,
    pack_sample_into_one=False,  # documents packed into rows, kept apart by cu_seqlens
)
adam = dict(lr=2e-3, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=2e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
monitor = dict(log_every=10)
