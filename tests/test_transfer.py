"""Cross-domain transfer (Table 8): item matching and the re-indexed CF-SRec item table.

The whole command (precompute of B with A's f_I, A's heads on it) runs in
tests/test_pipeline_integration.py with the real bundled LLM.
"""

import numpy as np
import pytest
import torch

from llmsrec.cfsrec import BERT4Rec, BERT4RecConfig, SASRec, SASRecConfig, pad_left
from llmsrec.errors import InputError
from llmsrec.experiments.transfer import format_transfer_md, match_items, reindex_item_table, title_key


def test_title_key_folds_case_and_whitespace():
    assert title_key("  Usual   Suspects,\tThe ") == "usual suspects, the"


def test_match_items_unique_titles_only():
    a = ["", "Toy Story", "Cape Fear", "Cape Fear", "Heat", "Kolya"]
    b = ["", "heat ", "Cape  Fear", "Toy  story", "New Film", "Kolya", "kolya"]
    # Cape Fear is two items of A, Kolya two items of B: both stay unseen
    assert match_items(a, b).tolist() == [0, 4, 0, 1, 0, 0, 0]
    assert match_items(a, b, "none").tolist() == [0] * 7
    # raw ids: equal strings, no folding
    assert match_items(["", "10", "20", "30"], ["", "30", "x", "20 ", "10"], "id").tolist() == [0, 3, 0, 0, 1]
    with pytest.raises(InputError, match="--match 'year'"):
        match_items(a, b, "year")


def test_reindexed_sasrec_scores_b_as_a_scores_the_mapped_items(one_torch_thread):
    torch.manual_seed(0)
    a = SASRec(SASRecConfig(n_items=6, hidden=8, heads=2, blocks=1, maxlen=5)).eval()
    mapping = np.array([0, 3, 0, 1, 6, 0])  # B has 5 items; B2 and B5 unseen by A
    b = reindex_item_table(a, mapping)
    assert b.config.n_items == 5 and b.config.hidden == 8
    ea, eb = a.item_emb.weight.detach(), b.item_emb.weight.detach()
    assert eb.shape == (6, 8)
    for j, i in enumerate(mapping):
        want = ea[0] if j == 0 else (ea[1:].mean(0) if i == 0 else ea[i])
        assert torch.equal(eb[j], want), j
    for k, v in a.state_dict().items():  # every other weight is A's
        if k != "item_emb.weight":
            assert torch.equal(b.state_dict()[k], v), k
    # a B history of seen items scores B's candidates as A scores the mapped ids
    seqs_b = pad_left([np.array([1, 3, 4]), np.array([4, 1])], 5)
    cand_b = torch.tensor([[1, 3, 4], [3, 4, 1]])
    m = torch.from_numpy(mapping)
    with torch.no_grad():
        got, want = b.score(seqs_b, cand_b), a.score(m[seqs_b], m[cand_b])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the two unseen items share one embedding: equal scores for any history
    with torch.no_grad():
        s = b.score(seqs_b, torch.tensor([[2, 5], [2, 5]]))
    assert torch.equal(s[:, 0], s[:, 1])


def test_reindex_keeps_bert4rec_mask_row_and_checks_ids(one_torch_thread):
    torch.manual_seed(0)
    a = BERT4Rec(BERT4RecConfig(n_items=4, hidden=8, heads=2, blocks=1, maxlen=5)).eval()
    b = reindex_item_table(a, np.array([0, 2, 0]))
    ea, eb = a.item_emb.weight.detach(), b.item_emb.weight.detach()
    assert eb.shape == (4, 8)  # padding, 2 items, [mask]
    assert torch.equal(eb[1], ea[2]) and torch.equal(eb[2], ea[1:5].mean(0)) and torch.equal(eb[3], ea[5])
    with pytest.raises(InputError, match="ids outside 0..4"):
        reindex_item_table(a, np.array([0, 5]))


def test_transfer_md_rows():
    m = lambda x: {"NDCG@10": x, "NDCG@20": x + 0.1, "HR@10": x + 0.2, "HR@20": x + 0.3}  # noqa: E731
    doc = {"source": "runs/ml-1m", "target": "data/ml-100k",
           "match": {"rule": "title", "items": 100, "matched": 90, "test_targets_matched": 0.95},
           "models": {"SASRec": {"test": m(0.2), "test-shuffled": m(0.1)}, "LLM-SRec": {"test": m(0.25)}}}
    md = format_transfer_md(doc)
    assert "90 of 100 target items known to the source, 95.0% of the test targets" in md
    assert "| SASRec | 0.4000 | 0.2000 | 0.5000 | 0.3000 | 0.1000 | -50.00% |" in md
    assert "| LLM-SRec | 0.4500 | 0.2500 | 0.5500 | 0.3500 | - | - |" in md
