"""llmsrec's own defaults that differ from the paper's, in one light module (no torch), so
the CLI can show them and every stage reads the same values."""

#: llmsrec's heads (the ``llmsrec train`` / ``run`` / ``compare`` defaults), chosen on ml-100k
#: validation NDCG@10 (README, "Order understanding"): five prefix samples per user, f_user
#: on the cached layers at [UserOut] and the attention-pooled history slots, f_item on the
#: layers at [ItemOut] and at the item's soft token. ``llmsrec.heads.TrainConfig()`` itself
#: keeps the paper's heads (one sample per user, last-layer readouts), as ``--paper-settings``
#: does.
LLMSREC_HEADS = {"prefixes": 5, "user_readout": "layers+slots", "item_readout": "layers+soft"}
