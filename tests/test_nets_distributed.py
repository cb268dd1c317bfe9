"""Two real CPU processes (gloo): the memory-bank codebook starts from rank 0's random words, is then
drawn from the global first batch, stays identical across ranks that see different data, and equals a
single-process reference over all ranks' data; the network trains under DDP without
find_unused_parameters."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 4


def _worker(rank: int, world: int, tmp: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from vwe.formats.config import load_config
        from vwe.nets.cam import build_model, param_groups
        from vwe.nets.words import MemoryBankCodebook, encode_words

        # 1. the codebook module alone, with features that differ per rank in content and shape, and a
        #    different random start per rank: rank 0's random start wins, then rank 0's draw over the
        #    global batch, then EMA steps with sums and counts reduced over ranks
        torch.manual_seed(50 + rank)
        g = torch.Generator().manual_seed(100 + rank)
        bank = MemoryBankCodebook(6, 4, rho=0.2)
        random_start = bank.weight.clone()
        bank.sync_initial()
        synced_start = bank.weight.clone()
        batches = [torch.randn(rank + 1, 4, 3, 2 + rank, generator=g) + rank for _ in range(STEPS)]
        rng = torch.get_rng_state()
        bank.initialise_from(batches[0])
        books = [bank.weight.clone()]
        for feats in batches[1:]:
            assignment, _, _ = encode_words(feats, bank.weight)
            bank.update(feats, assignment.argmax(1))
            books.append(bank.weight.clone())

        # 2. the whole network in memory-bank mode under DDP, different images per rank, and a different
        #    random codebook per rank (broadcast_buffers=False: DDP does not sync buffers)
        torch.manual_seed(rank)
        cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", "model.norm=batch",
                                 "model.codebook=memory", "model.num_words=8", "model.memory_rho=0.1",
                                 "model.detach_stage2=false", "model.channels_last=false"]).model
        model = build_model(cfg).train()
        net_random_start = model.codebook.weight.clone()
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.SGD(param_groups(ddp, 0.01, 10.0, 1e-4), lr=0.01, momentum=0.9)
        data = torch.Generator().manual_seed(7 + rank)
        step1 = {}
        for step in range(3):
            x = torch.randn(2, 3, 64, 64, generator=data)
            y = (torch.rand(2, 20, generator=data) > 0.7).float()
            if step == 0:
                with torch.no_grad():
                    step1["feats"] = model.backbone(x)
            opt.zero_grad(set_to_none=True)
            out = ddp(x)
            if step == 0:
                step1["labels"] = out["word_labels"].clone()
                step1["book_after"] = model.codebook.weight.clone()
            model.losses(out, y)["loss"].backward()
            opt.step()
        torch.save({"batches": batches, "books": books, "random_start": random_start,
                    "synced_start": synced_start, "rng": rng, "net_random_start": net_random_start,
                    "step1_feats": step1["feats"], "step1_labels": step1["labels"],
                    "step1_book_after": step1["book_after"], "net_codebook": model.codebook.weight.clone(),
                    "net_initialised": bool(model.codebook.initialised),
                    "classifier": model.classifier.weight.detach().clone()}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference_update(book, batches, rho):
    """Naive: pool every rank's feature vectors, assign by argmax cosine, per-word mean, EMA."""
    k, d = book.shape
    vn = book.double() / book.double().norm(dim=1, keepdim=True)
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts = [0] * k
    for feats in batches:
        for vec in feats.double().permute(0, 2, 3, 1).reshape(-1, d):
            kk = int(torch.argmax(vn @ (vec / vec.norm())))
            sums[kk] += vec
            counts[kk] += 1
    means = torch.stack([sums[i] / counts[i] if counts[i] else torch.zeros(d, dtype=torch.float64)
                         for i in range(k)])
    return rho * means + (1 - rho) * book.double()


@pytest.mark.multiprocess
def test_memory_bank_identical_across_ranks(tmp_path):
    from vwe.nets.words import encode_words
    mp.spawn(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # the ranks saw different data
    assert r0["batches"][0].shape != r1["batches"][0].shape
    # the random start: both ranks label step 1 against rank 0's
    assert not torch.equal(r0["random_start"], r1["random_start"])
    assert torch.equal(r0["synced_start"], r0["random_start"]) and torch.equal(r1["synced_start"], r0["random_start"])
    # after step 1: K vectors drawn with replacement over the global batch (rank 0's vectors, then rank
    # 1's), with rank 0's generator: the single-process draw over all ranks' features
    everything = torch.cat([r["batches"][0].permute(0, 2, 3, 1).reshape(-1, 4) for r in (r0, r1)])
    torch.set_rng_state(r0["rng"])
    drawn = everything[torch.randint(everything.shape[0], (6,))]
    assert torch.equal(r0["books"][0], drawn) and torch.equal(r1["books"][0], drawn)
    for step in range(STEPS):
        assert torch.equal(r0["books"][step], r1["books"][step]), f"codebooks differ after {step} updates"
    # and each EMA update equals the single-process update over both ranks' features
    for step in range(1, STEPS):
        expected = _reference_update(r0["books"][step - 1], [r0["batches"][step], r1["batches"][step]], 0.2)
        torch.testing.assert_close(r0["books"][step].double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["books"][0], r0["books"][-1])
    # the network: step 1's word labels on every rank come from rank 0's random codebook; after step 1
    # both ranks hold the same drawn codebook
    assert not torch.equal(r0["net_random_start"], r1["net_random_start"])
    for r in (r0, r1):
        assert torch.equal(r["step1_labels"], encode_words(r["step1_feats"], r0["net_random_start"])[2])
    assert torch.equal(r0["step1_book_after"], r1["step1_book_after"])
    step1_vectors = torch.cat([r["step1_feats"].permute(0, 2, 3, 1).reshape(-1, 512) for r in (r0, r1)])
    for word in r0["step1_book_after"]:
        assert (step1_vectors - word).abs().amax(1).min() < 1e-5
    # the network under DDP: same codebook and same weights on both ranks
    assert r0["net_initialised"] and r1["net_initialised"]
    assert torch.equal(r0["net_codebook"], r1["net_codebook"])
    assert r0["net_codebook"].abs().sum() > 0
    torch.testing.assert_close(r0["classifier"], r1["classifier"])
