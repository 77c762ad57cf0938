"""Methods registry: one file per method, one line here."""

from __future__ import annotations

from raymix.config import Config
from raymix.methods.base import ContrastiveMethod, Method
from raymix.methods.moco import MoCo
from raymix.methods.patchmix import PatchMix
from raymix.methods.selfcon import SelfCon
from raymix.methods.snclr import SNCLR
from raymix.methods.unmix import UnMix

METHODS: dict[str, type[Method]] = {
    "moco": MoCo,
    "patchmix": PatchMix,
    "unmix": UnMix,
    "snclr": SNCLR,
    "selfcon": SelfCon,
}


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "ContrastiveMethod", "Method", "build_method"]
