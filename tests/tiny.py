"""Tiny stand-ins built in the test process, shared by the test modules: a BPE tokenizer, a
random-weight LLaMA (hidden 32, 2 layers), a 10-user dataset and a one-block SASRec. Seeded:
every call builds the same objects."""

from __future__ import annotations

import numpy as np
import torch

from llmsrec.precompute.llm import load_llm


def tiny_tokenizer():
    """A byte-level BPE tokenizer (420 tokens) trained on prompt words, with <s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["This user has made a series of watched movies in the following order",
              "History Item List No. Time Title Based on this sequence generate user "
              "representation token The item title and item embedding are as follows",
              "then generate item representation token 1995 1996 1997 2024 Movie Story"] * 5
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


def tiny_llama(tok, layers: int = 2):
    """A random-weight LLaMA (hidden 32) over ``tok``, seeded: the same weights every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_llama_folder(folder, layers: int = 2):
    """Save :func:`tiny_llama` and the tiny tokenizer as a local Hugging Face folder (for --llm)."""
    tok = tiny_tokenizer()
    tiny_llama(tok, layers).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_llm():
    """:func:`tiny_llama` and its tokenizer as an llmsrec ``LoadedLLM`` (sdpa attention)."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    model.config._attn_implementation = "sdpa"
    return load_llm("tiny-llama", model=model, tokenizer=tok)


def tiny_dataset(out):
    """A prepared 10-user, 16-item dataset in ``out`` (5-9 interactions a user, same-day ties, 3 stored negatives)."""
    from llmsrec.data import prepare_from_interactions

    rng = np.random.default_rng(0)
    inter = []
    for u in range(10):
        n = 5 + u % 5
        items = rng.choice(16, size=n, replace=False)
        t = 820_000_000 + u * 1000
        for k, i in enumerate(items):
            t += int(rng.integers(0, 3)) * 86_400  # same-day ties happen
            inter.append((f"u{u}", f"i{i}", t))
    titles = {f"i{i}": f"Movie Story {i} ({1990 + i})" for i in range(16)}
    return prepare_from_interactions(inter, titles, out, kcore=1, num_negatives=3,
                                     stats_extra={"dataset": "ml-tiny"})


def tiny_sasrec(n_items):
    """A seeded one-block SASRec (hidden 16, maxlen 20) for ``n_items`` items, in eval mode."""
    from llmsrec.cfsrec import SASRec, SASRecConfig

    torch.manual_seed(1)
    return SASRec(SASRecConfig(n_items=n_items, hidden=16, blocks=1, dropout=0.0, maxlen=20)).eval()
