"""Device names of the CLI (``cpu``, ``cuda``, ``cuda:N``, ``hpu``) -> torch devices."""

from __future__ import annotations

from llmsrec.errors import InputError


def resolve_device(device: str):
    """``cpu|cuda|cuda:N|hpu`` -> ``torch.device``.

    Raises:
        InputError: an unknown name, or a device this torch build / machine lacks
            (checked before any work starts, so a typo costs nothing).
    """
    import torch

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
        try:
            import habana_frameworks.torch.core  # noqa: F401
        except ImportError as e:
            raise InputError("--device hpu: habana_frameworks is not installed") from e
        return torch.device("hpu")
    raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or hpu")
