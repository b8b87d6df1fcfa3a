"""Device names of the CLI (``cpu``, ``cuda``, ``cuda:N``, ``hpu``) -> torch devices.

Habana (``habana_frameworks``) is imported only for ``hpu`` and only inside the functions
here, so CPU and CUDA users never import it. torch too is imported inside the functions: the
CLI imports this module at startup.
"""

from __future__ import annotations

import os

from llmsrec.errors import InputError


def prepare_hpu() -> None:
    """Import the Gaudi PyTorch bridge (``habana_frameworks.torch.core``) for ``--device hpu``.

    Before the first import, ``PT_HPU_LAZY_MODE`` defaults to ``1`` (lazy mode: ops are
    accumulated into graphs that the Gaudi graph compiler optimises, the mode optimum-habana
    runs text models in and the one HPU Graphs need); a value already in the environment
    is kept (``PT_HPU_LAZY_MODE=0`` = eager mode).

    Raises:
        InputError: habana_frameworks is not installed.
    """
    os.environ.setdefault("PT_HPU_LAZY_MODE", "1")
    try:
        import habana_frameworks.torch.core  # noqa: F401  (deferred: optional, Gaudi only)
    except ImportError as e:
        raise InputError("--device hpu: habana_frameworks is not installed "
                         "(pip install 'llmsrec[gaudi]' on a Gaudi machine)") from e


def hpu_lazy_mode() -> bool:
    """True when the Gaudi bridge runs in lazy mode (``PT_HPU_LAZY_MODE`` is not ``0``)."""
    return os.environ.get("PT_HPU_LAZY_MODE", "1") != "0"


def mark_step(device) -> None:
    """Gaudi lazy mode: execute the ops accumulated so far (``htcore.mark_step``); no-op elsewhere."""
    if getattr(device, "type", str(device).split(":")[0]) == "hpu" and hpu_lazy_mode():
        import habana_frameworks.torch.core as htcore  # deferred: optional, Gaudi only

        htcore.mark_step()


def resolve_device(device: str):
    """``cpu|cuda|cuda:N|hpu`` -> ``torch.device``.

    Raises:
        InputError: an unknown name, or a device this torch build / machine lacks
            (checked before any work starts, so a typo costs nothing).
    """
    import torch  # deferred: torch

    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available in this torch build")
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise InputError(f"--device {device}: {e}") from None
    if device == "hpu":
        prepare_hpu()
        return torch.device("hpu")
    raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or hpu")


def to_device(tensor, device):
    """Copy a CPU batch tensor to ``device``; on CUDA through pinned memory, non-blocking.

    Page-locked (pinned) host memory lets the copy run as DMA, overlapped with queued GPU
    work; ``non_blocking`` is safe because torch's pinned-memory allocator keeps the staging
    buffer alive until the copy has finished. Other devices: a plain ``.to(device)``.
    """
    import torch  # deferred: torch

    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
