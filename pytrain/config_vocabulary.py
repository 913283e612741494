"""The names InternLM's and InternEvo's config files use that have no effect in pytrain, or name a feature
pytrain does not have. pytrain.config turns these tables into SCHEMA fields, next to the ones that act.

Read from InternEvo's configs/ folder (7B_sft, 7B_internlm2, 7B_llama2, 7B_qwen2, 7B_isp_sft, 7B_MoE4_sft,
1.8B_MoE16_sft, 8x7B_mixtral, 57B_qwen2_MoE, 8B_internlm3, 7B_llama2_zeropp, 7B_hf, _base_/), from
internlm/initialize/launch.py (args_sanity_check: the defaults it fills in) and from the model classes'
constructor arguments (modeling_internlm, _internlm2, _llama, _qwen2, _moe, _mixtral, _qwen2_moe).
Multimodal configs (llava, chameleon, DiT) are not covered: their model types are not registered here.
InternLM's older spellings (README's "Older InternLM spellings" names each one's source commit) were read from
InternLM's tagged releases v0.1.0 to v0.2.1dev20240102 (configs/, internlm/initialize/launch.py and
internlm/initialize/legacy/launch.py) and from the tensor-parallel modes of InternLM's isp work before InternEvo
named them (InternLM 5fb6d99, d91a5d9, 9b1265c, 7475439; InternEvo d30aecd).

IGNORED: accepted with any value of the right type; a run lists the ones its file sets once, in its
start line, as "ignored here". UNAVAILABLE: accepted at a value that changes nothing (the first of
`allowed` is InternEvo's default); any other value is a config error saying the feature is not available.
RENAMED: InternEvo's older spelling of a field pytrain has; the value moves there.

The mixture-of-experts fields act (pytrain.config's SCHEMA): model.num_experts / top_k / moe_type /
num_shared_experts / moe_use_residual / moe_layer_kwargs in the MoE families, loss.moe_loss_coeff,
parallel.expert.size, and InternEvo's older top-level `moe` section, whose top_k moves to model.top_k and
whose other keys move into model.moe_layer_kwargs. The kinds of moe_layer_kwargs' keys per moe_type are
pytrain.model_args.MOE_LAYER_KWARGS.
"""

NONE = type(None)
NUMBER = (int, float)

# "section.field": (default, types, why it has no effect here)
IGNORED = {
    "tensorboard_folder": (
        None,
        (str, NONE),
        "InternEvo's TensorBoard folder; pytrain writes <run folder>/tensorboard",
    ),
    "resume_tb_folder": (None, (str, NONE), "InternEvo's TensorBoard folder to continue"),
    "use_apex_adam": (False, bool, "apex's fused Adam; pytrain's AdamW runs its own fused step"),
    "metric_dtype": (None, (str, NONE), "dtype of InternEvo's metric accumulation; pytrain accumulates in fp32"),
    "generation": (None, (dict, NONE), "InternEvo's text-generation settings (an inference tool, not training)"),
    "alert_address": (None, (str, NONE), "InternEvo's old alert webhook (see monitor.alert)"),
    "grad_profiling": (
        None,
        (dict, NONE),
        "InternLM's per-layer gradient-norm and zero-gradient counts on TensorBoard",
    ),
    "data.empty_cache_and_diag_interval": (50, int, "InternEvo's periodic CUDA cache flush and slow-rank diagnosis"),
    "data.diag_outlier_ratio": (1.1, NUMBER, "threshold of InternEvo's slow-rank diagnosis"),
    "data.packed_length": (None, (int, NONE), "InternEvo overrides it with seq_len * micro_bsz too"),
    "data.fixed_random_dataset_seqlen": (True, bool, "sample lengths of InternEvo's random dataset"),
    "data.use_shm": (False, bool, "InternEvo keeps dataset index files in shared memory"),
    "data.shm_path": ("/dev/shm/metacache", str, "where InternEvo's shared-memory index files go"),
    "data.gradient_accumulation": (
        None,
        (int, NONE),
        "pytrain accumulates data.micro_num micro-batches (it must equal that)",
    ),
    "ckpt.snapshot_ckpt_folder": (
        None,
        (str, NONE),
        "InternLM v0.2.0's snapshot folder: pytrain's snapshots go to <save_ckpt_folder>/snapshot, the folder "
        "InternLM defaulted to (another one is a config error)",
    ),
    "hybrid_zero_optimizer.all_gather_size": (512 * 1024 * 1024, int, "only with use_split_tensor_optim"),
    "loss.op_type": ("py_vocab_parallel", str, "InternEvo's cross-entropy implementation; pytrain uses its own kernel"),
    "parallel.sequence_parallel": (
        False,
        bool,
        "InternEvo's old switch; parallel.tensor.mode='msp' is sequence parallel",
    ),
    "parallel.tensor.intern_overlap": (
        False,
        bool,
        "intern sequence parallel (sp='intern', isp) only: InternEvo's later parallel.weight.overlap",
    ),
    "parallel.tensor.overlap": (False, bool, "mode='fstp' (isp) only: InternEvo's later parallel.weight.overlap"),
    "parallel.tensor.memory_pool": (
        False,
        bool,
        "intern sequence parallel (isp) only: InternEvo's later parallel.weight.memory_pool",
    ),
    "parallel.tensor.reduce_scatter_overlap": (False, bool, "intern sequence parallel (isp) only"),
    "parallel.weight.memory_pool": (
        False,
        bool,
        "InternEvo's pool of gathered-weight buffers; torch's fully_shard takes each unit's gathered weights from "
        "the caching allocator and frees them after use, so the buffers are reused without a pool",
    ),
    "parallel.weight.launch_allgather_before": (
        "wo",
        str,
        "the module before which InternEvo starts the next layer's gather; with overlap=True pytrain starts it "
        "when the previous unit starts (torch's fully_shard prefetches whole units)",
    ),
    "parallel.weight.early_reduce_scatter_release": (
        True,
        bool,
        "InternEvo frees its reduce-scatter buffers early; torch's fully_shard frees each unit's gathered "
        "gradient as soon as it is reduce-scattered",
    ),
    "parallel.expert.no_tp": (False, bool, "expert parallelism (MoE) only"),
    "parallel.expert_weight.overlap": (False, bool, "expert weight parallelism (MoE) only"),
    "parallel.expert_weight.memory_pool": (False, bool, "expert weight parallelism (MoE) only"),
    "parallel.expert_weight.launch_allgather_before": ("wo", str, "expert weight parallelism (MoE) only"),
    "parallel.expert_weight.forward_overlap_per": ("layer", str, "expert weight parallelism (MoE) only"),
    "parallel.expert_weight.early_reduce_scatter_release": (True, bool, "expert weight parallelism (MoE) only"),
    "model.dropout_selective_checkpoint": (True, bool, "no dropout here"),
    "model.use_scaled_init": (True, bool, "InternEvo's initialisation; pytrain draws its own"),
    "model.init_type": ("normal", str, "InternEvo's initialisation; pytrain draws its own"),
    "model.embedding_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.attn_wqkv_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.attn_other_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.ffn_uplayer_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.ffn_other_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.out_head_init_std": (0.02, NUMBER, "InternEvo's initialisation; pytrain draws its own"),
    "model.mlp_layer_fusion": (False, bool, "a kernel choice of InternEvo (same math)"),
    "model.moe_kwargs": (
        None,
        (dict, NONE),
        "not read by InternEvo's MoE families (they take moe_layer_kwargs, or the top-level moe section)",
    ),
}

