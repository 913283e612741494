"""InternLM's and InternEvo's own config files (tests/configs/) load or fail exactly as specified here.

A config whose model_type is not registered is expected to fail with the list of registered ones, so an
expectation flips by itself when its family lands; refusals of pending features (checkpoint loading) flip
when those land: change the entry from Fails(...) to Loads(...).
"""

import re
from dataclasses import dataclass

import pytest
from conftest import ROOT

from pytrain.config import Config, ConfigError, check_world_size
from pytrain.registry import MODEL_INITIALIZER

FOLDER = ROOT / "tests" / "configs"
CKPT_IGNORED = ("ckpt.async_upload_tmp_folder",)
INTERNEVO_IGNORED = (
    "data.empty_cache_and_diag_interval",
    "data.diag_outlier_ratio",
    "parallel.weight.memory_pool",
    *CKPT_IGNORED,
)


MOE_IGNORED = (
    "data.empty_cache_and_diag_interval",
    "data.diag_outlier_ratio",
    "parallel.weight.memory_pool",
    "parallel.expert_weight.overlap",
    "parallel.expert_weight.memory_pool",
    "parallel.expert.no_tp",
    *CKPT_IGNORED,
)


LOAD_OPTIMIZER_IGNORED = "ckpt.load_optimizer (applies to load_ckpt_folder only)"  # no load_ckpt_folder set
V02_IGNORED = (
    "data.empty_cache_and_diag_interval",
    "data.diag_outlier_ratio",
    "parallel.sequence_parallel",
    *CKPT_IGNORED,
)


@dataclass
class Loads:
    model_type: str
    ignored: tuple
    world_size: int = 1


@dataclass
class Fails:
    message: str


CASES = {
    "internlm_7B_sft.py": Loads(
        "INTERNLM",
        ("data.empty_cache_and_diag_interval", "data.diag_outlier_ratio", "parallel.sequence_parallel", *CKPT_IGNORED),
        world_size=8,
    ),
    "internevo_7B_sft.py": Loads(
        "INTERNLM",
        (
            "data.empty_cache_and_diag_interval",
            "data.diag_outlier_ratio",
            "parallel.weight.memory_pool",
            *CKPT_IGNORED,
        ),
    ),
    "internevo_7B_internlm2.py": Loads("INTERNLM2_PUBLIC", INTERNEVO_IGNORED, world_size=8),  # zero1=dict(size=8)
    "internevo_7B_llama2.py": Loads("LLAMA2", INTERNEVO_IGNORED),
    "internevo_7B_qwen2.py": Loads(
        "QWEN2",
        (
            "data.empty_cache_and_diag_interval",
            "data.diag_outlier_ratio",
            *CKPT_IGNORED,
            "generation",
        ),
    ),
    # isp over 2 ranks with weight parallelism over 4: data x tensor must be a multiple of 4
    "internevo_7B_isp_sft.py": Loads(
        "INTERNLM",
        ("data.empty_cache_and_diag_interval", "data.diag_outlier_ratio", "parallel.weight.memory_pool", *CKPT_IGNORED),
        world_size=4,
    ),
    # ZeroPP: pipeline 4 x 4 chunks in units of 4 micro-batches, the stages sharded over weight runs of 8 (isp with
    # tensor size 1): 32 ranks are data 8 x pipeline 4; decouple_grad defers the weight gradients and
    # reduce-scatters each chunk's once per unit
    "internevo_7B_llama2_zeropp.py": Loads(
        "LLAMA2",
        ("data.empty_cache_and_diag_interval", "data.diag_outlier_ratio", "parallel.weight.memory_pool", *CKPT_IGNORED),
        world_size=32,
    ),
    # the top-level moe section (top_k=2, capacity_factor, ...) moves into model.top_k / model.moe_layer_kwargs
    "internevo_7B_MoE4_sft.py": Loads("INTERNLM_MoE", INTERNEVO_IGNORED),
    "internevo_8x7B_mixtral.py": Loads("MIXTRALMOE", MOE_IGNORED),
    "internevo_57B_qwen2_MoE.py": Loads("QWEN2MOE", MOE_IGNORED),
    "ignored_fields_qwen2.py": Loads(
        "QWEN2",
        (
            "model.no_bias (not a field of QWEN2)",
            "model.init_type",
            "model.embedding_init_std",
            "model.mlp_layer_fusion",
            "data.empty_cache_and_diag_interval",
            "data.diag_outlier_ratio",
            "data.fixed_random_dataset_seqlen",
            "data.use_shm",
            "hybrid_zero_optimizer.all_gather_size",
            "loss.op_type",
            "use_apex_adam",
            "generation",
        ),
    ),
    "sliding_window_qwen2.py": Loads("QWEN2", ()),
    # InternLM's older releases and its isp work (README's "Older InternLM spellings")
    "internlm_v010_7B_sft.py": Loads("INTERNLM", (LOAD_OPTIMIZER_IGNORED,), world_size=8),  # zero1=8
    "internlm_v020_7B_sft.py": Loads(
        "INTERNLM",
        (LOAD_OPTIMIZER_IGNORED, "parallel.sequence_parallel", *CKPT_IGNORED, "ckpt.snapshot_ckpt_folder"),
        world_size=8,
    ),
    "internlm_v021_7B_MoE4_sft.py": Loads("INTERNLM_MoE", V02_IGNORED),
    "internlm_origin_tp_7B_sft.py": Loads("INTERNLM", V02_IGNORED, world_size=8),
    "internlm_sp_none_7B_sft.py": Loads(
        "INTERNLM",
        (
            "data.empty_cache_and_diag_interval",
            "data.diag_outlier_ratio",
            "parallel.tensor.intern_overlap",
            *CKPT_IGNORED,
        ),
        world_size=8,  # tensor=dict(size=8, ...)
    ),
    "internlm_sp_intern_7B_sft.py": Loads(
        "INTERNLM",
        (
            "data.empty_cache_and_diag_interval",
            "data.diag_outlier_ratio",
            "parallel.tensor.intern_overlap",
            "parallel.tensor.memory_pool",
            *CKPT_IGNORED,
        ),
        world_size=8,
    ),
}


