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
            "parallel = dict(tensor=dict(mode='isp'))\n",
            r"parallel.tensor.mode: 'isp' is not available; use 'mtp' or 'msp'",
        ),
        (
            "parallel = dict(tensor=dict(size=2, mode='msp'))\nmodel = dict(num_attention_heads=32)\ndata = dict(seq_len=2047)\n",
            r"data.seq_len: 2047 cannot be split over parallel.tensor.size=2 \(sequence parallelism",
        ),
        ("parallel = dict(weight=2)\n", r"parallel.weight.size: weight parallelism \(isp\) is not available"),
        ("parallel = dict(pipeline=dict(size=0))\n", r"parallel.pipeline.size = 0: must be > 0"),
        ("parallel = dict(tensor=dict(mode='xyz'))\n", r"parallel.tensor.mode = 'xyz': must be one of"),
        ("data = dict(train_folder='/data/en')\n", r"data.train_folder: '/data/en': reading tokenized folders"),
        ("data = dict(valid_folder='/data/v')\n", r"data.valid_folder = '/data/v': validation data is not available"),
        (
            "data = dict(train_folder='builtin:stdlib')\nmodel = dict(vocab_size=100)\n",
            r"model.vocab_size: 100 is too small",
        ),
        ("data = dict(rampup_batch_size='1 1 1')\n", r"data.rampup_batch_size = '1 1 1': batch-size ramp-up is not"),
        ("adam = dict(lr=-1)\n", r"adam.lr = -1: must be > 0"),
        ("adam = dict(adam_beta2=1.0)\n", r"adam.adam_beta2 = 1.0: must be within \[0, 1\)"),
        ("lr_scheduler = dict(warmup_ratio=2)\n", r"lr_scheduler.warmup_ratio = 2: must be within \[0, 1\]"),
        ("grad_scaler = dict(backoff_factor=2)\n", r"grad_scaler.backoff_factor = 2: must be within \(0, 1\)"),
        ("ckpt = dict(enable_save_ckpt=True)\n", r"ckpt.enable_save_ckpt = True: checkpoint saving is not available"),
        ("loss = dict(label_smoothing=1)\n", r"loss.label_smoothing = 1: must be within \[0, 1\)"),
        ("monitor = dict(alert=dict(enable_feishu_alert=True))\n", r"monitor.alert.enable_feishu_alert = True"),
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