# "section.field": (allowed values (the first is the default), types, the feature pytrain does not have)
UNAVAILABLE = {
    "data.use_packed_dataset": ((True,), bool, "unpacked batches"),
    "hybrid_zero_optimizer.use_split_tensor_optim": ((False,), bool, "the split-tensor optimizer"),
    "parallel.pipeline.mode": (("1F1B", "1f1b"), str, "zero-bubble pipeline schedules"),
    "monitor.alert.enable_feishu_alert": ((False,), bool, "Feishu alerts (no network here)"),
    "monitor.alert.feishu_alert_address": ((None,), (str, NONE), "Feishu alerts (no network here)"),
    "monitor.alert.light_monitor_address": ((None,), (str, NONE), "InternLM's light monitor (no network here)"),
    "model.attn_drop_rate": ((0.0, 0), NUMBER, "dropout"),
    "model.drop_rate": ((0.0, 0), NUMBER, "dropout"),
    "model.residual_in_fp32": ((False,), bool, "an fp32 residual stream"),
    "model.use_swiglu": ((True,), bool, "MLPs other than SwiGLU"),
    "model.add_unit_offset": ((False,), bool, "RMSNorm with (1 + weight)"),
    "model.norm_head": ((False,), bool, "a normalised LM head"),
    "model.is_reward": ((False,), bool, "reward-model heads"),
    "model.scale_attn_weights": ((False,), bool, "Qwen1's attention scaling"),
    "model.use_logn_attn": ((False,), bool, "Qwen1's log-n attention"),
    "model.num_experts": (
        (1, 0),
        int,
        "a mixture of experts in this model_type (the MoE ones: INTERNLM_MoE, MIXTRALMOE, QWEN2MOE, QWEN3MOE)",
    ),
    "model.num_mtp_layers": ((0,), int, "multi-token prediction"),
    "model.extra_pred_tokens": ((0,), int, "multi-token prediction"),
}

# InternEvo's older name -> the field pytrain has (the value moves there)
RENAMED = {
    "enable_tb": "monitor.tensorboard.enable",
    "hybrid_zero_optimizer.zero_overlap_communication": "hybrid_zero_optimizer.overlap_sync_grad",
    "model.moe_gate_k": "model.top_k",
    "data.content_name": "data.text_key",
}
