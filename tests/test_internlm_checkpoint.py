"""InternLM/InternEvo checkpoint folders in: each family's whole state, written here the way InternEvo
lays out its model_tp{t}_pp{p}.pt files (cut by hand, independently of pytrain's tensor plan), comes back
bitwise; bad folders fail with a message naming the problem."""

import datetime
import re

import pytest
import torch

from pytrain.checkpoint.internlm import load_internlm_folder, partition_uniform
from pytrain.checkpoint.storage import CheckpointError
from pytrain.model.families import (
    build_baichuan2,
    build_gemma,
    build_internlm,
    build_internlm2,
    build_internlm3,
    build_internlm_moe,
    build_llama2,
    build_mixtral_moe,
    build_qwen2,
    build_qwen2_moe,
    build_qwen3,
    build_qwen3_moe,
)

TINY = dict(
    num_layers=3,  # over 2 stages: 1 + 2, the last stage takes the extra layer
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=96,
    multiple_of=32,
    dtype="torch.float32",
    use_flash_attn=False,
)
# Every family with all its biases on and GQA; InternLM2 also with LayerNorm (norm biases). Qwen3 and Gemma
# with heads x head_dim (4 x 32) wider than hidden; Gemma untied, as InternEvo's Gemma class always saves its
# own output.weight (internlm/model/modeling_gemma.py); Baichuan2 multi-head, as InternEvo's is.
FAMILIES = {
    "internlm": (build_internlm, {}),
    "internlm2": (build_internlm2, dict(norm_type="layernorm")),
    "llama2": (build_llama2, {}),
    "qwen2": (build_qwen2, dict(o_bias=True, mlp_bias=True)),
    "internlm3": (build_internlm3, {}),
    "qwen3": (build_qwen3, dict(head_dim=32)),
    "gemma": (build_gemma, dict(head_dim=32, tie_word_embeddings=False)),
    "baichuan2": (build_baichuan2, dict(num_kv_attention_heads=4)),
}
MOE = dict(num_experts=4, top_k=2, num_layers=4)  # 4 layers: InternEvo's expert file numbering needs pp | layers
MOE_FAMILIES = {
    "internlm-moe-residual": (build_internlm_moe, dict(MOE, moe_use_residual=True)),
    "mixtral": (build_mixtral_moe, MOE),
    "qwen2-moe-shared": (build_qwen2_moe, dict(MOE, num_shared_experts=2)),
    "qwen3-moe": (build_qwen3_moe, dict(MOE, head_dim=32)),
}
FAMILIES.update(MOE_FAMILIES)
# InternEvo's split of each parameter by its last two name components: column-parallel (dim 0),
# row-parallel (weight dim 1, bias on tensor rank 0 only); the rest (norms) whole on every rank.
COLUMN = {"wq", "wk", "wv", "wqkv", "w1", "w3", "head", "output"}
ROW = {"wo", "out_proj", "w2"}
EMBEDDINGS = {"embedding", "tok_embeddings", "embed_tokens"}
# The fused q/k/v weights whose tensor-rank shard is [its q heads; its k heads; its v heads] (InternEvo's MHA
# reads its shard as (three heads head_dim)): InternLM v1's Wqkv, Baichuan2's wqkv; InternLM2's grouped wqkv
# shard is whole kv groups instead, a plain chunk.
PER_PART_QKV = {"baichuan2": "wqkv"}


def build(family: str, **overrides):
    builder, extra = FAMILIES[family]
    return builder(**{**TINY, **extra, **overrides})


def random_state(family: str, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build(family, **overrides)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # norms and biases too: a merge mistake anywhere shows
    return {name: t.clone() for name, t in model.state_dict().items()}


def meta_model(family: str, **overrides):
    with torch.device("meta"):
        return build(family, **overrides)


def internevo_shard(name: str, tensor: torch.Tensor, rank: int, tp: int, vocab_split: bool, per_part_qkv: str):
    """Tensor rank `rank`'s piece of a full tensor as InternEvo saves it (None: that rank has none)."""
    parts = name.split(".")
    module, leaf = parts[-2], parts[-1]
    if module == per_part_qkv:  # each rank's shard is [its q heads; its k heads; its v heads]
        kv_width = (tensor.shape[0] - TINY["hidden_size"]) // 2
        q, k, v = tensor.split([TINY["hidden_size"], kv_width, kv_width])
        return torch.cat([q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank]])
    if module in COLUMN:
        return tensor.chunk(tp, 0)[rank]
    if module in ROW:
        if leaf == "bias":
            return tensor if rank == 0 else None
        return tensor.chunk(tp, 1)[rank]
    if module in EMBEDDINGS:
        return tensor.chunk(tp, 0 if vocab_split else 1)[rank]
    return tensor