def test_every_config_in_the_folder_has_an_expectation():
    assert sorted(p.name for p in FOLDER.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_loads_or_fails_as_specified(name, tmp_path):
    path, expected = FOLDER / name, CASES[name]
    if isinstance(expected, Loads) and expected.model_type not in MODEL_INITIALIZER:
        registered = ", ".join(MODEL_INITIALIZER.names())
        expected = Fails(rf"model_type = '{expected.model_type}': no model is registered .*; registered: {registered}$")
    if isinstance(expected, Fails):
        with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + expected.message):
            Config.from_file(path)
        return
    cfg = Config.from_file(path)
    assert cfg.model_type == expected.model_type
    assert cfg.ignored_here == expected.ignored
    check_world_size(cfg, expected.world_size, str(path))
    dumped = tmp_path / "dumped.py"
    dumped.write_text(cfg.dump())
    assert Config.from_file(dumped) == cfg


@pytest.mark.parametrize("name", sorted(n for n, e in CASES.items() if isinstance(e, Loads)))
def test_dry_run_prints_the_ignored_list(name, capsys):
    from pytrain.train.__main__ import main

    expected = CASES[name]
    if expected.model_type not in MODEL_INITIALIZER:
        pytest.skip(f"{expected.model_type} is not registered yet")
    argv = ["--config", str(FOLDER / name), "--dry_run", "--world_size", str(expected.world_size)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{expected.model_type} with " in out
    assert f"; ignored here: {', '.join(expected.ignored)}" in out if expected.ignored else "ignored here" not in out
    if name in PARAMETERS:
        assert f" with {PARAMETERS[name]:,} parameters" in out
    if name in ACTIVE:
        assert f", {ACTIVE[name]:,} active per token" in out
    else:
        assert "active per token" not in out


# The sizes the dry run reports for the real 7B configs: InternLM-7B 7.32B, InternLM2-7B 7.74B and Qwen2-7B 7.62B as
# published; InternEvo's own 7B_llama2.py sets MLP_RATIO=3.5 (14336 wide), so it is 7.24B, not Llama-2-7B's 6.74B
# (11008 wide: see tests/test_families.py).
PARAMETERS = {
    "internlm_7B_sft.py": 7_321_948_160,
    "internevo_7B_sft.py": 7_321_948_160,
    "internevo_7B_internlm2.py": 7_737_708_544,
    "internevo_7B_qwen2.py": 7_615_616_512,
    "internevo_7B_llama2.py": 7_241_732_096,
    "internevo_7B_llama2_zeropp.py": 7_241_732_096,
    # Mixtral-8x7B 46.7B (12.9B active) and Qwen2-57B-A14B 57.4B (14.2B active) as published; InternLM's
    # 7B_MoE4_sft: 4 experts 5632 wide (mlp_ratio 4/3), top-2, with v1's biased attention, computed below.
    "internevo_8x7B_mixtral.py": 46_702_792_704,
    "internevo_57B_qwen2_MoE.py": 57_408_658_944,
    "internevo_7B_MoE4_sft.py": 11_852_320_768,
    # InternLM v0.2.1's 7B_MoE4_sft: the same model with 8 experts (computed below too); the older InternLM 7Bs
    "internlm_v021_7B_MoE4_sft.py": 20_711_215_104,
    **dict.fromkeys(
        (
            "internlm_v010_7B_sft.py",
            "internlm_v020_7B_sft.py",
            "internlm_origin_tp_7B_sft.py",
            "internlm_sp_none_7B_sft.py",
        ),
        7_321_948_160,
    ),
}
ACTIVE = {
    "internevo_8x7B_mixtral.py": 12_879_925_248,
    "internevo_57B_qwen2_MoE.py": 14_249_270_784,
    "internevo_7B_MoE4_sft.py": 7_423_135_744,
    "internlm_v021_7B_MoE4_sft.py": 7_423_660_032,
}


def test_old_internlm_spellings_take_the_fields_they_became():
    """The older spellings in the InternLM files above, read as what they meant there."""
    v020 = Config.from_file(FOLDER / "internlm_v020_7B_sft.py")
    # snapshot_ckpt_folder is SAVE_CKPT_FOLDER/snapshot, where pytrain's snapshots go; load_optimizer=True with no
    # load_ckpt_folder to resume loads nothing either way
    assert v020.ckpt.snapshot_ckpt_folder == "local:llm_ckpts/snapshot" and "load_optimizer" not in v020.ckpt
    assert v020.ckpt.load_ckpt_info is None and v020.ckpt.auto_resume is True
    moe = Config.from_file(FOLDER / "internlm_v021_7B_MoE4_sft.py")
    assert moe.model.top_k == 2 and "moe_gate_k" not in moe.model
    for name in ("internlm_sp_none_7B_sft.py", "internlm_origin_tp_7B_sft.py"):
        tensor = Config.from_file(FOLDER / name).parallel.tensor
        assert tensor.mode == "mtp" and "sp" not in tensor


def test_the_moe4_counts_are_internlm_v1_with_four_experts():
    """The 7B_MoE4 numbers above from the shapes: per layer Wqkv + out_proj with biases, 4 (or top-2) SwiGLU
    experts of width 256 * ceil(int(4096 * 4/3) / 256) = 5632, the router, two norms; embedding, head, norm.
    InternLM v0.2.1's file of that name has 8 experts."""
    hidden, width, vocab, layers = 4096, 5632, 103168, 32
    attention = 4 * hidden * hidden + 4 * hidden
    expert = 3 * hidden * width
    outside = 2 * vocab * hidden + hidden
    for name, experts in (("internevo_7B_MoE4_sft.py", 4), ("internlm_v021_7B_MoE4_sft.py", 8)):
        rest = experts * hidden + 2 * hidden  # router (experts x hidden) and the two norms
        assert layers * (attention + experts * expert + rest) + outside == PARAMETERS[name]
        assert layers * (attention + 2 * expert + rest) + outside == ACTIVE[name]
