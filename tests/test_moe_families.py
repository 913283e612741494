"""The mixture-of-experts families: InternEvo's names, Hugging Face weights in and out (transformers' own
Mixtral and Qwen2-MoE as the oracle: fp32 logits within 1e-5, the same loss), a short training run through
`python -m pytrain.train`, and data / pipeline parallelism equal to one process (tests/test_parallel.py's
harness)."""

import json
import re
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers  # the oracle (in the test extra): a missing install fails, never skips
from conftest import ROOT
from rank_results import RankResults
from safetensors.torch import save_file
from test_parallel import TOLERANCE, batches, config, train

from pytrain.checkpoint.hf import (
    HFReader,
    from_hf_state,
    hf_config,
    hf_rules,
    read_stacked_rows,
    save_hf_folder,
    to_hf_state,
)
from pytrain.model.families import build_internlm_moe, build_mixtral_moe, build_qwen2_moe, build_qwen3_moe
from pytrain.model.moe import MoE, active_parameters
from pytrain.parallel import gpc
from pytrain.parallel.model_part import parallelize

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=96,
    multiple_of=32,
    dtype="torch.float32",
    use_flash_attn=False,
    num_experts=4,
    top_k=2,
)
DROPLESS = dict(moe_type="Dropless")
# (builder, extra fields, HF class)
VARIANTS = {
    "mixtral": (build_mixtral_moe, dict(qkv_bias=False, **DROPLESS), "MixtralForCausalLM"),
    "mixtral-gshard-no-drops": (
        build_mixtral_moe,
        dict(qkv_bias=False, top_k=3, moe_layer_kwargs=dict(drop_tokens=False)),
        "MixtralForCausalLM",
    ),
    "internlm-moe-nobias": (build_internlm_moe, dict(no_bias=True, **DROPLESS), "MixtralForCausalLM"),
    "qwen2-moe": (
        build_qwen2_moe,
        dict(num_shared_experts=2, moe_layer_kwargs=dict(normalize_expert_weights=False), **DROPLESS),
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-moe-normalized": (build_qwen2_moe, dict(num_shared_experts=1, **DROPLESS), "Qwen2MoeForCausalLM"),
    "qwen3-moe": (build_qwen3_moe, dict(head_dim=24), "Qwen3MoeForCausalLM"),  # Dropless, norm_topk_prob
}


def random_model(name: str, seed: int = 0):
    builder, extra, _ = VARIANTS[name]
    torch.manual_seed(seed)
    model = builder(**{**TINY, **extra})
    with torch.no_grad():  # norms, biases and gates too, so that a mapping mistake anywhere shows
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def loss_of(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_parameter_names_follow_internevo():
    names = {key: set(random_model(key).state_dict()) for key in ("mixtral", "internlm-moe-nobias", "qwen2-moe")}
    assert {
        "embedding.weight",
        "blocks.0.mixer.wq.weight",
        "blocks.0.mlp.moe_layer.gate.wg.weight",
        "blocks.1.mlp.moe_layer.experts.w1",
        "blocks.1.mlp.moe_layer.experts.w3",
        "blocks.1.mlp.moe_layer.experts.w2",
        "blocks.0.norm1.weight",
        "head.weight",
    } <= names["mixtral"]
    assert {"blocks.0.mixer.Wqkv.weight", "blocks.0.mlp.moe_layer.experts.w2"} <= names["internlm-moe-nobias"]
    assert {
        "embed_tokens.weight",
        "layers.0.feed_forward.moe_layer.gate.wg.weight",
        "layers.0.feed_forward.moe_layer.experts.w1",
        "layers.0.feed_forward.residual_mlp.w1.weight",
        "layers.0.feed_forward.coefficient.weight",
        "output.weight",
    } <= names["qwen2-moe"]
    model = random_model("qwen2-moe")
    experts = model.layers["0"].feed_forward.moe_layer.experts
    # 4 experts of width 32 * ceil(int(64 * 4) / 32) = 256 (mlp_ratio 4, QWEN2MOE's default is 5/7: given here)
    assert experts.w1.shape == (4, experts.w1.shape[1], 64) and experts.w2.shape == (4, 64, experts.w1.shape[1])
    # the shared expert is num_shared_experts times as wide: int(int(64 * 5/7) * 2) = 90 -> 96
    assert model.layers["0"].feed_forward.residual_mlp.w1.weight.shape == (96, 64)


def test_internlm_moe_residual_mlp_and_dense_fallback():
    residual = build_internlm_moe(**{**TINY, "moe_use_residual": True})
    mlp = residual.blocks["0"].mlp
    assert isinstance(mlp, MoE) and mlp.shared_kind == "residual"
    assert mlp.coefficient.weight.shape == (2, 64) and mlp.coefficient.bias.shape == (2,)
    assert mlp.residual_mlp.w1.weight.shape == mlp.moe_layer.experts.w1.shape[1:]  # as wide as one expert
    dense = build_internlm_moe(**{**TINY, "num_experts": 1})  # InternEvo: num_experts <= 1 is the dense model
    assert not any(isinstance(m, MoE) for m in dense.modules()) and "blocks.0.mlp.w1.weight" in dense.state_dict()


def test_initialisation_scales_every_residual_stream_writer():
    """The experts' and the shared expert's down projections start as the dense w2 does: std 0.02 / sqrt(2 L)."""
    with torch.device("meta"):
        model = build_qwen2_moe(**{**TINY, "num_layers": 8, "num_shared_experts": 1, **DROPLESS})
    part = parallelize(model, device=torch.device("cpu"))
    std = {info.name: param.std().item() for param, info in part.infos() if param.dim() >= 2}
    layer = "layers.3"
    for name in ("feed_forward.moe_layer.experts.w2", "feed_forward.residual_mlp.w2.weight", "attention.wo.weight"):
        assert std[f"{layer}.{name}"] == pytest.approx(0.02 / 4, rel=0.1), name  # sqrt(2 * 8 layers)
    for name in ("feed_forward.moe_layer.experts.w1", "feed_forward.moe_layer.experts.w3", "attention.wq.weight"):
        assert std[f"{layer}.{name}"] == pytest.approx(0.02, rel=0.1), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_folder_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = random_model(name)
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    keys = set(HFReader(tmp_path).weight_map)
    if VARIANTS[name][2] == "MixtralForCausalLM":
        assert {
            "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.gate.weight",
        } <= keys
    elif VARIANTS[name][2] == "Qwen2MoeForCausalLM":
        assert {
            "model.layers.1.mlp.experts.3.gate_proj.weight",
            "model.layers.0.mlp.shared_expert.down_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
        } <= keys
    else:
        assert {"model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.k_norm.weight"} <= keys
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(theirs).__name__ == VARIANTS[name][2] == hf_config(model)["architectures"][0]
    assert theirs.num_parameters() == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_logits, their_logits = model(ids), theirs(ids).logits
    assert (ours_logits - their_logits).abs().max() <= 1e-5
    torch.testing.assert_close(loss_of(ours_logits, ids), loss_of(their_logits, ids), rtol=1e-6, atol=1e-6)


def their_model(model, seed=5):
    config_dict = hf_config(model, "float32")
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    torch.manual_seed(seed)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.2)
    return theirs.eval()


@pytest.mark.parametrize("layout", ["save_pretrained", "stacked"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_transformers_weights_import_with_the_same_logits_and_round_trip_bitwise(name, layout, tmp_path):
    """From save_pretrained's per-expert files, and from transformers 5's in-memory stacked layout saved as is."""
    model = random_model(name)
    theirs = their_model(model)
    if layout == "save_pretrained":
        theirs.save_pretrained(tmp_path)
    else:
        state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
        save_file(state, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps(theirs.config.to_dict()))
    reader = HFReader(tmp_path)
    names = {h for rule in hf_rules(model) for h in rule.hf_names}
    model.load_state_dict(from_hf_state(model, {k: reader.get(k) for k in names}))
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() <= 1e-5
    back = to_hf_state(model, model.state_dict())
    again = from_hf_state(model, back)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    # a rank holding experts [2, 4) reads only those
    rule = next(r for r in hf_rules(model) if r.name.endswith("moe_layer.experts.w1"))
    assert torch.equal(read_stacked_rows(reader, rule, [(2, 2)]), model.state_dict()[rule.name][2:4])


def test_convert_load_hf_into_reads_a_ranks_experts(tmp_path):
    """convert.load_hf_into fills each parameter from its rule; a stacked expert weight cut along dim 0 (as
    expert parallelism will) gets only its experts."""
    from pytrain.checkpoint.convert import load_hf_into
    from pytrain.parallel.model_part import ModelPart, ParamInfo
    from pytrain.parallel.shard_spec import ShardSpec

    model = random_model("mixtral")
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    target = random_model("mixtral", seed=9)
    name = "blocks.1.mlp.moe_layer.experts.w2"
    with torch.no_grad():
        target.blocks["1"].mlp.moe_layer.experts.w2 = torch.nn.Parameter(
            torch.zeros(2, 64, target.blocks["1"].mlp.moe_layer.experts.w2.shape[2])
        )
    infos = {
        f"stages.0.{n}": ParamInfo(
            n, ShardSpec.split(model.state_dict()[n].shape, 0, 1, 2) if n == name else ShardSpec.whole(p.shape)
        )
        for n, p in target.named_parameters()
    }
    part = ModelPart([target], infos)
    load_hf_into(part, model, tmp_path)
    assert torch.equal(target.blocks["1"].mlp.moe_layer.experts.w2, model.state_dict()[name][2:4])
    assert torch.equal(
        target.blocks["0"].mlp.moe_layer.experts.w1, model.state_dict()["blocks.0.mlp.moe_layer.experts.w1"]
    )


def test_what_hugging_face_cannot_express_is_refused():
    with pytest.raises(
        ValueError, match=r"INTERNLM_MoE with attention biases has no Hugging Face class .* no_bias=True"
    ):
        hf_config(build_internlm_moe(**TINY))
    with pytest.raises(ValueError, match=r"INTERNLM_MoE with a residual MLP .* has no Hugging Face class"):
        hf_config(build_internlm_moe(**TINY, no_bias=True, moe_use_residual=True))
    with pytest.raises(ValueError, match=r"Qwen2MoeForCausalLM always has its shared expert"):
        hf_config(build_qwen2_moe(**TINY))
    with pytest.raises(ValueError, match=r"MIXTRALMOE with num_experts <= 1 is dense"):
        hf_config(build_mixtral_moe(**{**TINY, "num_experts": 1, "qkv_bias": False}))


def test_active_parameters_count_top_k_experts():
    model = random_model("qwen2-moe")
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.moe_layer.experts.parameters())
    assert active_parameters(model) == sum(p.numel() for p in model.parameters()) - experts // 2  # 2 of 4


@pytest.mark.slow  # ~10 s; the fast set runs configs/tiny_moe.py through the same command in bench/test_moe_train_bench.py
def test_tiny_moe_config_trains_on_the_bundled_corpus(tmp_path):
    """configs/tiny_moe.py through the real command line: the loss falls and moe_loss is in the step line."""
    command = [
        "python3",
        "-m",
        "pytrain.train",
        "--config",
        str(ROOT / "configs" / "tiny_moe.py"),
        "--set",
        f"monitor.run_folder={tmp_path}",
        "--set",
        "data.total_steps=12",
        "--set",
        "monitor.log_every=1",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = re.findall(r"step (\d+)/12 \| loss ([\d.]+) \| moe_loss ([\d.]+) \|", out.stdout)
    assert len(steps) == 12, out.stdout
    losses = [float(loss) for _, loss, _ in steps]
    moe_losses = [float(m) for _, _, m in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    # 4 MoE layers, each about 1 (E * sum_e f_e p_e is 1 when balanced, more when not)
    assert all(3.0 < m < 8.0 for m in moe_losses), moe_losses
    metrics = [json.loads(line) for line in next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()]
    assert [round(m["moe_loss"], 4) for m in metrics if "moe_loss" in m] == moe_losses


# dp2 and pp2 of a tiny MoE model against one process, with tests/test_parallel.py's config, batches and train:
# GShard routing with capacity drops (each micro-batch is routed whole on one rank, so the drops are the same).
MOE_MODEL = dict(
    num_experts=4,
    top_k=2,
    moe_type="GShard",
    moe_layer_kwargs=dict(capacity_factor=0.75, min_capacity=2),
)
MOE_LAYOUTS = {
    "dp2-zero1": dict(zero1=-1, expert=dict(size=1)),
    "pp2": dict(pipeline=2, expert=dict(size=1)),
    "pp2-interleaved": dict(pipeline=dict(size=2, interleaved_overlap=True), expert=dict(size=1)),
}
MOE_FAMILY = "MIXTRALMOE"


def moe_loss_after(model, cfg):
    """A forward-only pass over the first batch: its moe_loss as the step monitor reports it (all stages)."""
    from pytrain.initialize import initialize_trainer
    from pytrain.monitor import StepMonitor

    trainer, *_ = initialize_trainer(model, optimizer=None, config=cfg)
    trainer.execute_schedule(batches(gpc.data_parallel_rank, gpc.data_parallel_size)[0], forward_only=True)
    monitor = StepMonitor(
        gpc.run_folder,
        1,
        1,
        1.0,
        1.0,
        gpc.device,
        tensorboard=False,
        is_main_rank=False,
        group=gpc.data_parallel_group,
        pipeline_group=gpc.pipeline_parallel_group,
    )
    return monitor.end_step(1, torch.zeros(()), 0.0, 0.0, True, moe_loss=trainer.moe_loss())["moe_loss"]


def moe_worker(rank, world, init_method, names, run_folder, results):
    torch.set_num_threads(1)
    for name in names:  # one process group each: train() launches the layout on it
        dist.init_process_group("gloo", init_method=f"{init_method}-{name}", rank=rank, world_size=world)
        try:
            model_fields = dict(MOE_MODEL, num_chunks=2) if name == "pp2-interleaved" else MOE_MODEL
            cfg = config(MOE_LAYOUTS[name], model_fields, {}, world, run_folder, family=MOE_FAMILY)
            history, params, _, model = train(cfg, rank, world)
            results[(name, rank)] = (history, params, moe_loss_after(model, cfg))
            dist.barrier()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """(the single-process run's history, parameters and moe_loss; {(layout, rank): the same}), every layout in
    one launch of two processes."""
    folder = tmp_path_factory.mktemp("moe_layouts")
    cfg = config({}, MOE_MODEL, {}, 1, folder, family=MOE_FAMILY)
    try:
        want_history, want_params, _, model = train(cfg, 0, 1)
        want = (want_history, want_params, moe_loss_after(model, cfg))
    finally:
        dist.destroy_process_group()
        gpc.config = None
    with RankResults() as results:
        init_method = f"file://{folder / 'rendezvous'}"
        mp.spawn(moe_worker, args=(2, init_method, list(MOE_LAYOUTS), folder, results), nprocs=2, join=True)
        return want, dict(results)


@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_moe_layouts_match_one_process(name, moe_runs):
    (want_history, want_params, want_moe_loss), results = moe_runs
    assert 3.0 < want_moe_loss < 8.0  # 4 MoE layers (test_parallel's MODEL), each about 1
    for rank in range(2):
        history, params, moe_loss = results[(name, rank)]
        assert all(success for _, _, success, _ in history)
        torch.testing.assert_close([h[0] for h in history], [h[0] for h in want_history], **TOLERANCE)
        torch.testing.assert_close([h[1] for h in history], [h[1] for h in want_history], **TOLERANCE)
        for full_name, got in params.items():
            torch.testing.assert_close(
                got, want_params[full_name], **TOLERANCE, msg=lambda m: f"{name} {full_name}: {m}"
            )
        torch.testing.assert_close(moe_loss, want_moe_loss, rtol=1e-5, atol=1e-6)


class ScaledOptimizer:
    """What the Trainer needs of HybridZeroOptimizer here: a loss scale applied in backward."""

    def __init__(self, loss_scale):
        self.loss_scale = loss_scale

    def backward(self, loss, last=True):
        (loss * self.loss_scale).backward()


def test_trainer_weights_the_aux_loss_by_coeff_loss_scale_and_micro_batches():
    """aux_loss_weight = moe_loss_coeff x loss scale / micro-batches, so the unscaled gradient is the same
    at any fp16 loss scale; moe_loss() is the layers' sum averaged over the micro-batches."""
    from pytrain.model import LMLoss
    from pytrain.parallel.model_part import ModelPart
    from pytrain.parallel.schedule import NonPipelineScheduler
    from pytrain.train.trainer import Trainer

    ids = torch.randint(0, TINY["vocab_size"], (3, 2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:]}
    grads, moe_losses = [], []
    for scale in (1.0, 1024.0):
        model = ModelPart([random_model("mixtral").train()])
        trainer = Trainer(
            model, ScaledOptimizer(scale), NonPipelineScheduler(), LMLoss(), torch.device("cpu"), moe_loss_coeff=0.5
        )
        trainer.execute_schedule(dict(batch))
        assert all(layer.aux_loss_weight == 0.5 * scale / 3 for layer in trainer.moe_layers)
        grads.append({n: p.grad / scale for n, p in model.named_parameters()})
        moe_losses.append(trainer.moe_loss())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    # the metric: per layer the mean of its 3 micro-batches' aux losses, summed over the 2 layers
    model = random_model("mixtral").train()
    want = 0.0
    for micro in range(3):
        model(batch["input_ids"][micro])
        want += sum(m.moe_layer.aux_loss for m in model.modules() if isinstance(m, MoE)) / 3
    torch.testing.assert_close(moe_losses[0], want)
    torch.testing.assert_close(moe_losses[1], want)
