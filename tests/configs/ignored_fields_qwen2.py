# A QWEN2 run written as InternEvo users write them (7B_qwen2.py without checkpoint loading), shrunk to a size a
# CPU builds, with the names InternEvo's configs and args_sanity_check know that have no effect in pytrain.
JOB_NAME = "qwen2_ignored_fields"
model_type = "QWEN2"
enable_tb = True  # InternEvo's older name of monitor.tensorboard.enable
use_apex_adam = False
data = dict(
    seq_len=256,
    micro_num=2,
    micro_bsz=1,
    total_steps=20,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
    use_shm=False,
    fixed_random_dataset_seqlen=True,
)
hybrid_zero_optimizer = dict(zero_overlap_communication=True, clip_grad_norm=1.0, all_gather_size=512 * 1024 * 1024)
loss = dict(label_smoothing=0, op_type="py_vocab_parallel")
model = dict(
    checkpoint=False,
    num_chunks=1,
    num_attention_heads=8,
    num_kv_attention_heads=2,
    embed_split_hidden=True,
    vocab_size=1024,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=256,
    num_layers=2,
    qkv_bias=True,
    o_bias=False,
    no_bias=True,  # an INTERNLM2/LLAMA2 field: QWEN2 takes qkv_bias / o_bias instead
    mlp_ratio=5.25,
    apply_post_layer_norm=False,
    dtype="torch.float32",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-6,
    use_flash_attn=True,
    qk_interleaved=False,
    rope_base=1000000,
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=28,
    max_position_embeddings=32768,
    init_type="normal",
    embedding_init_std=0.02,
    mlp_layer_fusion=False,
)
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True),
    sequence_2D=dict(enable=False, head_size=2, context_size=4, window_size=1),
)
monitor = dict(
    alert=dict(enable_feishu_alert=False, feishu_alert_address=None, light_monitor_address=None),
    tensorboard=dict(queue_max_length=10),
)
generation = dict(batch_size=1, max_length=100, do_sample=True)
