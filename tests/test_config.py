import re
import textwrap

import pytest
from conftest import CONFIGS, ROOT

from pytrain.config import SCHEMA, Config, ConfigError, check_world_size, reference_table

SEED_MODEL_BLOCK = """
model_type = "INTERNLM"  # default is "INTERNLM", used to register classes and modules for model initialization
NUM_ATTENTION_HEAD = 32
VOCAB_SIZE = 103168
HIDDEN_SIZE = 4096
NUM_LAYER = 32
MLP_RATIO = 8 / 3
model = dict(
    checkpoint=False,  # The proportion of layers for activation aheckpointing, the optional value are True/False/[0-1]
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",  # Support: "torch.float16", "torch.half", "torch.bfloat16", "torch.float32", "torch.tf32"
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,  # if num_chunks > 1, interleaved pipeline scheduler is used.
)
"""


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_model_block_loads_verbatim(tmp_path):
    cfg = Config.from_file(write(tmp_path, SEED_MODEL_BLOCK))
    assert cfg.model_type == "INTERNLM"
    assert cfg.model.hidden_size == 4096 and cfg["model"]["num_layers"] == 32
    assert cfg.model.mlp_ratio == 8 / 3 and cfg.model.dtype == "torch.bfloat16"
    assert cfg.NUM_LAYER == 32  # upper-case helpers pass through
    # InternLM's defaults filled in
    assert cfg.data.micro_num == 4 and cfg.data.micro_bsz == 2 and cfg.data.seq_len == 2048
    assert cfg.adam.lr == 1e-4 and cfg.adam.adam_beta2 == 0.95
    assert cfg.hybrid_zero_optimizer.clip_grad_norm == 1.0
    assert cfg.grad_scaler.fp16.initial_scale == 2**16
    assert cfg.parallel.zero1.size == -1 and cfg.parallel.tensor.mode == "mtp"
    assert cfg.lr_scheduler.total_steps == cfg.data.total_steps
    assert cfg.beta2_scheduler.init_beta2 == cfg.adam.adam_beta2


def test_shipped_configs_load():
    tiny = Config.from_file(CONFIGS / "tiny.py")
    assert tiny.data.train_folder == "builtin:stdlib"
    big = Config.from_file(CONFIGS / "7B.py")
    assert big.model.hidden_size == 4096 and big.model.num_layers == 32


def test_attribute_and_item_access(tmp_path):
    cfg = Config.from_file(write(tmp_path, "model = dict(hidden_size=64, num_attention_heads=4)\n"))
    assert cfg.model.hidden_size == cfg["model"]["hidden_size"] == 64
    cfg.model.num_layers = 3
    assert cfg["model"]["num_layers"] == 3
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = cfg.nope


def test_dump_round_trips(tmp_path):
    cfg = Config.from_file(CONFIGS / "tiny.py", overrides=["model.num_layers=3"])
    dumped = write(tmp_path, cfg.dump(), "dumped.py")
    assert Config.from_file(dumped) == cfg


def test_overrides(tmp_path):
    cfg = Config.from_file(
        CONFIGS / "tiny.py",
        overrides=[
            "model.num_layers=2",
            "data.micro_bsz=1",
            "monitor.tensorboard.enable=False",
            "JOB_NAME=x",
            "data.cache_folder=/tmp/somewhere",
        ],
    )
    assert cfg.model.num_layers == 2 and cfg.data.micro_bsz == 1 and cfg.monitor.tensorboard.enable is False
    assert cfg.JOB_NAME == "x" and cfg.data.cache_folder == "/tmp/somewhere"


def test_parallel_size_shorthand(tmp_path):
    cfg = Config.from_file(write(tmp_path, "parallel = dict(zero1=4, tensor=1, pipeline=dict(size=1))\n"))
    assert cfg.parallel.zero1.size == 4 and cfg.parallel.tensor.size == 1 and cfg.parallel.tensor.mode == "mtp"


def test_bool_checkpoint_and_fraction(tmp_path):
    assert Config.from_file(write(tmp_path, "model = dict(checkpoint=True)\n")).model.checkpoint is True
    assert Config.from_file(write(tmp_path, "model = dict(checkpoint=0.25)\n")).model.checkpoint == 0.25


