"""Other segmentation systems run under dualssl's protocol (Ray-free).

A peer arm trains and predicts with its own code on exactly a cell's split, and its predictions are
scored by ``dualssl.evaluation`` like every other arm's. One module per system:

* :mod:`dualssl.peers.nnunet`: nnU-Net v2 (``nnunet``: its default trainer; ``nnunet-da5``:
  ``nnUNetTrainerDA5``), driven through its Python API. Needs the optional extra ``nnunet``.
"""

from __future__ import annotations

PEERS: tuple[str, ...] = ("nnunet", "nnunet-da5")
"""Names a study arm's ``study.peer`` may take."""

INSTALL_HINT = ('pip install -e ".[nnunet]" "torch==$(python -c \'import torch; print(torch.__version__)\')"'
                "   (the extra pins nnunetv2; naming the installed torch keeps it)")
"""The command that adds nnU-Net v2 to an environment without replacing its torch."""


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run in this Python (None when it can): unknown name or package missing."""
    if peer not in PEERS:
        return f"unknown peer system {peer!r}; known: {', '.join(PEERS)}"
    from dualssl.peers.nnunet import import_error

    error = import_error()
    if error is None:
        return None
    return f"arm {peer} runs nnU-Net v2, which is not importable here ({error}); install it with: {INSTALL_HINT}"
