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

#: The heads trainer's defaults: the fields of ``llmsrec.heads.train.TrainConfig`` (beside
#: ``seed`` and the readout fields above) and the defaults of ``llmsrec train``'s head options;
#: TrainConfig's docstring says where each comes from.
HEADS_TRAINING = {"epochs": 30, "batch_size": 20, "lr": 1e-4, "beta1": 0.9, "beta2": 0.98, "weight_decay": 0.0,
                  "lr_decay": 1.0, "train_negatives": "all", "evals_per_epoch": 10, "patience": 20,
                  "select_metric": "NDCG@10", "hidden": 2048, "d_out": 128, "cf_hidden": 128, "distill": "mse",
                  "retrieval_weight": 1.0, "distill_weight": 1.0, "uniform_weight": 1.0,
                  "contrastive_temperature": 1.0}

#: The LLM4Rec baselines' training budget in ``llmsrec compare`` and ``analyze --llm4rec``
#: (``llmsrec.experiments.compare.LLM4REC_DEFAULTS``; paper, Appendix E: at most 10 epochs,
#: early stopping with patience 10); their other options are ``llmsrec train --model NAME``'s.
LLM4REC_TRAINING = {"epochs": 10, "patience": 10}
