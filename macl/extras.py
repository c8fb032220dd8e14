"""Optional dependencies ("extras") of the `macl` distribution and the one-line error when one is missing.

`pip install macl` brings torch and numpy: the losses (`macl_kernels`), the kernels and the core API. The rest:

    macl[medical]      monai, nibabel, scipy, tqdm       data readers, pre-training, fine-tuning, evaluation, CLI
    macl[demo]         matplotlib                        the demo's plots
    macl[tensorboard]  tensorboard                       `--tensorboard` logging
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Tuple

#: extra -> the import names it provides
EXTRAS: Dict[str, Tuple[str, ...]] = {
    "medical": ("monai", "nibabel", "scipy", "tqdm"),
    "demo": ("matplotlib",),
    "tensorboard": ("tensorboard",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def missing(extra: str) -> List[str]:
    """The import names of `extra` that are not importable here (empty when the extra is complete)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def message(extra: str, names, what: str = "this") -> str:
    names = ", ".join(names)
    return f"{what} needs the {extra} extra (missing: {names}): pip install \"macl[{extra}]\""


def require(extra: str, what: str = "this") -> None:
    """Raise MissingExtraError (one line naming the extra) unless every package of `extra` is importable."""
    gone = missing(extra)
    if gone:
        raise MissingExtraError(message(extra, gone, what))


def import_module(name: str, extra: str, what: str = "this"):
    """`importlib.import_module(name)`, or MissingExtraError naming `extra` when its top package is absent."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = (e.name or name).split(".")[0]
        if top != name.split(".")[0]:
            raise
        raise MissingExtraError(message(extra, [top], what)) from None


#: CLI command -> the extras it needs (checked before its --help, so the help of a command that cannot run here
#: says what to install)
COMMAND_EXTRAS: Dict[str, Tuple[str, ...]] = {
    "pretrain": ("medical",), "finetune": ("medical",), "evaluate": ("medical",), "predict": ("medical",),
    "train-semi": ("medical",), "demo": ("medical",),  # demo: plots are optional (skipped without matplotlib)
}


def command_problem(command: str) -> "str | None":
    """One line saying which extra `macl COMMAND` lacks here, or None when it can run."""
    for extra in COMMAND_EXTRAS.get(command, ()):
        gone = missing(extra)
        if gone:
            return message(extra, gone, f"macl {command}")
    return None
