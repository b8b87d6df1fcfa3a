"""The real bundled SmolLM2-135M on a tiny slice (first call de-quantizes the GGUF, ~30 s;
later calls reload the safetensors copy in ~1 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmsrec.cache import open_cache
from llmsrec.precompute import precompute
from llmsrec.precompute.engine import forward_batch, tokenize_prompts
from llmsrec.precompute.llm import USER_OUT, load_llm
from llmsrec.precompute.prompts import build_view

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)",
          "Copycat (1995)", "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)",
          "Richard III (1995)", "Seven (Se7en) (1995)", "Usual Suspects, The (1995)",
          "Mighty Aphrodite (1995)"]


@pytest.mark.integration
def test_bundled_model_tiny_slice(tmp_path):
    from llmsrec.cfsrec import SASRec, SASRecConfig
    from llmsrec.data import prepare_from_interactions

    rng = np.random.default_rng(0)
    inter = []
    for u in range(4):
        for k, i in enumerate(rng.choice(len(TITLES), size=6, replace=False)):
            inter.append((f"u{u}", f"m{i}", 880_000_000 + 86_400 * (7 * u + k)))
    ds = prepare_from_interactions(inter, {f"m{i}": t for i, t in enumerate(TITLES)},
                                   tmp_path / "ds", kcore=1, num_negatives=3,
                                   stats_extra={"dataset": "ml-100k"})
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=ds.n_items, hidden=16, blocks=1)).eval()
    llm = load_llm("smollm2-135m")
    assert llm.d_llm == 576 and len(llm.decoder.layers) == 30
    out = precompute(ds, sas, tmp_path / "c.h5", llm=llm, views=("test", "test-shuffled"),
                     history_window=10, progress=False, chunk_prompts=8)
    with open_cache(out) as c:
        assert c.views == ["test", "test-shuffled"]
        assert c.provenance["model"] == "smollm2-135m" and c.provenance["verb"] == "watched movies"
        ih, uh = c.item_hidden(), c.user_hidden("test")
        assert ih.shape == (ds.n_items + 1, 576) and uh.shape == (5, 576)
        assert np.isfinite(ih).all() and np.isfinite(uh).all()
        assert (np.abs(uh[1:]).sum(1) > 0).all() and not uh[0].any()
        # shuffling the window changes the [UserOut] state
        assert np.abs(c.user_hidden("test-shuffled")[1:] - uh[1:]).max() > 1e-3
        p = c.params()
        soft = torch.from_numpy(c.item_cf() @ p["f_I/weight"].T + p["f_I/bias"])
        vp = build_view(ds, "test", history_window=10)
        (t,) = tokenize_prompts(llm, [vp.prompts[2]], USER_OUT)
        alone = forward_batch(llm, [t], soft, torch.from_numpy(p["tokens/user_out"]))[0]
        np.testing.assert_allclose(uh[2], alone.numpy(), atol=1e-4)
