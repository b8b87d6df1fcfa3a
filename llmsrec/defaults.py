"""llmsrec's defaults and shared names, written once in one light module (no torch), so the
CLI can show them and every stage reads the same values."""

#: llmsrec's heads (the ``llmsrec train`` / ``run`` / ``compare`` defaults), chosen on ml-100k
#: validation NDCG@10 (docs/results/order.md): five prefix samples per user, f_user
#: on the cached layers at [UserOut] and the attention-pooled history slots, f_item on the
#: layers at [ItemOut] and at the item's soft token. ``llmsrec.heads.TrainConfig()`` itself
#: keeps the paper's heads (one sample per user, last-layer readouts), as ``--paper-settings``
#: does.
LLMSREC_HEADS = {"prefixes": 5, "user_readout": "layers+slots", "item_readout": "layers+soft"}

#: the history window W: a user prompt shows the last W interactions (the paper's 10), the
#: default of every stage that builds prompts (``--history-window``).
HISTORY_WINDOW = 10

#: the LLM4Rec baselines' ``--model`` names, in the paper's order (Table 6); the one list
#: behind ``llmsrec.baselines.BASELINES`` (kept here so the CLI can name them without torch).
BASELINES = ("tallrec", "llara", "collm", "allmrec")
