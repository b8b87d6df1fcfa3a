"""Richer cached readouts and prefix samples from one frozen forward.

One forward pass of the frozen LLM gives more than the last-layer state at the out token:

* ``out_layers``: the states of chosen layers at ``[UserOut]`` / ``[ItemOut]``;
* ``slots``: the states of the same layers at the prompt's ``[HistoryEmb]`` positions
  (per history slot in a user prompt; the item's own soft token in an item prompt).

Prefix samples (paper Appendix F.5, auto-regressive training samples): user u gets K
training samples, the latest K cutoffs before the validation target. Sample j has input
``seq[:-3-j]`` and target ``seq[-3-j]``. All K prompts start at the same history item (the
first item of the earliest sample's window), so each is a prefix of the longest one up to
its closing sentence. They are run as one *prompt tree*: the longest prompt (the trunk),
then for every other sample only the tokens where its prompt leaves the trunk (its
closing sentence and ``[UserOut]``). A 4-D attention mask lets a branch token see the trunk
up to the branch point and its own branch, and its position ids continue from the branch
point, so every sample's states equal a direct forward of its own prompt (tested to 1e-4)
at a fraction of the tokens (``tree_token_counts``).

Layer numbering: ``l`` in ``1..n_layers`` is the output of decoder layer ``l``
(``output_hidden_states[l]``); the last layer's entry is after the final norm, as
``last_hidden_state``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmsrec.devices import to_device
from llmsrec.errors import InputError
from llmsrec.precompute.engine import TokenizedPrompt, tokenize_prompts
from llmsrec.precompute.llm import LoadedLLM

#: the default readout layers as fractions of the depth: early, middle, late and the last
#: (8, 16, 24, 30 of SmolLM2-135M's 30 layers; 7, 15, 22, 28 of Llama-3.2-3B's 28)
DEFAULT_LAYER_FRACTIONS = (4 / 15, 8 / 15, 12 / 15, 1.0)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """``--readout-layers auto``: the layers at :data:`DEFAULT_LAYER_FRACTIONS` of the depth."""
    return tuple(sorted({max(1, min(n_layers, round(f * n_layers))) for f in DEFAULT_LAYER_FRACTIONS}))


@dataclass(frozen=True)
class TreePrompt:
    """K prompts that share their beginning, packed as one sequence.

    Attributes:
        ids: int64 ``(T,)`` the trunk's tokens, then each branch's.
        pos: int64 ``(T,)`` position ids (a branch continues from its branch point).
        seen: int64 ``(T,)`` for each token, how many trunk tokens it may attend to
            (trunk token t: t+1; branch token: its branch point).
        branch: int64 ``(T,)`` 0 for the trunk, k >= 1 for the tokens of branch k.
        soft_pos, soft_items: int64 ``(n_soft,)`` where the ``[HistoryEmb]`` tokens are and
            which items go there.
        out_pos: int64 ``(K,)`` each sample's out-token position in ``ids``.
        slot_pos: K int64 arrays: each sample's ``[HistoryEmb]`` positions in ``ids``, in
            prompt order.
    """

    ids: np.ndarray
    pos: np.ndarray
    seen: np.ndarray
    branch: np.ndarray
    soft_pos: np.ndarray
    soft_items: np.ndarray
    out_pos: np.ndarray
    slot_pos: list

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sample_tokens(self) -> int:
        """Tokens of one forward per sample (each sample's own prompt), what the tree saves against."""
        n = int((self.branch == 0).sum())
        for k in range(1, len(self.out_pos)):
            own = self.branch == k
            n += int(self.seen[own][0]) + int(own.sum())
        return n


def as_tree(p: TokenizedPrompt) -> TreePrompt:
    """A single prompt as a one-sample tree."""
    n = len(p.ids)
    return TreePrompt(ids=p.ids, pos=np.arange(n), seen=np.arange(1, n + 1), branch=np.zeros(n, np.int64),
                      soft_pos=p.soft_pos, soft_items=p.soft_items,
                      out_pos=np.asarray([p.out_pos]), slot_pos=[p.soft_pos])


def build_tree(samples: list[TokenizedPrompt]) -> TreePrompt:
    """Pack tokenized prompts (the longest first) into one :class:`TreePrompt`.

    Each later prompt contributes the tokens after its longest common token prefix with the
    first (token-level, so a tokenizer merge across the branch point cannot make a branch
    differ from its own prompt).

    Raises:
        InputError: a prompt shares no token with the first, or a branch's soft token
            stands where the trunk has one (the prompts are not prefixes of each other).
    """
    trunk = samples[0]
    n = len(trunk.ids)
    ids, pos, seen, branch = [trunk.ids], [np.arange(n)], [np.arange(1, n + 1)], [np.zeros(n, np.int64)]
    soft_pos, soft_items = [trunk.soft_pos], [trunk.soft_items]
    out_pos, slot_pos = [trunk.out_pos], [trunk.soft_pos]
    offset = n
    for k, s in enumerate(samples[1:], start=1):
        m = min(len(s.ids), n)
        diff = np.flatnonzero(s.ids[:m] != trunk.ids[:m])
        c = int(diff[0]) if len(diff) else m
        if c == 0 or c == len(s.ids):
            raise InputError(f"prefix sample {k}: its prompt is not a prefix of the longest one")
        tail = s.ids[c:]
        shared = s.soft_pos[s.soft_pos < c]
        if not np.array_equal(shared, trunk.soft_pos[trunk.soft_pos < c]) or \
                not np.array_equal(s.soft_items[: len(shared)], trunk.soft_items[: len(shared)]):
            raise InputError(f"prefix sample {k}: its soft tokens differ from the longest prompt's")
        own = s.soft_pos[s.soft_pos >= c]
        ids.append(tail)
        pos.append(np.arange(c, c + len(tail)))
        seen.append(np.full(len(tail), c))
        branch.append(np.full(len(tail), k))
        soft_pos.append(own - c + offset)
        soft_items.append(s.soft_items[len(shared):])
        out_pos.append(s.out_pos - c + offset)
        slot_pos.append(np.concatenate([shared, own - c + offset]))
        offset += len(tail)
    cat = lambda xs: np.concatenate(xs).astype(np.int64)  # noqa: E731
    return TreePrompt(ids=cat(ids), pos=cat(pos), seen=cat(seen), branch=cat(branch),
                      soft_pos=cat(soft_pos), soft_items=cat(soft_items),
                      out_pos=np.asarray(out_pos, dtype=np.int64), slot_pos=[a.astype(np.int64) for a in slot_pos])


def tokenize_tree(llm: LoadedLLM, prompts: list, out_token: str) -> TreePrompt:
    """Tokenize K prompts (the longest first, each a prefix of it up to its closing text)
    and pack them (:func:`build_tree`)."""
    return build_tree(tokenize_prompts(llm, prompts, out_token))


def tree_mask(batch: list[TreePrompt], dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask ``(B, 1, L, L)`` of a right-padded batch of trees.

    Query q may see key k when both are real tokens and either k is in the trunk with
    ``k < seen[q]``, or k is in q's own branch at or before q. Padding rows see key 0 only
    (they are never read; a fully masked row would give NaN).
    """
    b, lmax = len(batch), max(len(t) for t in batch)
    allow = torch.zeros((b, lmax, lmax), dtype=torch.bool)
    ar = torch.arange(lmax)
    for i, t in enumerate(batch):
        n = len(t)
        seen = torch.from_numpy(t.seen)
        br = torch.from_numpy(t.branch)
        trunk_k = (br == 0)[None, :] & (ar[:n][None, :] < seen[:, None])
        same_branch = (br[:, None] == br[None, :]) & (br[:, None] > 0) & (ar[:n][None, :] <= ar[:n][:, None])
        allow[i, :n, :n] = trunk_k | same_branch
        allow[i, n:, 0] = True
    mask = torch.zeros((b, 1, lmax, lmax), dtype=dtype)
    mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)
    return mask


def num_layers(llm: LoadedLLM) -> int:
    """The decoder's layer count (30 for SmolLM2-135M)."""
    return int(llm.decoder.config.num_hidden_layers)


def n_slots_of(trees: list[TreePrompt]) -> int:
    """The most ``[HistoryEmb]`` slots any sample of ``trees`` has."""
    return max((len(s) for t in trees for s in t.slot_pos), default=0)


def forward_readouts(llm: LoadedLLM, batch: list[TreePrompt], soft_table: torch.Tensor, out_vec: torch.Tensor,
                     layers: tuple[int, ...], n_slots: int) -> dict[str, np.ndarray]:
    """Run the frozen decoder on a batch of prompt trees and read every sample's states.

    Args:
        llm: the loaded model.
        batch: B trees with S samples in all.
        soft_table: ``(N+1, d_llm)`` f_I(E) on the model's device/dtype.
        out_vec: ``(d_llm,)`` input embedding of the out token.
        layers: readout layers, each in ``1..n_layers`` (may be empty).
        n_slots: slots kept per sample (the last ``n_slots`` ``[HistoryEmb]`` positions,
            right-aligned: slot ``n_slots - 1`` is the last shown item; missing slots are 0).

    Returns:
        float32 numpy arrays, samples in tree order: ``hidden`` ``(S, d_llm)`` last-layer
        state at the out token (as ``forward_batch``); ``out_layers`` ``(S, len(layers),
        d_llm)``; ``slots`` ``(S, n_slots, len(layers), d_llm)``; ``n_slots`` int64 ``(S,)``
        real slots per sample.

    Raises:
        InputError: a layer outside ``1..n_layers``; the device ran out of memory.
    """
    n_layers = num_layers(llm)
    for l in layers:
        if not 1 <= int(l) <= n_layers:
            raise InputError(f"--readout-layers: layer {l} outside 1..{n_layers} of {llm.name}")
    dev = soft_table.device
    b, lmax = len(batch), max(len(t) for t in batch)
    ids = torch.zeros((b, lmax), dtype=torch.long)
    pos = torch.zeros((b, lmax), dtype=torch.long)
    rows, cols, items, out_r, out_c = [], [], [], [], []
    for i, t in enumerate(batch):
        ids[i, : len(t)] = torch.from_numpy(t.ids)
        pos[i, : len(t)] = torch.from_numpy(t.pos)
        rows.append(np.full(len(t.soft_pos), i))
        cols.append(t.soft_pos)
        items.append(t.soft_items)
        out_r.append(np.full(len(t.out_pos), i))
        out_c.append(t.out_pos)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    rows_t, cols_t, items_t, out_r, out_c = (to_device(x, dev) for x in
                                             (cat(rows), cat(cols), cat(items), cat(out_r), cat(out_c)))
    mask = to_device(tree_mask(batch, soft_table.dtype), dev)
    ids, pos = to_device(ids, dev), to_device(pos, dev)
    try:
        with torch.inference_mode():
            emb = llm.decoder.embed_tokens if hasattr(llm.decoder, "embed_tokens") \
                else llm.decoder.get_input_embeddings()
            x = emb(ids)
            x[rows_t, cols_t] = soft_table[items_t]
            x[out_r, out_c] = out_vec
            o = llm.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False,
                            output_hidden_states=bool(layers))
            last = o.last_hidden_state
            hidden = last[out_r, out_c].float().cpu().numpy()
            n_s = len(hidden)
            d = last.shape[-1]
            out_layers = np.zeros((n_s, len(layers), d), dtype=np.float32)
            slots = np.zeros((n_s, n_slots, len(layers), d), dtype=np.float32)
            counts = np.zeros(n_s, dtype=np.int64)
            if layers:
                hs = [last if int(l) == n_layers else o.hidden_states[int(l)] for l in layers]
                stack = torch.stack(hs, dim=2)  # (B, L, n_layers_read, d)
                out_layers[:] = stack[out_r, out_c].float().cpu().numpy()
                k = 0
                for i, t in enumerate(batch):
                    for sp in t.slot_pos:
                        sp = sp[-n_slots:] if n_slots else sp[:0]
                        counts[k] = len(sp)
                        if len(sp):
                            slots[k, n_slots - len(sp):] = stack[i, torch.from_numpy(sp).to(dev)].float().cpu().numpy()
                        k += 1
            return {"hidden": hidden, "out_layers": out_layers, "slots": slots, "n_slots": counts}
    except torch.OutOfMemoryError as e:
        raise InputError(f"a batch of {b} x {lmax} tokens does not fit on {dev}; lower --batch-tokens") from e


def tree_token_counts(trees: list[TreePrompt], naive_lengths: list[int]) -> dict[str, int]:
    """Tokens a tree precompute runs against one forward per sample: ``{"tree", "naive"}``."""
    return {"tree": int(sum(len(t) for t in trees)), "naive": int(sum(naive_lengths))}
