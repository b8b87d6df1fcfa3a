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

#: ``--fast``: the heads' recipe for iterating (a head-only rerun in seconds instead of minutes),
#: chosen on ml-100k validation NDCG@10 among widths 128-2048, batches 20-400, lrs 5e-4-3e-3
#: and validation schedules (docs/results/speed.md: 0.002 below the defaults' validation
#: NDCG@10, mean of seeds 0-2, within their seed spread; 0.006 below on test; 1/28 of their
#: training CPU time). Options given on the command line or in a ``--config`` file override it.
HEADS_FAST = {"hidden": 128, "batch_size": 200, "lr": 1e-3, "evals_per_epoch": 1, "patience": 3}

#: The LLM4Rec baselines' training budget in ``llmsrec compare`` and ``analyze --llm4rec``
#: (``llmsrec.experiments.compare.LLM4REC_DEFAULTS``; paper, Appendix E: at most 10 epochs,
#: early stopping with patience 10); their other options are ``llmsrec train --model NAME``'s.
LLM4REC_TRAINING = {"epochs": 10, "patience": 10}

#: The frozen LLM's defaults wherever one runs (``precompute``, ``run``, ``train --mode e2e``,
#: the LLM4Rec baselines, ``refine-tokens``, ``doctor``): the bundled SmolLM2-135M GGUF, the
#: token budget of one padded batch (batch size x longest prompt), the fixed f_I fit of cache
#: mode and the prompt template (the paper's Table 2 (b); ``llmsrec.precompute.prompts``).
LLM = {"llm": "smollm2-135m", "batch_tokens": 4096, "fi": "moment", "template": "llmsrec-prompt-v1"}

#: ``llmsrec precompute``'s defaults: prompts per resumable chunk, how several processes'
#: shards become one cache (copied into it), and the user views that ``precompute`` and ``run``
#: compute (the prefix view train-prefix comes with ``--prefixes``).
#: ``llmsrec.precompute.precompute()`` itself keeps the paper's views, ``DEFAULT_VIEWS`` (train
#: for one sample per user), as ``llmsrec.pipeline.PRECOMPUTE_DEFAULTS`` does.
PRECOMPUTE = {"chunk_prompts": 64, "assemble": "copy", "views": ("valid", "test", "test-shuffled")}

#: The LLM-in-the-loop trainers' defaults (``train --mode e2e``, the baselines, ``refine-tokens``):
#: the trainable f_I (``linear``, initialised from the ``fi`` fit) and the padded tokens of one
#: forward that keeps its graph.
E2E = {"fi_arch": "linear", "grad_batch_tokens": 2048}

#: LoRA of the TALLRec / LLaRA / CoLLM baselines (``llmsrec.baselines.LoraOptions``,
#: ``--lora-*``): the paper gives none, so peft's common ones.
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ("q_proj", "v_proj")}

#: A-LLMRec's stage-1 alignment (``llmsrec.baselines.allmrec.Stage1Options``, ``--stage1-*``):
#: passes over the items, items per step (Appendix E), Adam lr, width of the codes.
ALLMREC_STAGE1 = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "latent": 128}

#: ``llmsrec prepare``'s (and ``run``'s) split: the iterative k-core (items need K
#: interactions, users max(K, 3)) and the stored negatives per user for validation and test.
PREPARE = {"kcore": 5, "num_negatives": 99}

#: SASRec's training (``llmsrec sasrec train``, ``run``'s ``--sasrec-*``,
#: ``llmsrec.cfsrec.train_sasrec`` and ``SASRecConfig``; the first five are also ``cfsrec
#: train``'s): at most 200 epochs, validated every 5, early stop after 5 validations without gain.
SASREC_TRAINING = {"epochs": 200, "patience": 5, "eval_every": 5, "batch_size": 128, "lr": 1e-3, "hidden": 64,
                   "blocks": 2, "heads": 1, "dropout": 0.1, "maxlen": 128}

#: ``llmsrec refine-tokens`` (``llmsrec.e2e.refine.refine_tokens``): sampled users, the item
#: pool, Adam steps, users per step and the lr of the two token embeddings.
REFINE_TOKENS = {"users": 128, "items": 256, "steps": 50, "batch_size": 20, "lr": 1e-3}
