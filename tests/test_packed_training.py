"""Packed rows through every schedule: documents packed back to back (cu_seqlens, positions restarting,
-100 at each document's end) train exactly as the same documents each alone in its own padded row, in one
process and under dp2, tp2 (mtp, msp and isp, with weight parallelism) and pp2 (1F1B and interleaved); and the step loss is the mean
over the global batch's non-ignored labels, not a mean of micro-batch means."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults

from pytrain.config import Config
from pytrain.data.loader import flat_batch, unflat_batch
from pytrain.initialize import initialize_trainer
from pytrain.initialize.launch import launch
from pytrain.parallel import gpc
from pytrain.train import initialize_model, initialize_optimizer

SEQ_LEN, MICRO_BSZ, VOCAB = 16, 2, 128
MODEL = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=VOCAB,
    multiple_of=32,
    dtype="torch.float32",
)
# Eight documents of lengths <= SEQ_LEN filling 4 packs of MICRO_BSZ * SEQ_LEN = 32 tokens (some cross
# the boundary between a pack's two rows, which attention must not care about).
LENGTHS = [[5, 11, 16], [16, 9, 7], [3, 13, 16], [32]]


def documents():
    generator = torch.Generator().manual_seed(7)
    docs = []
    for pack in LENGTHS:
        for length in pack:
            for start in range(0, length, SEQ_LEN):  # a 32-token sample is cut into two of 16, as the packer does
                docs.append(torch.randint(1, VOCAB, (min(SEQ_LEN, length - start),), generator=generator))
    return docs


def packed_batches(docs, data_parallel: int, rank: int):
    """The documents packed as the loader packs them: one micro-batch per pack, rank r's share of them."""
    packs = {k: [] for k in ("input_ids", "labels", "positions", "type_ids", "cu_seqlens")}
    it = iter(docs)
    for pack in LENGTHS:
        pieces = [next(it) for length in pack for _ in range(0, length, SEQ_LEN)]
        tokens = torch.cat(pieces).numpy()
        labels = np.concatenate([np.append(p[1:].numpy(), -100) for p in pieces])
        packs["input_ids"].append(tokens)
        packs["labels"].append(labels)
        packs["positions"].append(np.concatenate([np.arange(len(p)) for p in pieces]))
        packs["type_ids"].append(np.zeros(len(tokens), dtype=np.int64))
        packs["cu_seqlens"].append(np.cumsum([0] + [len(p) for p in pieces]))
    per_rank = len(LENGTHS) // data_parallel
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    batch_packs = {k: np.stack(v[mine]) if k != "cu_seqlens" else v[mine] for k, v in packs.items()}
    return unflat_batch(*flat_batch(batch_packs, SEQ_LEN))  # the loader's own batch layout


def alone_batches(docs, data_parallel: int, rank: int):
    """Each document alone in its own padded row, MICRO_BSZ rows per micro-batch."""
    rows = len(docs) + (-len(docs)) % (MICRO_BSZ * data_parallel)
    input_ids = torch.zeros(rows, SEQ_LEN, dtype=torch.int64)
    labels = torch.full((rows, SEQ_LEN), -100, dtype=torch.int64)
    for row, doc in enumerate(docs):
        input_ids[row, : len(doc)] = doc
        labels[row, : len(doc) - 1] = doc[1:]
    per_rank = rows // data_parallel
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    shape = (-1, MICRO_BSZ, SEQ_LEN)
    return {"input_ids": input_ids[mine].view(shape), "labels": labels[mine].view(shape)}


