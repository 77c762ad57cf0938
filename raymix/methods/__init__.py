"""Methods registry: one file per method, one line here."""

from __future__ import annotations

from raymix.config import Config
from raymix.methods.base import ContrastiveMethod
from raymix.methods.moco import MoCo
from raymix.methods.patchmix import PatchMix
from raymix.methods.snclr import SNCLR
from raymix.methods.unmix import UnMix

METHODS: dict[str, type[ContrastiveMethod]] = {
    "moco": MoCo,
    "patchmix": PatchMix,
    "unmix": UnMix,
    "snclr": SNCLR,
}


def build_method(cfg: Config) -> ContrastiveMethod:
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "ContrastiveMethod", "build_method"]
