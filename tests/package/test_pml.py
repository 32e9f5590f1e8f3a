"""DAALLoss as a pytorch-metric-learning drop-in: call order, miners, keyword names, a whole loop."""
import pytest
import torch

import daal_triton
from daal_triton.loss import miner_weights

pml = pytest.importorskip("pytorch_metric_learning", reason="the [pml] extra is not installed")
from pytorch_metric_learning import miners, samplers  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402


def batch(B=24, C=6, D=16):
    return torch.randn(B, D), torch.arange(B) % C


def test_positional_order_is_pml_s():
    """``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``: a miner's tuple in third place."""
    loss = daal_triton.DAALLoss(6, 16, backend="reference")
    z, y = batch()
    tup = miners.MultiSimilarityMiner()(z, y)
    assert torch.isfinite(loss(z, y, tup))
    bank, bank_y = torch.randn(30, 16), torch.arange(30) % 6
    by_position = loss(z, y, None, bank, bank_y)
    by_name = loss(z, y, ref_emb=bank, ref_labels=bank_y)
    assert torch.equal(by_position, by_name)


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
def test_miner_weights_match_pml(kind):
    z, y = batch()
    tup = lmu.get_all_pairs_indices(y) if kind == "pairs" else lmu.get_all_triplets_indices(y)
    tup = tuple(t[torch.randperm(len(t))[: len(t) // 3]] for t in tup)  # uneven counts
    ours = miner_weights(tup, len(y))
    theirs = lmu.convert_to_weights(tup, y, dtype=torch.float32)
    assert torch.allclose(ours, theirs)


def test_indices_tuple_weights_each_sample():
    per_sample = daal_triton.DAALLoss(6, 16, backend="reference", reduction="none")
    mean = daal_triton.DAALLoss(6, 16, backend="reference")
    mean.segments = per_sample.segments
    z, y = batch()
    tup = (torch.tensor([0, 0, 3]), torch.tensor([6, 12, 9]))  # sample 0 twice, 3/6/9/12 once
    w = torch.zeros(24)
    w[[0, 3, 6, 9, 12]] = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5])
    plain = per_sample(z, y)
    assert torch.allclose(per_sample(z, y, tup), plain * w)
    # mean: the weighted line terms averaged over B, the weighted hinges over the valid samples
    parts = daal_triton.daal_loss(z, y, per_sample.segments, backend="reference", return_parts=True)
    assert parts.valid.all()  # four samples per class: every radius counts
    hinge = torch.relu(0.8 - parts.radius)  # tau = 0.8, lambda_dens = 0.5 (the defaults)
    line = plain - 0.5 * hinge
    expected = (line * w).mean() + 0.5 * (hinge * w).sum() / 24
    assert torch.allclose(mean(z, y, tup), expected)


def test_empty_tuple_weighs_every_sample_once():
    loss = daal_triton.DAALLoss(6, 16, backend="reference")
    z, y = batch()
    empty = (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert torch.equal(loss(z, y, empty), loss(z, y))


@pytest.mark.parametrize("bad", [(torch.tensor([0, 99]), torch.tensor([1, 2])), torch.tensor([1, 2]),
                                 (torch.tensor([0.5]), torch.tensor([1.0]))])
def test_bad_indices_tuple_names_the_argument(bad):
    loss = daal_triton.DAALLoss(6, 16, backend="reference")
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(*batch(), bad)


def test_embedding_size_is_accepted():
    assert daal_triton.DAALLoss(6, embedding_size=16).segments.shape == (6, 2, 16)
    with pytest.raises(ValueError, match="embedding_dim"):
        daal_triton.DAALLoss(6, 16, embedding_size=16)
    with pytest.raises(ValueError, match="embedding_dim"):
        daal_triton.DAALLoss(6)


def test_a_pml_training_loop_end_to_end():
    """MPerClassSampler -> a miner -> DAALLoss -> AccuracyCalculator() with its defaults."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    C, per, D_in, D = 8, 20, 12, 16
    centres = 3 * torch.randn(C, D_in)
    labels = torch.arange(C).repeat_interleave(per)
    data = centres[labels] + torch.randn(C * per, D_in)
    net = torch.nn.Linear(D_in, D)
    loss_fn = daal_triton.DAALLoss(C, embedding_size=D, backend="reference")
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=1e-2)
    sampler = samplers.MPerClassSampler(labels, m=4, batch_size=32, length_before_new_iter=C * per)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, labels), batch_size=32,
                                         sampler=sampler)
    acc = AccuracyCalculator()
    before = acc.get_accuracy(net(data).detach(), labels)["precision_at_1"]
    losses = []
    for _ in range(3):
        for x, y in loader:
            emb = net(x)
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        result = acc.get_accuracy(net(data), labels)
    assert {"precision_at_1", "mean_average_precision_at_r", "NMI"} <= set(result)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result["precision_at_1"] >= before - 0.05 and result["precision_at_1"] > 0.5


@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(), miners.TripletMarginMiner(margin=0.5)],
                         ids=["pairs", "triplets"])
def test_tuples_mined_against_a_reference_set_count_their_anchors(miner):
    """``miner(emb, labels, ref_emb, ref_labels)`` indexes positives/negatives into the
    reference set: as pytorch-metric-learning's ``convert_to_weights(using_ref=True)``, only the
    anchors weigh batch rows (the reference set is larger than the batch here, so counting every
    index would refuse the tuple or weigh the wrong rows)."""
    torch.manual_seed(2)
    z, y = batch()
    bank, bank_y = torch.randn(40, 16), torch.arange(40) % 6
    tup = miner(z, y, bank, bank_y)
    assert max(int(t.max()) for t in tup) >= len(y), "the case no longer tells"
    ours = miner_weights(tup, len(y), using_ref=True)
    theirs = lmu.convert_to_weights(tup, y, dtype=torch.float32, using_ref=True)
    assert torch.allclose(ours, theirs)
    loss = daal_triton.DAALLoss(6, 16, backend="reference", reduction="none")
    unweighted = loss(z, y, ref_emb=bank, ref_labels=bank_y)
    assert torch.allclose(loss(z, y, tup, bank, bank_y), unweighted * theirs)
    with pytest.raises(ValueError, match="its anchors say which batch rows count"):
        loss(z, y, tup[:2], bank, bank_y)


def test_a_tuple_with_bad_embeddings_is_a_value_error():
    loss = daal_triton.DAALLoss(6, 16, backend="reference")
    z, y = batch()
    with pytest.raises(ValueError, match="embeddings must be a torch.Tensor"):
        loss(z.tolist(), y, (torch.tensor([0]), torch.tensor([1])))