def step(parallel: dict, micro_num: int, batch: dict, world: int, rank: int, run_folder):
    model = dict(MODEL, **parallel.pop("model", {}))
    cfg = Config.from_dict(
        dict(
            model=model,
            parallel=parallel,
            data=dict(seq_len=SEQ_LEN, micro_bsz=MICRO_BSZ, micro_num=micro_num),
            hybrid_zero_optimizer=dict(overlap_sync_grad=False, clip_grad_norm=0.0),
            adam=dict(lr=1e-2, adam_eps=1e-6),  # damps Adam's sign-of-gradient step where a gradient is ~0
            monitor=dict(run_folder=str(run_folder), tensorboard=dict(enable=False)),
        )
    )
    launch(cfg, rank=rank, world_size=world, local_rank=0, init_method=None, backend="gloo", seed=3)
    part = initialize_model()
    optimizer, beta2, lr = initialize_optimizer(part)
    trainer, *_ = initialize_trainer(part, optimizer, lr_scheduler=lr, beta2_scheduler=beta2)
    trainer.zero_grad()
    _, loss = trainer.execute_schedule(batch)
    _, norm = trainer.step()
    dist.all_reduce(loss, group=gpc.data_parallel_group)
    params = {name: p.detach().clone() for name, p in part.full_state_names().items()}
    return loss.item() / gpc.data_parallel_size, norm, params


LAYOUTS = {
    "one": (1, {}),
    "dp2": (2, dict(zero1=1)),
    "tp2": (2, dict(tensor=2)),
    "tp2-msp": (2, dict(tensor=dict(size=2, mode="msp"))),
    # isp: each rank holds half of every row, so documents straddle the ranks (the all-to-all must keep them apart)
    "isp2": (2, dict(tensor=dict(size=2, mode="isp"))),
    "isp2-weight2": (2, dict(tensor=dict(size=2, mode="isp"), weight=2)),
    "pp2": (2, dict(pipeline=2)),
    "pp2-interleaved": (2, dict(pipeline=2, model=dict(num_chunks=2))),
}


