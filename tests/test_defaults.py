"""Every default the CLI shows is the one the Python API uses: each is written once, in
``llmsrec.defaults``, and both the click options and the stage signatures read it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from llmsrec import defaults
from llmsrec.cli import main


def option_defaults(*command: str) -> dict:
    cmd = main
    for name in command:
        cmd = cmd.commands[name]
    return {p.name: p.default for p in cmd.params}


def signature_defaults(f) -> dict:
    return {k: p.default for k, p in inspect.signature(f).parameters.items()
            if p.default is not inspect.Parameter.empty}


def field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def same(cli: dict, api: dict, names, rename=None):
    """The named CLI option defaults equal the API's (``rename``: CLI name -> API name)."""
    rename = rename or {}
    got = {n: cli[n] for n in names}
    want = {n: api[rename.get(n, n)] for n in names}
    assert got == want


def test_precompute_options_are_the_stage_defaults():
    from llmsrec.precompute import DEFAULT_VIEWS
    from llmsrec.precompute.prompts import TEMPLATE_VERSION
    from llmsrec.precompute.run import precompute

    cli, api = option_defaults("precompute"), signature_defaults(precompute)
    same(cli, api, ["llm", "batch_tokens", "chunk_prompts", "fi", "template", "assemble"])
    assert api["template"] == TEMPLATE_VERSION == defaults.LLM["template"]
    # the CLI's views are llmsrec's (train-prefix comes with --prefixes); precompute() keeps the paper's
    assert cli["views"] == option_defaults("run")["views"] == ",".join(defaults.PRECOMPUTE["views"])
    assert DEFAULT_VIEWS == ("train", "valid", "test", "test-shuffled")


def test_e2e_and_llm_options_are_e2e_options_defaults():
    from llmsrec.e2e.loop import E2EOptions

    same(option_defaults("train"), field_defaults(E2EOptions),
         ["llm", "batch_tokens", "fi", "fi_arch", "grad_batch_tokens", "history_window"])


@pytest.mark.parametrize("command", ["prepare", "run"])
def test_prepare_options_are_the_data_stage_defaults(command):
    from llmsrec.data.dataset import prepare_from_interactions

    same(option_defaults(command), signature_defaults(prepare_from_interactions), ["kcore", "num_negatives"])
    assert defaults.PREPARE == {"kcore": 5, "num_negatives": 99}


def test_refine_tokens_options_are_refine_tokens_defaults():
    from llmsrec.e2e.refine import refine_tokens

    same(option_defaults("refine-tokens"), signature_defaults(refine_tokens),
         ["users", "items", "steps", "batch_size", "lr", "batch_tokens"])


def test_sasrec_options_are_the_trainers_defaults():
    from llmsrec.cfsrec import train_cfsrec, train_sasrec
    from llmsrec.cfsrec.sasrec import SASRecConfig
    from llmsrec.pipeline import SASREC_DEFAULTS

    sasrec = signature_defaults(train_sasrec)
    names = list(defaults.SASREC_TRAINING)
    same(option_defaults("sasrec", "train"), sasrec, names)
    assert {n: sasrec[n] for n in names} == SASREC_DEFAULTS == defaults.SASREC_TRAINING
    config = field_defaults(SASRecConfig)
    assert {n: config[n] for n in ("hidden", "blocks", "heads", "dropout", "maxlen")} == \
        {n: sasrec[n] for n in ("hidden", "blocks", "heads", "dropout", "maxlen")}
    budget = ["epochs", "patience", "eval_every", "batch_size", "lr"]
    same(option_defaults("cfsrec", "train"), signature_defaults(train_cfsrec), budget)
    same(option_defaults("compare"), sasrec, budget)
    same(option_defaults("run"), sasrec, ["sasrec_epochs", "sasrec_patience", "sasrec_eval_every"],
         rename={"sasrec_epochs": "epochs", "sasrec_patience": "patience", "sasrec_eval_every": "eval_every"})


def test_fast_recipe_names_head_options_and_differs_from_their_defaults():
    """HEADS_FAST: TrainConfig fields that train and run take as options, each one changed."""
    from llmsrec.heads.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for command in ("train", "run"):
        opts = option_defaults(command)
        assert "fast" in opts
        for k, v in defaults.HEADS_FAST.items():
            assert k in fields and k in opts and opts[k] != v, (command, k)
    TrainConfig(**defaults.HEADS_FAST)  # valid values
