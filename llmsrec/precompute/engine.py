"""The batched frozen forward: tokenized prompts -> last-layer state at the out token.

Prompts are right-padded. Because the LLM is causal, a real token never attends to a
later position, so the padding after a prompt cannot change its states; the attention
mask is passed as well (it also keeps padding keys out of any non-causal kernel path).
The state is read at the real ``[UserOut]`` / ``[ItemOut]`` position of each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmsrec.devices import to_device
from llmsrec.errors import InputError
from llmsrec.precompute.llm import HISTORY_EMB, LoadedLLM
from llmsrec.precompute.prompts import Prompt


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as token ids plus where its soft tokens and out token sit.

    Attributes:
        ids: int64 ``(L,)`` token ids (the special tokens' ids are placeholders).
        soft_pos: int64 ``(n_soft,)`` positions of ``[HistoryEmb]``.
        soft_items: int64 ``(n_soft,)`` iids whose f_I(E_i) go there.
        out_pos: position of the out token (``[UserOut]`` or ``[ItemOut]``).
    """

    ids: np.ndarray
    soft_pos: np.ndarray
    soft_items: np.ndarray
    out_pos: int

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(llm: LoadedLLM, prompts: list[Prompt], out_token: str) -> list[TokenizedPrompt]:
    """Tokenize prompts and locate their special tokens.

    Raises:
        InputError: a prompt longer than the model's ``max_position_embeddings``, or whose
            ``[HistoryEmb]`` count does not match its soft items / lacks the out token.
    """
    if not prompts:
        return []
    enc = llm.tokenizer([p.text for p in prompts], add_special_tokens=True)["input_ids"]
    hid, oid = llm.token_ids[HISTORY_EMB], llm.token_ids[out_token]
    out = []
    for p, ids in zip(prompts, enc):
        ids = np.asarray(ids, dtype=np.int64)
        soft_pos = np.flatnonzero(ids == hid)
        outs = np.flatnonzero(ids == oid)
        if len(soft_pos) != len(p.soft_items) or len(outs) != 1:
            raise InputError(f"prompt has {len(soft_pos)} {HISTORY_EMB} tokens for "
                             f"{len(p.soft_items)} items and {len(outs)} {out_token}: "
                             f"{p.text[:80]!r}...")
        if len(ids) > llm.max_positions:
            raise InputError(f"{p.who or 'a prompt'}: its prompt has {len(ids):,} tokens, more than the "
                             f"model's {llm.max_positions:,} positions; {p.remedy}")
        out.append(TokenizedPrompt(ids, soft_pos, np.asarray(p.soft_items), int(outs[0])))
    return out


def make_batches(lengths: np.ndarray, order: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Split ``order`` (indices, ideally sorted by length) into consecutive batches whose
    padded size ``len(batch) * max_len`` stays within ``batch_tokens`` (a prompt longer
    than the budget runs alone)."""
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, int(lengths[i]))
        if cur and m * (len(cur) + 1) > batch_tokens:
            batches.append(np.asarray(cur))
            cur, m = [], int(lengths[i])
        cur.append(int(i))
        cur_max = m
    if cur:
        batches.append(np.asarray(cur))
    return batches


def pack_batch(batch: list[TokenizedPrompt]):
    """Right-pad a batch: ``ids``, ``mask`` int64 ``(B, L)``; the ``[HistoryEmb]`` slots as
    ``rows``, ``cols`` (positions) and ``items`` (iids), int64 ``(n_soft,)``; ``out_pos``
    int64 ``(B,)``."""
    b, lmax = len(batch), max(len(p) for p in batch)
    ids = torch.zeros((b, lmax), dtype=torch.long)
    mask = torch.zeros((b, lmax), dtype=torch.long)
    rows, cols, items = [], [], []
    out_pos = torch.empty(b, dtype=torch.long)
    for k, p in enumerate(batch):
        ids[k, : len(p)] = torch.from_numpy(p.ids)
        mask[k, : len(p)] = 1
        rows.append(np.full(len(p.soft_pos), k))
        cols.append(p.soft_pos)
        items.append(p.soft_items)
        out_pos[k] = p.out_pos
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    return ids, mask, cat(rows), cat(cols), cat(items), out_pos


def forward_batch(llm: LoadedLLM, batch: list[TokenizedPrompt], soft_table: torch.Tensor,
                  out_vec: torch.Tensor, *, attention_mask: bool = True) -> torch.Tensor:
    """Run the frozen base model on a right-padded batch.

    Args:
        llm: the loaded model.
        batch: B tokenized prompts.
        soft_table: ``(N+1, d_llm)`` f_I(E) on the model's device/dtype; row i replaces
            each ``[HistoryEmb]`` standing for item i.
        out_vec: ``(d_llm,)`` input embedding of the out token.
        attention_mask: pass the padding mask (not needed for correctness with right
            padding under a causal mask, see the module docstring).

    Returns:
        float32 CPU ``(B, d_llm)``: last-layer state (after the final norm) at each
        prompt's out token.

    Raises:
        InputError: the device ran out of memory for this batch (lower --batch-tokens).
    """
    dev = soft_table.device
    ids, mask, rows_t, cols_t, items_t, out_pos = pack_batch(batch)
    b, lmax = ids.shape
    # one copy per tensor; on CUDA from pinned memory, non-blocking (llmsrec.devices.to_device)
    ids, mask, rows_t, cols_t, items_t, out_pos, ar = (
        to_device(t, dev) for t in (ids, mask, rows_t, cols_t, items_t, out_pos, torch.arange(b)))
    try:
        with torch.inference_mode():
            x = llm.decoder.embed_tokens(ids) if hasattr(llm.decoder, "embed_tokens") \
                else llm.decoder.get_input_embeddings()(ids)
            x[rows_t, cols_t] = soft_table[items_t]
            x[ar, out_pos] = out_vec
            h = llm.decoder(inputs_embeds=x,
                            attention_mask=mask if attention_mask else None,
                            use_cache=False).last_hidden_state
            return h[ar, out_pos].float().cpu()
    except torch.OutOfMemoryError as e:
        raise InputError(f"a batch of {b} x {lmax} tokens does not fit on {dev}; "
                         f"lower --batch-tokens") from e