def worker(rank, world, init_method, names, run_folder, results):
    """Each layout's step on the packed rows, then on the documents alone, each in a process group of its own."""
    torch.set_num_threads(1)
    for name in names:
        _, parallel = LAYOUTS[name]
        data_parallel = world // (2 if ("tensor" in parallel or "pipeline" in parallel) else 1)
        docs = documents()
        for kind, batch in (
            ("packed", packed_batches(docs, data_parallel, rank // (world // data_parallel))),
            ("alone", alone_batches(docs, data_parallel, rank // (world // data_parallel))),
        ):
            if world > 1:
                dist.init_process_group("gloo", init_method=f"{init_method}-{name}-{kind}", rank=rank, world_size=world)
            try:
                micro_num = batch["input_ids"].shape[0]
                results[(name, rank, kind)] = step(dict(parallel), micro_num, batch, world, rank, run_folder)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()


@pytest.fixture(scope="module")
def layout_steps(tmp_path_factory):
    """{(layout, rank, "packed" | "alone"): (loss, grad norm, parameters)}: one process here, two launched."""
    folder = tmp_path_factory.mktemp("packed_layouts")
    with RankResults() as results:
        threads = torch.get_num_threads()
        try:  # the one-process layout in this process
            worker(0, 1, None, [name for name, (size, _) in LAYOUTS.items() if size == 1], folder, results)
        finally:
            torch.set_num_threads(threads)
            gpc.config = None
        names = [name for name, (size, _) in LAYOUTS.items() if size == 2]
        init_method = f"file://{folder / 'rendezvous'}"
        mp.spawn(worker, args=(2, init_method, names, folder, results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.slow  # about 15 s: 2 processes; the packed path's equality per document is also tested in test_flash_attn
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_documents_train_as_each_document_alone(name, layout_steps):
    world, _ = LAYOUTS[name]
    for rank in range(world):
        packed_loss, packed_norm, packed_params = layout_steps[(name, rank, "packed")]
        alone_loss, alone_norm, alone_params = layout_steps[(name, rank, "alone")]
        assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
        assert packed_norm == pytest.approx(alone_norm, rel=1e-4)
        for key, value in packed_params.items():
            torch.testing.assert_close(value, alone_params[key], rtol=1e-4, atol=1e-6, msg=key)


def test_the_loss_is_the_global_token_mean_not_a_mean_of_micro_batch_means(fresh_context, tmp_path):
    """Micro-batch A has 2 labels, B has 30: as two micro-batches, or as one holding both rows, the loss and
    the gradients are the same: the mean over all 32 labels."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 1, 2 * SEQ_LEN), generator=generator).view(2, 2, SEQ_LEN)
    labels = torch.randint(0, VOCAB, (2, 2, SEQ_LEN), generator=generator)
    labels[0, :, 1:] = -100  # A: one label in each of its rows
    labels[1, 0, :1] = -100  # B: one ignored
    two = {"input_ids": input_ids, "labels": labels}
    one = {"input_ids": input_ids.view(1, 4, SEQ_LEN), "labels": labels.view(1, 4, SEQ_LEN)}
    loss_two, norm_two, params_two = step({}, 2, two, 1, 0, tmp_path)
    dist.destroy_process_group()
    loss_one, norm_one, params_one = step({}, 1, one, 1, 0, tmp_path)
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    assert norm_two == pytest.approx(norm_one, rel=1e-5)
    for key, value in params_two.items():
        torch.testing.assert_close(value, params_one[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_a_packed_micro_batch_reads_nothing_back_to_the_host(use_flash_attn, forbid_host_reads):
    """Once the micro-batch's boundaries are a PackedSequences (the schedules build one per micro-batch from the
    host's cu_seqlens), the forward through every layer and the loss (labels checked on the host by the
    Trainer) make no .tolist() / .item(): on a GPU, no synchronization per layer or per micro-batch."""
    from pytrain.kernels import PackedSequences
    from pytrain.model import LMLoss
    from pytrain.model.families import build_llama2

    model = build_llama2(**dict(MODEL, use_flash_attn=use_flash_attn))
    batch = packed_batches(documents(), 1, 0)
    packed = PackedSequences(batch["cu_seqlens"][0].tolist())
    criterion = LMLoss(labels_checked=True)
    with forbid_host_reads():
        logits = model(batch["input_ids"][0], cu_seqlens=packed)
        loss = criterion(logits, batch["labels"][0])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


class BackwardOnly:
    """The optimizer's part in a schedule: the backward (with its loss scale 1)."""

    def backward(self, loss, last=False):
        loss.backward()


@pytest.mark.parametrize("packed", [False, True], ids=["positions", "cu_seqlens"])
def test_a_step_reads_back_once_per_micro_batch_on_the_host_whatever_the_depth(packed):
    """A step's only host reads are one per micro-batch of the loader's host tensors (cu_seqlens or positions,
    checked once there: no GPU synchronization); none per layer, and no op sized by its input's values."""
    from host_syncs import count_host_reads, no_value_sized_ops

    from pytrain.kernels import CheckedPositions, PackedSequences
    from pytrain.model import LMLoss
    from pytrain.model.families import build_internlm
    from pytrain.parallel.schedule import NonPipelineScheduler

    docs = documents()
    batch = packed_batches(docs, 1, 0)
    if not packed:
        batch = {key: batch[key] for key in ("input_ids", "labels", "positions")}
    micro_num = batch["input_ids"].shape[0]
    for num_layers in (1, 3):
        model = build_internlm(**dict(MODEL, num_layers=num_layers, dtype=torch.float32))
        given = []  # what the schedule hands the model: checked on the host, so a GPU model reads nothing back
        model.register_forward_pre_hook(lambda _, args, kwargs: given.extend(kwargs.values()), with_kwargs=True)
        with count_host_reads(callers=True) as reads, no_value_sized_ops():
            NonPipelineScheduler().forward_backward_step(model, batch, LMLoss(labels_checked=True), BackwardOnly())
        # scale_saved_grad_ reads the loss's incoming gradient on the CPU only (to skip a multiply by 1)
        on_a_gpu = [read for read in reads if read != "item in scale_saved_grad_"]
        checked_once = "tolist in micro_batch_inputs" if packed else "tolist in _table_rows"  # cu_seqlens, positions
        assert on_a_gpu == [checked_once] * micro_num, (num_layers, reads)
        assert {type(value) for value in given} == {PackedSequences if packed else CheckedPositions}
