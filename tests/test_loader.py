import numpy as np
import pytest
import torch

from lm_pretrain.data.loader import IGNORE_INDEX, PackedWindows, validation_batches
from lm_pretrain.errors import LmpError


def stream(n: int = 1000) -> np.ndarray:
    return (np.arange(n) % 251 + 4).astype(np.uint16)


def test_windows_are_deterministic_and_resumable():
    tokens = stream()
    a = PackedWindows(tokens, 16, seed=3, bos_token_id=1)
    b = PackedWindows(tokens, 16, seed=3, bos_token_id=1)
    full = [a.batch(i * 4, 4)[0] for i in range(30)]  # crosses epoch boundaries
    # a fresh sampler started at sample 40 gives the same batches: resume needs only the count
    assert torch.equal(b.batch(40, 4)[0], full[10])
    assert not torch.equal(PackedWindows(tokens, 16, seed=4, bos_token_id=1).batch(0, 4)[0], full[0])


def test_each_epoch_visits_every_window_once():
    tokens = np.arange(2000, dtype=np.int64) + 10
    w = PackedWindows(tokens, 10, seed=0, bos_token_id=1)
    n = w.windows_per_epoch
    starts = [int(w.window(i)[0]) for i in range(n)]
    assert len(set(starts)) == n
    gaps = np.diff(sorted(starts))
    assert set(gaps.tolist()) == {10}  # non-overlapping, contiguous windows


def test_targets_shifted_and_bos_ignored():
    tokens = np.array([1, 5, 6, 2, 1, 7, 8, 2] * 20, dtype=np.uint16)
    inputs, targets = PackedWindows(tokens, 8, seed=0, bos_token_id=1).batch(0, 2)
    assert inputs.shape == targets.shape == (2, 8)
    kept = targets != IGNORE_INDEX
    assert torch.equal(targets[:, :-1][kept[:, :-1]], inputs[:, 1:][kept[:, :-1]])
    assert not (targets == 1).any()
    assert (inputs == 1).any()


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(LmpError, match="too few"):
        PackedWindows(stream(20), 16, seed=0, bos_token_id=1)
    with pytest.raises(LmpError, match="validation split"):
        validation_batches(stream(10), 16, 1000, 4, 1)


def test_document_masks_positions_and_blocks():
    from lm_pretrain.data.loader import document_masks

    inputs = torch.tensor([[7, 8, 1, 5, 6, 2, 1, 9]])  # a partial document, then two documents
    positions, mask = document_masks(inputs, bos_token_id=1)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1]]
    m = mask[0, 0]
    assert m.shape == (8, 8)
    assert m[4].tolist() == [False, False, True, True, True, False, False, False]
    assert m[7].tolist() == [False] * 6 + [True, True]
    assert not m.triu(1).any()  # still causal


def test_document_packing_isolates_documents():
    """A token's logits do not change when the previous document changes."""
    from lm_pretrain.data.loader import document_masks
    from lm_pretrain.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2)
    model = Decoder(config).eval()
    second = [1, 20, 21, 22, 23, 2]
    a = torch.tensor([[1, 10, 11, 12, 2, *second]])
    b = torch.tensor([[1, 30, 31, 2, 40, 41, *second]])  # a different previous document, other length

    def logits(x):
        positions, mask = document_masks(x, 1)
        return model(x, position_ids=positions, attn_mask=mask).logits[0, -len(second) :]

    assert torch.allclose(logits(a), logits(b), atol=1e-6)
    # without document masking the previous document leaks in
    leak = (model(a).logits[0, -len(second) :] - model(b).logits[0, -len(second) :]).abs().max()
    assert leak > 1e-3


def test_document_bounds_are_the_blocks_of_the_document_mask():
    from lm_pretrain.data.loader import document_bounds, document_masks

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, 6, (4, 24), generator=generator)  # token 1 is BOS: many documents
    inputs[2] = 3  # a row inside one long document
    bounds = document_bounds(inputs, bos_token_id=1)
    assert bounds.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == inputs.numel()
    # the document of every flattened token, drawn back as a block-diagonal causal mask
    doc = torch.searchsorted(bounds, torch.arange(inputs.numel(), dtype=torch.int32), right=True)
    same = (doc[:, None] == doc[None, :]) & torch.ones(96, 96, dtype=torch.bool).tril()
    _, mask = document_masks(inputs, bos_token_id=1)
    assert torch.equal(torch.block_diag(*mask[:, 0]), same)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length flash attention runs on CUDA")
def test_varlen_attention_equals_the_document_mask_on_gpu():
    from lm_pretrain.data.loader import document_bounds, document_masks, document_positions
    from lm_pretrain.model.decoder import Decoder, DecoderConfig, use_varlen_attention

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=50, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1)
    model = Decoder(config).cuda()
    inputs = torch.randint(1, 8, (3, 64), device="cuda")
    targets = torch.roll(inputs, -1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert use_varlen_attention(inputs.device)
        positions, mask = document_masks(inputs, 1)
        masked = model(inputs, targets, position_ids=positions, attn_mask=mask)
        bounds = document_bounds(inputs, 1)
        varlen = model(inputs, targets, position_ids=document_positions(inputs, 1), cu_seqlens=bounds)
    torch.testing.assert_close(varlen.logits.float(), masked.logits.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(varlen.loss, masked.loss, atol=1e-3, rtol=0)


def test_background_worker_serves_the_batches_of_the_loop_in_order(tmp_path):
    import pickle

    from lm_pretrain.data.loader import TrainBatches, train_loader

    path = tmp_path / "tokens.bin"
    stream(5000).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(5000,))
    windows = PackedWindows(tokens, 16, seed=3, bos_token_id=1)
    # a worker started by spawn receives the windows pickled: the token file is reopened, not copied
    copy = pickle.loads(pickle.dumps(windows))
    assert isinstance(copy.tokens, np.memmap) and len(pickle.dumps(windows)) < 2000
    assert torch.equal(copy.batch(7, 4)[0], windows.batch(7, 4)[0])

    def batches(rank: int, start: tuple[int, int, int]) -> TrainBatches:
        return TrainBatches(windows, micro=2, accum=3, batch_size=12, rank=rank, seq_len=16, start=start,
                            last_step=8, main_steps=8)  # fmt: skip

    inline = list(train_loader(batches(1, (0, 0, 0)), background=False, pin_memory=False))
    worker = list(train_loader(batches(1, (0, 0, 0)), background=True, pin_memory=False))
    assert len(inline) == len(worker) == 8 * 3
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, worker, strict=True)
    )
    # rank 1's micro-batch i of step s holds global samples 12 s + 6 + 2 i, 12 s + 6 + 2 i + 1
    assert torch.equal(inline[3 * 5 + 2][0], windows.batch(12 * 5 + 6 + 4, 2)[0])
    # resuming at step 5 (60 samples done) continues with exactly the same batches
    resumed = list(train_loader(batches(1, (5, 60, 960)), background=True, pin_memory=False))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, inline[15:], strict=True))