@pytest.mark.parametrize(
    "text, message",
    [
        ("modle = dict(hidden_size=8)\n", r"modle: unknown config section or field; did you mean 'model'\?"),
        ("model = dict(num_layer=2)\n", r"model.num_layer: unknown field; did you mean 'num_layers'\?"),
        ("parallel = dict(tensor=dict(sise=1))\n", r"parallel.tensor.sise: unknown field; did you mean 'size'\?"),
        ("model = dict(hidden_size='64')\n", r"model.hidden_size: expected int, got '64' \(str\)"),
        ("model = dict(num_layers=True)\n", r"model.num_layers: expected int, got True"),
        ("model = dict(num_layers=2.5)\n", r"model.num_layers: expected int, got 2.5"),
        ("model = dict(num_layers=0)\n", r"model.num_layers = 0: must be > 0"),
        ("model = dict(dtype='torch.float64')\n", r"model.dtype = 'torch.float64': must be one of"),
        (
            "model = dict(norm_type='batchnorm')\n",
            r"model.norm_type = 'batchnorm': must be one of 'rmsnorm', 'layernorm'",
        ),
        ("model = dict(checkpoint=1.5)\n", r"model.checkpoint = 1.5: must be within \[0, 1\]"),
        ("model = dict(embed_grad_scale=0)\n", r"model.embed_grad_scale = 0: must be within \(0, 1\]"),
        ("model = 3\n", r"model: must be a dict"),
        ("model = dict(hidden_size=100, num_attention_heads=32)\n", r"model.hidden_size: 100 is not divisible by"),
        (
            "model = dict(hidden_size=64, num_attention_heads=8, num_kv_attention_heads=3)\n",
            r"model.num_kv_attention_heads: num_attention_heads=8 is not a multiple of 3",
        ),
        ("model = dict(hidden_size=24, num_attention_heads=8)\n", r"model.hidden_size: head dim 3 must be even"),
        ("model = dict(num_chunks=2)\n", r"model.num_chunks: num_chunks > 1 .* needs parallel.pipeline.size > 1"),
        (
            "parallel = dict(tensor=dict(size=3))\nmodel = dict(num_attention_heads=32)\n",
            r"model.num_attention_heads: 32 cannot be split over parallel.tensor.size=3: use a tensor size that divides",
        ),
        (
            "parallel = dict(tensor=2)\nmodel = dict(vocab_size=103169, num_attention_heads=32)\n",
            r"model.vocab_size: 103169 cannot be split over parallel.tensor.size=2",
        ),
        (
            "parallel = dict(tensor=4)\nmodel = dict(num_attention_heads=8, num_kv_attention_heads=2)\n",
            r"model.num_kv_attention_heads: 2 cannot be split over parallel.tensor.size=4",
        ),
        (
            "parallel = dict(tensor=2)\nmodel = dict(tie_word_embeddings=True)\n",
            r"model.tie_word_embeddings: .* set embed_split_hidden=False",
        ),
        (
            "parallel = dict(pipeline=4)\nmodel = dict(num_layers=6, num_chunks=2)\n",
            r"model.num_layers: 6 layers cannot fill parallel.pipeline.size=4 x model.num_chunks=2 = 8 pipeline stages",
        ),
        (
            "parallel = dict(pipeline=4)\nmodel = dict(num_chunks=2)\ndata = dict(micro_num=6)\n",
            r"data.micro_num: the interleaved schedule needs micro_num \(6\) to be a multiple of parallel.pipeline.size=4",
        ),
        (
            "parallel = dict(pipeline=2)\nmodel = dict(num_chunks=2)\ndata = dict(micro_num=4, rampup_batch_size='1 2 10')\n",
            r"data.rampup_batch_size: '1 2 10': the interleaved schedule needs every step's micro-batch count to be a "
            r"multiple of parallel.pipeline.size=2: use a start and an increment divisible by 2",
        ),
        (
            "parallel = dict(tensor=dict(size=4, mode='isp'))\nmodel = dict(num_attention_heads=32)\ndata = dict(seq_len=2050)\n",
            r"data.seq_len: 2050 cannot be split over parallel.tensor.size=4 \(isp\): use a multiple of 4",
        ),
        (
            "parallel = dict(tensor=dict(size=2, mode='fsp'))\n",
            r"parallel.tensor.mode: 'fsp' \(flash-attn's sequence parallel; msp computes the same, keeping the gathered "
            r"activations for the backward\) is not available",
        ),
        (
            "parallel = dict(tensor=dict(size=2, mode='msp'))\nmodel = dict(num_attention_heads=32)\ndata = dict(seq_len=2047)\n",
            r"data.seq_len: 2047 cannot be split over parallel.tensor.size=2 \(sequence parallelism",
        ),
        (
            "parallel = dict(weight=2)\n",
            r"parallel.weight.size: 2: weight parallelism shards the weights of isp's sequence-split layers: set "
            r"parallel.tensor.mode='isp', or weight.size=1",
        ),
        ("parallel = dict(pipeline=dict(size=0))\n", r"parallel.pipeline.size = 0: must be > 0"),
        ("parallel = dict(tensor=dict(mode='xyz'))\n", r"parallel.tensor.mode = 'xyz': must be one of"),
        (
            "data = dict(train_folder='builtin:stdlib')\nmodel = dict(vocab_size=100)\n",
            r"model.vocab_size: 100 is too small",
        ),
        ("adam = dict(lr=-1)\n", r"adam.lr = -1: must be > 0"),
        ("adam = dict(adam_beta2=1.0)\n", r"adam.adam_beta2 = 1.0: must be within \[0, 1\)"),
        ("lr_scheduler = dict(warmup_ratio=2)\n", r"lr_scheduler.warmup_ratio = 2: must be within \[0, 1\]"),
        ("grad_scaler = dict(backoff_factor=2)\n", r"grad_scaler.backoff_factor = 2: must be within \(0, 1\)"),
        ("ckpt = dict(checkpoint_every=0)\n", r"ckpt.checkpoint_every = 0: must be > 0"),
        ("loss = dict(label_smoothing=1)\n", r"loss.label_smoothing = 1: must be within \[0, 1\)"),
        (
            "monitor = dict(alert=dict(enable_feishu_alert=True))\n",
            r"monitor.alert.enable_feishu_alert = True: Feishu alerts \(no network here\) is not available",
        ),
        (
            "monitor = dict(alert=dict(light_monitor_address='10.0.0.1'))\n",
            r"monitor.alert.light_monitor_address = '10.0.0.1': InternLM's light monitor .* is not available",
        ),
        ("monitor = dict(alert=dict(loss_spike_limit=1))\n", r"monitor.alert.loss_spike_limit = 1: must be > 1"),
        (
            "model = dict(num_experts=4)\n",
            r"model.num_experts = 4: not a field of INTERNLM \(its fields: num_layers, .*\); taken by INTERNLM_MoE, "
            r"MIXTRALMOE, QWEN2MOE, QWEN3MOE",
        ),
        (
            "moe = dict(top_k=2, capacity_factr=1.0)\n",
            r"moe.capacity_factr: unknown field; did you mean 'capacity_factor'",
        ),
        (
            "model_type = 'MIXTRALMOE'\nmodel = dict(num_experts=4, top_k=2)\nmoe = dict(noisy_gate_policy='RSample')\n",
            r"model: moe_layer_kwargs\['noisy_gate_policy'\] = 'RSample' is not available in pytrain \(Jitter and RSample",
        ),
        (
            "model_type = 'QWEN2MOE'\nmodel = dict(num_experts=4, top_k=2, moe_type='MegaBlock-D')\nmoe = dict(parallel_mode='weight')\n",
            r"model: moe_type='MegaBlock-D' \(MegaBlocks\) is not available in pytrain",
        ),
        (
            "model_type = 'QWEN2MOE'\nmodel = dict(num_experts=4, top_k=2, moe_layer_kwargs=dict(use_fused_gating=False))\n",
            r"model: moe_layer_kwargs\['use_fused_gating'\] = False with top_k=2 .* Gumbel noise: not available in pytrain",
        ),
        (
            "model_type = 'MIXTRALMOE'\nmodel = dict(num_experts=4, top_k=1)\nmoe = dict(top_k=2)\n",
            r"moe.top_k = 2 and model.top_k = 1: the moe section is InternEvo's older place of model.top_k",
        ),
        ("parallel = dict(zero1=dict(fsdp=1))\n", r"parallel.zero1.fsdp"),
        ("parallel = dict(pipeline=dict(mode='ZBH1'))\n", r"parallel.pipeline.mode = 'ZBH1': zero-bubble"),
        (
            "parallel = dict(sequence_2D=dict(enable=True))\n",
            r"parallel.sequence_2D.enable: 2D sequence parallelism splits isp's sequence: set parallel.tensor.mode='isp'",
        ),
        (
            "hybrid_zero_optimizer = dict(use_split_tensor_optim=True)\n",
            r"hybrid_zero_optimizer.use_split_tensor_optim = True: the split-tensor",
        ),
        (
            "model = dict(drop_rate=0.1)\n",
            r"model.drop_rate = 0.1: dropout is not available in pytrain; leave it at 0.0",
        ),
        (
            "data = dict(type='parquet')\n",
            r"data.type = 'parquet': must be one of 'tokenized', 'megatron', 'streaming'",
        ),
        ("data = dict(type='hf')\n", r"data.tokenizer_path: data.type='hf' tokenizes text on the fly: set it to"),
        ("selective_checkpoint_offload = True\n", r"selective_checkpoint_offload: offloads what selective_checkpoint"),
        (
            "parallel = dict(sequence_parallel=True, tensor=dict(size=1, mode='mtp'))\n",
            r"parallel.sequence_parallel: True is InternEvo's older spelling .* set parallel.tensor.mode='msp'",
        ),
        (
            "data = dict(micro_num=4, gradient_accumulation=8)\n",
            r"data.gradient_accumulation: 8: pytrain accumulates data.micro_num=4 micro-batches",
        ),
        (
            "enable_tb = False\nmonitor = dict(tensorboard=dict(enable=True))\n",
            r"enable_tb = False and monitor.tensorboard.enable = True: enable_tb is InternEvo's older name",
        ),
        ("model = dict(no_biass=True)\n", r"model.no_biass: unknown field; did you mean 'no_bias'\?"),
        ("generation = 3\n", r"generation: expected dict | None, got 3"),
        (
            "ckpt = dict(enable_internevo2hf_ckpt=True)\n",
            r"ckpt.enable_internevo2hf_ckpt = True: also save checkpoints in Hugging Face format .* is not available",
        ),
        ("parallel = dict(process_group_timeout_s=0)\n", r"parallel.process_group_timeout_s = 0: must be > 0"),
        (
            "parallel = dict(process_group_timeout_s='30m')\n",
            r"parallel.process_group_timeout_s: expected int | float, got '30m' \(str\)",
        ),
        ("parallel = dict(process_group_timeout_s=True)\n", r"parallel.process_group_timeout_s: expected int | float"),
        # InternLM's older spellings of a mode pytrain does not run: refused in the spelling the file used
        (
            "parallel = dict(tensor=dict(size=2, sp='flash-attn'))\n",
            r"parallel.tensor.sp = 'flash-attn': InternLM's older spelling of mode='fsp' \(flash-attn's sequence "
            r"parallel; msp computes the same.*\), which is not available in pytrain",
        ),
        (
            "parallel = dict(tensor=dict(size=2, mode='origin_tp'), sequence_parallel=True)\n",
            r"parallel.tensor.mode = 'origin_tp' with parallel.sequence_parallel=True: InternLM's older spelling of "
            r"mode='fsp' \(flash-attn's sequence parallel",
        ),
        (
            "parallel = dict(tensor=dict(size=2, sp='flash'))\n",
            r"parallel.tensor.sp = 'flash': must be one of 'none', 'megatron', 'flash-attn', 'intern'",
        ),
        (
            "parallel = dict(tensor=dict(size=2, sp='megatron', mode='mtp'))\n",
            r"parallel.tensor.sp = 'megatron' and parallel.tensor.mode = 'mtp': sp is InternLM's older spelling of mode "
            r"\('megatron' is 'msp'\); give only mode",
        ),
        ("parallel = dict(tensor=dict(sp=1))\n", r"parallel.tensor.sp: expected str, got 1 \(int\)"),
        # InternLM v0.1/v0.2's loading switches, where they say something else than the fields they became
        (
            "ckpt = dict(load_ckpt_folder='local:a/10', load_model_only_folder='local:b')\n",
            r"ckpt.load_model_only_folder and ckpt.load_ckpt_folder are both set: InternLM refuses that too",
        ),
        (
            "ckpt = dict(load_model_only_folder='local:b', load_ckpt_info=dict(path='local:c', content=('model',)))\n",
            r"ckpt.load_model_only_folder = 'local:b' and ckpt.load_ckpt_info = \{'path': 'local:c'.*: "
            r"load_model_only_folder is InternLM's older spelling of load_ckpt_info=.*; give only load_ckpt_info",
        ),
        (
            "ckpt = dict(load_given_ckpt=True, auto_resume=True)\n",
            r"ckpt.load_given_ckpt = True and ckpt.auto_resume = True: load_given_ckpt is InternLM's older spelling of "
            r"auto_resume=False; give only auto_resume",
        ),
        ("ckpt = dict(load_optimizer='no')\n", r"ckpt.load_optimizer: expected bool, got 'no' \(str\)"),
        (
            "ckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:ckpts', oss_snapshot_freq=25, "
            "snapshot_ckpt_folder='local:elsewhere')\n",
            r"ckpt.snapshot_ckpt_folder: 'local:elsewhere': snapshots go to <save_ckpt_folder>/snapshot "
            r"\(ckpts/snapshot\) in pytrain; another folder is not available",
        ),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + message):
        Config.from_file(path)


def test_missing_file_and_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.from_file(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="executing the config file failed: ZeroDivisionError"):
        Config.from_file(write(tmp_path, "x = 1 / 0\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layers", r"--set 'model.num_layers': expected section.field=value"),
        ("modle.num_layers=2", r"modle is not a config section; did you mean 'model'\?"),
        ("model.num_layer=2", r"model.num_layer: unknown field; did you mean 'num_layers'\?"),
        ("model.num_layers=two", r"model.num_layers: expected int, got 'two'"),
        ("model.num_layers=-1", r"model.num_layers = -1: must be > 0"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_file(CONFIGS / "tiny.py", overrides=[override])


def test_layout_must_divide_world_size(tmp_path):
    cfg = Config.from_file(write(tmp_path, "parallel = dict(zero1=dict(size=3))\n"))
    with pytest.raises(ConfigError, match=r"parallel.zero1.size=3 does not divide the data-parallel size 4"):
        check_world_size(cfg, 4)
    assert check_world_size(cfg, 6) == 6
    assert check_world_size(Config.from_file(CONFIGS / "tiny.py"), 2) == 2


def test_readme_config_reference_is_current():
    """README's table is generated from SCHEMA: a field added to one must be added to the other."""
    assert reference_table() in (ROOT / "README.md").read_text()
    assert set(SCHEMA) >= {
        "model",
        "data",
        "parallel",
        "adam",
        "lr_scheduler",
        "beta2_scheduler",
        "grad_scaler",
        "hybrid_zero_optimizer",
        "loss",
        "ckpt",
        "monitor",
    }


def test_tensor_times_pipeline_must_divide_world_size():
    cfg = Config.from_file(CONFIGS / "tiny.py")
    cfg.parallel.tensor.size = 3  # set after validation: the layout check runs against the world size
    with pytest.raises(ConfigError, match=r"tensor.size=3 x pipeline.size=1 does not divide the world size 4"):
        check_world_size(cfg, 4)


# --- InternEvo's vocabulary and the model section's builder contract ------------------------------------------


@pytest.fixture
def builders():
    """Registers model builders for one test and removes them afterwards."""
    from pytrain.registry import MODEL_INITIALIZER

    names = []

    def register(name, builder):
        MODEL_INITIALIZER.register_module(module_name=name, module=builder)
        names.append(name)

    yield register
    for name in names:
        MODEL_INITIALIZER.unregister(name)


def build_plain(*, num_layers, hidden_size, num_attention_heads, vocab_size, no_bias=True, rope_base=5e5):
    raise AssertionError("validation never calls the builder")


def build_any(**fields):
    raise AssertionError("validation never calls the builder")


def test_explicit_builder_gets_exactly_its_parameters(tmp_path, builders):
    builders("TEST_PLAIN", build_plain)
    text = """
    model_type = "TEST_PLAIN"
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, rope_base=1e4,
                 qkv_bias=True, mlp_layer_fusion=True, num_experts=1)
    """
    cfg = Config.from_file(write(tmp_path, text))
    assert dict(cfg.model) == dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, no_bias=True, rope_base=1e4
    )
    # qkv_bias acts in other families; mlp_layer_fusion is InternEvo-only; num_experts=1 changes nothing
    assert cfg.ignored_here == ("model.qkv_bias (not a field of TEST_PLAIN)", "model.mlp_layer_fusion")
    assert Config.from_file(write(tmp_path, cfg.dump(), "dumped.py")) == cfg


def test_explicit_builder_required_parameter_and_unavailable_value(tmp_path, builders):
    builders("TEST_PLAIN", build_plain)
    path = write(tmp_path, 'model_type = "TEST_PLAIN"\nmodel = dict(num_layers=2, hidden_size=64, vocab_size=256)\n')
    with pytest.raises(ConfigError, match=r"model.num_attention_heads: required by TEST_PLAIN \(its builder has no"):
        Config.from_file(path)
    text = 'model_type = "TEST_PLAIN"\nmodel = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, num_experts=8)\n'
    with pytest.raises(
        ConfigError, match=r"model.num_experts = 8: not a field of TEST_PLAIN \(its fields: .*\); taken by INTERNLM_MoE"
    ):
        Config.from_file(write(tmp_path, text))


def test_cross_field_checks_run_on_the_effective_model(tmp_path, builders):
    builders("TEST_PLAIN", build_plain)
    text = 'model_type = "TEST_PLAIN"\nparallel = dict(tensor=2)\nmodel = dict(num_layers=2, hidden_size=64, num_attention_heads=3, vocab_size=256)\n'
    with pytest.raises(ConfigError, match=r"model.hidden_size: 64 is not divisible by model.num_attention_heads=3"):
        Config.from_file(write(tmp_path, text))


def test_builder_parameter_unknown_to_the_schema_is_a_field_of_that_model_type(tmp_path, builders):
    def build_custom(*, hidden_size=64, num_attention_heads=4, vocab_size=256, num_layers=2, my_width=7):
        raise AssertionError

    builders("TEST_CUSTOM", build_custom)
    cfg = Config.from_file(write(tmp_path, 'model_type = "TEST_CUSTOM"\nmodel = dict(my_width=9)\n'))
    assert cfg.model.my_width == 9 and cfg.model.hidden_size == 64
    with pytest.raises(ConfigError, match=r"model.my_widht: unknown field; did you mean 'my_width'\?"):
        Config.from_file(write(tmp_path, 'model_type = "TEST_CUSTOM"\nmodel = dict(my_widht=9)\n'))


def test_kwargs_builder_gets_every_given_field_over_the_generic_defaults(tmp_path, builders):
    builders("TEST_ANY", build_any)
    cfg = Config.from_file(write(tmp_path, 'model_type = "TEST_ANY"\nmodel = dict(hidden_size=64, init_type="x")\n'))
    assert cfg.model.hidden_size == 64 and cfg.model.init_type == "x" and cfg.model.num_layers == 32
    assert "model.init_type" not in cfg.ignored_here  # the builder receives it and decides
    assert "dropout_selective_checkpoint" not in cfg.model  # not an acting field, not given
    assert "no_bias" not in cfg.model  # a field of some families only, not given


def test_unregistered_model_type_lists_the_registered_ones(tmp_path):
    from pytrain.registry import MODEL_INITIALIZER

    with pytest.raises(ConfigError, match=r"model_type = 'LLAMA3': no model is registered under that name") as err:
        Config.from_file(write(tmp_path, 'model_type = "LLAMA3"\n'))
    assert str(err.value).endswith("registered: " + ", ".join(MODEL_INITIALIZER.names()))
    with pytest.raises(ConfigError, match=r"'INTERNLMM'.*\(did you mean 'INTERNLM'\?\)"):
        Config.from_file(write(tmp_path, 'model_type = "INTERNLMM"\n'))


def test_ignored_fields_are_listed_once_and_kept(tmp_path):
    text = """
    enable_tb = True
    data = dict(empty_cache_and_diag_interval=200, diag_outlier_ratio=1.1, use_shm=False)
    loss = dict(label_smoothing=0, moe_loss_coeff=0.1)
    generation = dict(batch_size=1, max_length=100)
    parallel = dict(weight=dict(size=1, overlap=True, memory_pool=True))
    ckpt = dict(auto_resume=False, checkpoint_every=50)
    hybrid_zero_optimizer = dict(zero_overlap_communication=False)
    """
    cfg = Config.from_file(write(tmp_path, text))
    assert cfg.ignored_here == (
        "data.empty_cache_and_diag_interval",
        "data.diag_outlier_ratio",
        "data.use_shm",
        "parallel.weight.memory_pool",
        "generation",
    )
    assert cfg.data.diag_outlier_ratio == 1.1 and cfg.generation == {"batch_size": 1, "max_length": 100}
    # renamed: the value moved to the field pytrain has
    assert (
        cfg.hybrid_zero_optimizer.overlap_sync_grad is False
        and "zero_overlap_communication" not in cfg.hybrid_zero_optimizer
    )
    assert cfg.monitor.tensorboard.enable is True and "enable_tb" not in cfg
    assert "moe" not in cfg  # an absent non-acting section stays absent
    assert Config.from_file(write(tmp_path, cfg.dump(), "dumped.py")) == cfg


def test_every_schema_field_has_a_kind_in_the_table():
    table = reference_table()
    assert "| `model.num_experts` | int | `1` | not available | a mixture of experts in this model_type" in table
    assert "| `moe.top_k` | int | `1` | renamed: `model.top_k` |" in table
    assert "| `model.moe_layer_kwargs.use_rts` | bool | `True` | acts | moe_type='GShard' |" in table
    assert "| `data.diag_outlier_ratio` | int | float | `1.1` | ignored here |" in table
    assert "| `ckpt.auto_resume` | bool | `True` | acts |" in table
    assert "| `enable_tb` | bool | `True` | renamed: `monitor.tensorboard.enable` |" in table


def names_read_by_the_package() -> set[str]:
    """Every attribute, string, parameter and keyword name in pytrain/ outside the config modules: a field whose
    name is none of these is read nowhere."""
    import ast

    names = set()
    for path in (ROOT / "pytrain").rglob("*.py"):
        if path.name in ("config.py", "config_vocabulary.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                names.add(node.arg)
    return names


def schema_leaves(schema=SCHEMA, prefix=""):
    for key, spec in schema.items():
        if isinstance(spec, dict):
            yield from schema_leaves(spec, f"{prefix}{key}.")
        else:
            yield prefix + key, spec


def test_every_field_acts_or_says_it_does_not():
    """No field validates and then acts nowhere: each one that claims to act is read by the package (a model
    field: a parameter of a registered builder), or it is marked ignored here / not available / pending /
    renamed to one that acts."""
    from pytrain.config import ACTS, IGNORED, PENDING, RENAMED, UNAVAILABLE, builder_parameters
    from pytrain.registry import MODEL_INITIALIZER

    read = names_read_by_the_package()
    builder_fields = set()
    for name in MODEL_INITIALIZER.names():
        builder_fields |= set(builder_parameters(MODEL_INITIALIZER.get_module(name)) or ())
    leaves = dict(schema_leaves())
    acting_nowhere = []
    for name, spec in leaves.items():
        assert spec.kind in (ACTS, IGNORED, UNAVAILABLE, PENDING, RENAMED), name
        if spec.kind == UNAVAILABLE:
            assert spec.allowed and spec.allowed[0] == spec.default, name
        if spec.note and spec.kind in (RENAMED, ACTS):  # its value goes to (or is the default of) another field
            assert leaves[spec.note].kind == ACTS, name
            continue
        if spec.kind != ACTS:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not (leaf in builder_fields if name.startswith("model.") else leaf in read):
            acting_nowhere.append(name)
    assert acting_nowhere == []


def test_pending_fields_are_the_checkpoint_ones():
    """Until checkpoints land: these are refused or listed as ignored, nothing else is."""
    from pytrain.config import PENDING

    pending = {name for name, spec in schema_leaves() if spec.kind == PENDING}
    assert pending <= {name for name, _ in schema_leaves() if name.startswith("ckpt.")}


def test_a_builder_naming_an_unavailable_field_implements_it(tmp_path, builders):
    """model.num_experts > 1 is refused unless the model_type's builder takes num_experts itself."""

    def build_moe(*, num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, num_experts=1):
        raise AssertionError

    builders("TEST_MOE", build_moe)
    cfg = Config.from_file(write(tmp_path, 'model_type = "TEST_MOE"\nmodel = dict(num_experts=8)\n'))
    assert cfg.model.num_experts == 8 and cfg.ignored_here == ()


def test_the_moe_section_moves_into_the_model_section(tmp_path):
    text = """
    model_type = "MIXTRALMOE"
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256, num_experts=4)
    moe = dict(top_k=2, capacity_factor=1.25, min_capacity=2, use_rts=True)
    loss = dict(moe_loss_coeff=0.02)
    """
    cfg = Config.from_file(write(tmp_path, text))
    assert cfg.model.top_k == 2 and cfg.loss.moe_loss_coeff == 0.02 and "moe" not in cfg
    assert cfg.model.moe_layer_kwargs == dict(capacity_factor=1.25, min_capacity=2, use_rts=True)
    assert cfg.ignored_here == ()
    assert Config.from_file(write(tmp_path, cfg.dump(), "dumped.py")) == cfg
    text = 'model_type = "QWEN2MOE"\nmodel = dict(num_experts=4, moe_type="Dropless", moe_layer_kwargs=dict(use_grouped_mlp=False, deterministic_mode=True))\n'
    cfg = Config.from_file(write(tmp_path, text))
    assert cfg.ignored_here == ("model.moe_layer_kwargs.use_grouped_mlp", "model.moe_layer_kwargs.deterministic_mode")


def test_expert_parallel_size_is_checked_against_the_layout(tmp_path):
    from pytrain.config import expert_parallel_size

    def moe(parallel):
        text = f'model_type = "MIXTRALMOE"\nmodel = dict(num_experts=4, top_k=2)\nparallel = {parallel}\n'
        return Config.from_file(write(tmp_path, text))

    with pytest.raises(
        ConfigError, match=r"parallel.expert.size=3 must divide the data-parallel size 6 and model.num_experts=4"
    ):
        check_world_size(moe("dict(expert=dict(size=3))"), 6)
    # InternEvo's default -1: the data-parallel size, or num_experts if fewer: min(6, 4) = 4, which does not divide 6
    with pytest.raises(ConfigError, match=r"parallel.expert.size=4 must divide the data-parallel size 6"):
        check_world_size(moe("dict()"), 6)
    assert check_world_size(moe("dict(expert=dict(size=1))"), 4) == 4
    assert (
        expert_parallel_size(moe("dict()"), 1) == 1 and expert_parallel_size(moe("dict(expert=dict(size=1))"), 8) == 1
    )
    dense = Config.from_file(write(tmp_path, "parallel = dict(expert=dict(size=-1))\n"))
    assert expert_parallel_size(dense, 8) == 1 and check_world_size(dense, 8) == 8


MODEL_ONLY = dict(path="local:llm_ckpts/xxxx", content=("model",), ckpt_type="internlm")


@pytest.mark.parametrize(
    "text, effective, ignored",
    [
        # parallel.tensor: InternLM's sp (d91a5d9) and mode='origin_tp' (5fb6d99), as InternEvo's modes
        (
            "parallel = dict(tensor=dict(size=2, sp='none', intern_overlap=False))",
            {"parallel.tensor.mode": "mtp"},
            ["parallel.tensor.intern_overlap"],
        ),
        ("parallel = dict(tensor=dict(size=2, sp='megatron'))", {"parallel.tensor.mode": "msp"}, []),
        ("parallel = dict(tensor=dict(size=2, sp='megatron', mode='msp'))", {"parallel.tensor.mode": "msp"}, []),
        (
            "parallel = dict(tensor=dict(size=2, sp='none', memory_pool=False, reduce_scatter_overlap=True))",
            {"parallel.tensor.mode": "mtp"},
            ["parallel.tensor.memory_pool", "parallel.tensor.reduce_scatter_overlap"],
        ),
        (
            "parallel = dict(tensor=dict(size=2, mode='origin_tp', overlap=False), sequence_parallel=False)",
            {"parallel.tensor.mode": "mtp"},
            ["parallel.tensor.overlap", "parallel.sequence_parallel"],
        ),
        # ckpt: InternLM v0.1/v0.2's switches, where InternLM's legacy shim (f6e007f) put them
        ("ckpt = dict(load_model_only_folder='local:llm_ckpts/xxxx')", {"ckpt.load_ckpt_info": MODEL_ONLY}, []),
        (
            "ckpt = dict(load_model_only_folder='local:llm_ckpts/xxxx', load_ckpt_info=MODEL_ONLY)",
            {"ckpt.load_ckpt_info": MODEL_ONLY},
            [],
        ),
        (
            "ckpt = dict(load_ckpt_folder='local:llm_ckpts/49', load_optimizer=False)",
            {
                "ckpt.load_ckpt_info": dict(
                    path="local:llm_ckpts/49", content=("model", "sampler", "scheduler"), ckpt_type="internlm"
                )
            },
            [],
        ),
        (
            "ckpt = dict(load_ckpt_folder='local:llm_ckpts/49', load_optimizer=True)",
            {"ckpt.load_ckpt_info": None, "ckpt.load_ckpt_folder": "local:llm_ckpts/49"},
            [],
        ),
        (
            "ckpt = dict(load_optimizer=False)",
            {"ckpt.load_ckpt_info": None},
            ["ckpt.load_optimizer (applies to load_ckpt_folder only)"],
        ),
        (
            "ckpt = dict(load_ckpt_folder='local:llm_ckpts/49', load_ckpt_info=MODEL_ONLY, load_optimizer=False)",
            {"ckpt.load_ckpt_info": MODEL_ONLY},
            ["ckpt.load_optimizer (applies to load_ckpt_folder only)"],
        ),
        ("ckpt = dict(load_ckpt_folder='local:llm_ckpts/49', load_given_ckpt=True)", {"ckpt.auto_resume": False}, []),
        ("ckpt = dict(load_given_ckpt=False, auto_resume=True)", {"ckpt.auto_resume": True}, []),
        # InternLM v0.2.0's snapshot folder, where pytrain's snapshots go
        (
            "ckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:llm_ckpts', oss_snapshot_freq=25, snapshot_ckpt_folder='/'.join(['local:llm_ckpts', 'snapshot']))",
            {"ckpt.snapshot_ckpt_folder": "local:llm_ckpts/snapshot"},
            ["ckpt.snapshot_ckpt_folder"],
        ),
        # InternLM v0.2.1's rampup_batch_size=None and model.moe_gate_k
        ("data = dict(rampup_batch_size=None)", {"data.rampup_batch_size": ""}, []),
        ("model_type = 'INTERNLM_MoE'\nmodel = dict(num_experts=4, moe_gate_k=2)", {"model.top_k": 2}, []),
        # InternEvo's names of isp-only and diagnostic switches
        (
            "grad_profiling = dict(grad_norm_profiling=True, zero_grad_profiling=True, interval_steps=5)",
            {},
            ["grad_profiling"],
        ),
        ("selective_checkpoint_offload = False", {}, []),  # acts now (at its default here)
        # InternLM's isp spellings before InternEvo named the mode: they act now
        (
            "parallel = dict(tensor=dict(size=2, sp='intern', intern_overlap=True, memory_pool=True))",
            {"parallel.tensor.mode": "isp"},
            ["parallel.tensor.intern_overlap", "parallel.tensor.memory_pool"],
        ),
        (
            "parallel = dict(tensor=dict(size=8, mode='fstp', overlap=True), sequence_parallel=True)",
            {"parallel.tensor.mode": "isp"},
            ["parallel.tensor.overlap", "parallel.sequence_parallel"],
        ),
        (
            "parallel = dict(weight=dict(size=1, early_reduce_scatter_release=False))",
            {},
            ["parallel.weight.early_reduce_scatter_release"],
        ),
    ],
)
def test_older_internlm_spellings_move_to_the_fields_they_became(tmp_path, text, effective, ignored):
    cfg = Config.from_file(write(tmp_path, f"MODEL_ONLY = {MODEL_ONLY!r}\n{text}\n"))
    for name, value in effective.items():
        section, field = name.rsplit(".", 1)
        node = cfg
        for part in section.split("."):
            node = node[part]
        assert node.get(field) == value, name
    assert "sp" not in cfg.parallel.tensor and not {"load_optimizer", "load_model_only_folder"} & set(cfg.ckpt)
    assert list(cfg.ignored_here) == ignored
    assert Config.from_file(write(tmp_path, cfg.dump(), "dumped.py")) == cfg


def test_the_timeout_of_the_process_groups_is_a_parallel_field(tmp_path):
    assert Config.from_file(write(tmp_path, "")).parallel.process_group_timeout_s == 1800
    cfg = Config.from_file(write(tmp_path, "parallel = dict(tensor=1, process_group_timeout_s=120.5)\n"))
    assert cfg.parallel.process_group_timeout_s == 120.5
    assert "| `parallel.process_group_timeout_s` | int | float | `1800` | acts |" in reference_table()
