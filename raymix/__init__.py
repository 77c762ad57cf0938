"""raymix: self-supervised vision encoders trained with similarity-modelling contrastive
methods, with hyperparameters searched on Ray. ``import raymix`` does not import Ray or torch.

The Python API (see :mod:`raymix.api`)::

    import raymix

    result = raymix.fit("launch/experiments/digits.yaml", {"training.epochs": 2})
    print(result.metrics["knn_top1"], result.output_dir)

    board = raymix.tune("search_spaces/quickstart.yaml", num_samples=4)
    print(board.format())

:func:`fit`, :func:`tune`, :class:`FitResult` and :func:`resolve_config` are loaded on
first use (module ``__getattr__``), so importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["FitResult", "fit", "resolve_config", "tune"]

if TYPE_CHECKING:
    from raymix.api import FitResult, fit, resolve_config, tune


def __getattr__(name: str) -> Any:
    if name in __all__:
        from raymix import api

        return getattr(api, name)
    raise AttributeError(f"module 'raymix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