def write_internevo_folder(
    folder, state, layers: str, tp: int, pp: int, vocab_split=False, stage_layers=None, per_part_qkv="Wqkv"
):
    """model_tp{t}_pp{p}.pt files: stage-local layer indices, `model.` prefix, per-rank shards; MoE experts
    in model_moe_layer{L}_expert{e}_tp{t}.pt files, one expert each, split like the dense MLP."""
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"{layers}."))
    counts = stage_layers or partition_uniform(num_layers, pp)
    starts = [sum(counts[:p]) for p in range(pp)]
    for name, tensor in state.items():
        if ".moe_layer.experts." in name:
            write_internevo_experts(folder, name, tensor, tp, num_layers // pp, starts)
    for p in range(pp):
        for t in range(tp):
            out = {}
            for name, tensor in state.items():
                parts = name.split(".")
                if ".moe_layer.experts." in name:
                    continue
                if parts[0] == layers:
                    index = int(parts[1])
                    if not starts[p] <= index < starts[p] + counts[p]:
                        continue
                    name = ".".join([layers, str(index - starts[p]), *parts[2:]])
                elif parts[0] in EMBEDDINGS:
                    if p != 0:
                        continue
                elif p != pp - 1:  # final norm and head on the last stage
                    continue
                shard = internevo_shard(name, tensor, t, tp, vocab_split, per_part_qkv)
                if parts[0] in EMBEDDINGS and vocab_split:  # InternLM without embed_split_hidden: flash-attn's
                    name = f"{parts[0]}.word_embeddings.weight"  # vocab-parallel module
                if shard is not None:
                    out[f"model.{name}"] = shard.clone()  # clone: save the piece, not the whole storage
            torch.save(out, folder / f"model_tp{t}_pp{p}.pt")
    # What else a saved step holds, to be ignored:
    torch.save({"num_layers": num_layers}, folder / "model_config.pt")
    (folder / "context.pt").write_bytes(b"")


def write_internevo_experts(folder, name: str, stacked: torch.Tensor, tp: int, stage_size: int, starts: list[int]):
    """One stacked expert weight `<layers>.<g>.<mlp>.moe_layer.experts.<w>` (E, ., .) as InternEvo's per-expert
    files: layer id pipeline rank x (num_layers // pp) + local layer, keys with the stage-local layer."""
    layers, index, rest = name.split(".", 2)
    mlp, weight = rest.split(".moe_layer.experts.")
    stage = max(p for p, start in enumerate(starts) if start <= int(index))
    local = int(index) - starts[stage]
    for expert, full in enumerate(stacked):
        for t in range(tp):
            path = folder / f"model_moe_layer{stage * stage_size + local}_expert{expert}_tp{t}.pt"
            out = torch.load(path, weights_only=True) if path.exists() else {}
            key = f"model.{layers}.{local}.{mlp}.moe_layer.experts.wrapped_experts.{expert}.{weight}.weight"
            out[key] = full.chunk(tp, 1 if weight == "w2" else 0)[t].clone()
            torch.save(out, path)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_layout_merges_back_bitwise(tmp_path, family, tp, pp):
    state = random_state(family)
    model = meta_model(family)
    write_internevo_folder(tmp_path, state, model.names.layers, tp, pp, per_part_qkv=PER_PART_QKV.get(family, "Wqkv"))
    loaded = load_internlm_folder(tmp_path, model)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_gemma_untied_head_into_a_tied_model_is_refused(tmp_path):
    """InternEvo's Gemma saves an output.weight of its own; GEMMA's default ties the head to the embedding,
    which would keep one of the two matrices and drop the other."""
    model = _tp2_pp2(tmp_path, "gemma", embed_split_hidden=False)
    tied = meta_model("gemma", embed_split_hidden=False, tie_word_embeddings=True)
    assert set(load_internlm_folder(tmp_path, model)) == set(tied.state_dict())  # both names, as a tied model's
    with pytest.raises(
        CheckpointError, match=r"output\.weight differs from embed_tokens\.weight.*tie_word_embeddings=False"
    ):
        load_internlm_folder(tmp_path, tied)


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_split_embedding_under_flash_attn_name(tmp_path, tp):
    state = random_state("internlm")
    write_internevo_folder(tmp_path, state, "blocks", tp, 2, vocab_split=True)
    loaded = load_internlm_folder(f"local:{tmp_path}", meta_model("internlm"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_bf16_stays_bf16(tmp_path):
    state = random_state("internlm2", dtype="torch.bfloat16")
    write_internevo_folder(tmp_path, state, "layers", 2, 2)
    loaded = load_internlm_folder(tmp_path, meta_model("internlm2", dtype="torch.bfloat16"))
    assert all(loaded[n].dtype == torch.bfloat16 and torch.equal(loaded[n], t) for n, t in state.items())


def test_partition_uniform_gives_the_last_stages_the_extra_layers():
    assert partition_uniform(32, 4) == [8, 8, 8, 8]
    assert partition_uniform(30, 4) == [7, 7, 8, 8]
    assert partition_uniform(3, 2) == [1, 2]


def _tp2_pp2(tmp_path, family="llama2", **overrides):
    model = meta_model(family, **overrides)
    write_internevo_folder(tmp_path, random_state(family, **overrides), model.names.layers, 2, 2)
    return model


def test_missing_file_of_the_layout(tmp_path):
    model = _tp2_pp2(tmp_path)
    (tmp_path / "model_tp1_pp1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete .* 2 tensor x 2 pipeline.*model_tp1_pp1\.pt missing"):
        load_internlm_folder(tmp_path, model)


def test_no_model_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no InternLM model files"):
        load_internlm_folder(tmp_path, meta_model("llama2"))
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_internlm_folder(tmp_path / "absent", meta_model("llama2"))


def test_layer_count_other_than_the_config(tmp_path):
    _tp2_pp2(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"the checkpoint has 3 layers \(1 \+ 2 over 2 pipeline stages\), the config 4"
    ):
        load_internlm_folder(tmp_path, meta_model("llama2", num_layers=4))


def test_stage_split_other_than_partition_uniform(tmp_path):
    model = meta_model("qwen2")
    write_internevo_folder(tmp_path, random_state("qwen2"), "layers", 1, 2, stage_layers=[2, 1])
    with pytest.raises(CheckpointError, match=r"stages hold 2 \+ 1 layers.*partition_uniform.* as 1 \+ 2"):
        load_internlm_folder(tmp_path, model)


def test_non_tensor_value_names_the_file_and_key(tmp_path):
    model = _tp2_pp2(tmp_path)
    state = torch.load(tmp_path / "model_tp1_pp0.pt", weights_only=True)
    torch.save({**state, "step": 7}, tmp_path / "model_tp1_pp0.pt")
    with pytest.raises(
        CheckpointError, match=r"model_tp1_pp0\.pt is not a model state dict: non-tensor .*'step' \(int\)"
    ):
        load_internlm_folder(tmp_path, model)
    torch.save([torch.zeros(2)], tmp_path / "model_tp1_pp0.pt")
    with pytest.raises(CheckpointError, match=r"model_tp1_pp0\.pt holds a list"):
        load_internlm_folder(tmp_path, model)


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    model = _tp2_pp2(tmp_path)
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "model_tp0_pp1.pt")
    with pytest.raises(CheckpointError, match=r"model_tp0_pp1\.pt cannot be read as tensors only"):
        load_internlm_folder(tmp_path, model)


@pytest.mark.parametrize(
    "name, why",
    [
        ("model_tp0_wp0_pp0.pt", "ISP"),
        ("model_wp1_pp0.pt", "ISP"),
        ("model_moe_layer0_expert3_wp0.pt", "ISP"),
        ("model_tp0_pp0_dp1.pt", "FSDP"),
    ],
)
def test_unsupported_files_are_refused(tmp_path, name, why):
    model = _tp2_pp2(tmp_path)
    torch.save({}, tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"{why} .*not supported.*{name}"):
        load_internlm_folder(tmp_path, model)


def test_missing_unexpected_and_misshapen_parameters_listed_together(tmp_path):
    model = _tp2_pp2(tmp_path, "internlm")
    state = torch.load(tmp_path / "model_tp0_pp1.pt", weights_only=True)
    del state["model.blocks.1.mixer.out_proj.bias"]  # rank 0's row bias, the only copy
    state["model.blocks.0.mixer.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, tmp_path / "model_tp0_pp1.pt")
    with pytest.raises(CheckpointError) as raised:
        load_internlm_folder(tmp_path, model)
    message = str(raised.value)
    assert "missing from the checkpoint: blocks.2.mixer.out_proj.bias" in message
    assert "not in this INTERNLM model: blocks.1.mixer.rotary_emb.inv_freq" in message
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.w1\.weight: \(96, 64\) .*1/2 shard \(128, 64\)"):
        load_internlm_folder(tmp_path, meta_model("internlm", multiple_of=128))


def test_a_shard_missing_on_one_tensor_rank(tmp_path):
    model = _tp2_pp2(tmp_path, "internlm2")
    state = torch.load(tmp_path / "model_tp1_pp0.pt", weights_only=True)
    del state["model.layers.0.attention.wqkv.weight"]
    torch.save(state, tmp_path / "model_tp1_pp0.pt")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wqkv\.weight: missing from model_tp1_pp0\.pt"):
        load_internlm_folder(tmp_path, model)


def test_a_pipeline_stage_is_refused():
    model = meta_model("llama2")
    del model.output
    with pytest.raises(CheckpointError, match=r"needs the whole model"):
        load_internlm_folder("/nonexistent", model)


def test_moe_experts_whole_in_tp0_files_as_with_expert_no_tp(tmp_path):
    family = "mixtral"
    state, model = random_state(family), meta_model(family)
    write_internevo_folder(tmp_path, state, model.names.layers, 2, 2)
    for path in tmp_path.glob("model_moe_layer*_expert*_tp1.pt"):
        path.unlink()  # parallel.expert.no_tp: each expert whole, in the _tp0 file only
    for path in tmp_path.glob("model_moe_layer*_expert*_tp0.pt"):
        layer, expert = (int(g) for g in re.match(r"model_moe_layer(\d+)_expert(\d+)", path.name).groups())
        local = layer % 2  # 2 layers per stage
        prefix = f"model.blocks.{local}.mlp.moe_layer.experts.wrapped_experts.{expert}"
        full = {w: state[f"blocks.{layer}.mlp.moe_layer.experts.{w}"][expert] for w in ("w1", "w2", "w3")}
        torch.save({f"{prefix}.{w}.weight": t.clone() for w, t in full.items()}, path)
    loaded = load_internlm_folder(tmp_path, model)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_moe_expert_file_problems_are_named(tmp_path):
    family = "qwen2-moe-shared"
    model = meta_model(family)
    write_internevo_folder(tmp_path, random_state(family), model.names.layers, 2, 2)
    (tmp_path / "model_moe_layer3_expert1_tp0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_moe_layer3_expert1_tp0\.pt is missing"):
        load_internlm_folder(tmp_path, model)
    with pytest.raises(CheckpointError, match=r"MoE expert files .* but this model has no experts"):
        load_internlm_folder(tmp_path, meta_model(family, num_experts=1))


def test_moe_expert_files_of_an_uneven_pipeline_split_are_refused(tmp_path):
    family = "mixtral"
    # 6 layers over 4 stages: 1 + 1 + 2 + 2; InternEvo names stage 2's second layer 2 x 1 + 1 = 3, as stage 3's first
    overrides = dict(num_layers=6)
    state, model = random_state(family, **overrides), meta_model(family, **overrides)
    write_internevo_folder(tmp_path, state, model.names.layers, 1, 4)
    with pytest.raises(CheckpointError, match=r"two layers' expert files share a name"):
        load_internlm_folder(tmp_path, model)
