"""A sweep's Optuna study: where it is stored, its sampler, and a searcher that tells it the truth.

The study is named after the sweep and lives in ``searcher.storage`` (or ``raymix tune
--optuna-storage``):

- null (the default): a journal file ``<sweep folder>/optuna.journal``; for sweep folders on
  s3:// and other URIs, Optuna's in-memory storage (nothing for optuna-dashboard to open);
- an RDB URL (``sqlite:///optuna.db``, ``postgresql://user@host/db``): one database for
  many sweeps, each its own study;
- a local path: a journal file there;
- ``memory``: in memory only.

Relative paths (and relative ``sqlite:///`` files) are taken from the current directory, as
``storage_path`` is. ``optuna-dashboard <journal file or RDB URL>`` browses a running sweep.

:class:`StudySearch` is Ray's ``OptunaSearch`` with two corrections for ASHA sweeps: every
evaluated epoch is an intermediate value of the Optuna trial (``step = epoch``; single
objective only, as Optuna has none for several objectives), and a trial that ends before
``training.epochs`` (the scheduler stopped it) is told ``PRUNED`` (its value: the last
intermediate one), not ``COMPLETE``. Full-length trials are ``COMPLETE`` with their final
values; failed trials ``FAIL``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from pydantic import ValidationError
from ray.tune.search.optuna import OptunaSearch

from raymix.engine.loop import fresh
from raymix.integrations.cluster import redact_uri
from raymix.integrations.plan import Sweep
from raymix.integrations.search_space import JOURNAL_FILE, MEMORY_STORAGE, Searcher, SearchSpaceError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- storage


def normalise(storage: str) -> str:
    """A storage setting with relative paths made absolute (``memory`` and URLs of servers unchanged)."""
    if storage == MEMORY_STORAGE:
        return storage
    prefix = "sqlite:///"
    if storage.startswith(prefix):
        path = storage[len(prefix) :]
        if path and not path.startswith("/") and path != ":memory:":
            return prefix + str(Path(path).expanduser().resolve())
        return storage
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def with_storage(sweep: Sweep, storage: str | None) -> Sweep:
    """The sweep with ``storage`` (``--optuna-storage``) as its study's storage, paths made absolute."""
    given = storage if storage is not None else sweep.space.searcher.storage
    if given is None:
        return sweep
    try:
        searcher = Searcher.model_validate({**sweep.space.searcher.model_dump(), "storage": given})
    except ValidationError as exc:
        why = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        key = "--optuna-storage" if storage is not None else "searcher.storage"
        raise SearchSpaceError(f"{key} {redact_uri(given)!r}: {why}") from None
    searcher = searcher.model_copy(update={"storage": normalise(given)})
    space = sweep.space.model_copy(update={"searcher": searcher})
    return dataclasses.replace(sweep, space=space)


def location(sweep: Sweep) -> str | None:
    """Where the study lives: a journal file's absolute path, an RDB URL, or None (in memory)."""
    given = sweep.space.searcher.storage
    if given is None:
        return None if "://" in sweep.path else f"{sweep.path.rstrip('/')}/{JOURNAL_FILE}"
    given = normalise(given)
    return None if given == MEMORY_STORAGE else given


def describe(sweep: Sweep) -> str:
    """One line for the sweep's log: where the study is and how to browse it."""
    where = location(sweep)
    if where is None:
        why = (
            "searcher.storage: memory"
            if sweep.space.searcher.storage
            else f"the sweep folder {sweep.path} is not local: set searcher.storage or --optuna-storage"
        )
        return f"Optuna study {sweep.name!r} in memory only ({why})"
    shown = redact_uri(where)
    return f"Optuna study {sweep.name!r} in {shown}: browse it with optuna-dashboard {shown}"


def open_storage(where: str | None) -> BaseStorage | None:
    """Optuna's storage at ``where`` (see :func:`location`); None: in memory.

    Raises :class:`SearchSpaceError` when it cannot be opened (a database that does not
    answer, a driver that is not installed, a folder that cannot be written).
    """
    if where is None:
        return None
    try:
        if "://" in where:
            return RDBStorage(where)
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(where))
    except Exception as exc:  # SQLAlchemy, drivers and the file system raise many kinds
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        shown, why = redact_uri(where), redact_uri(why)[:300]
        raise SearchSpaceError(
            f"searcher.storage {shown}: the Optuna storage cannot be opened: {why}"
        ) from None


def new_study_storage(sweep: Sweep) -> BaseStorage | None:
    """The storage of a new sweep's study; refuses one that holds a study of that name already."""
    where = location(sweep)
    storage = open_storage(where)
    if storage is not None and sweep.name in optuna.study.get_all_study_names(storage):
        shown = redact_uri(where or "")
        raise SearchSpaceError(
            f"searcher.storage {shown} holds a study named {sweep.name!r} already (another sweep of that "
            f"name): start this one with --name NEW, or delete the study: "
            f"optuna delete-study --study-name {sweep.name} --storage {shown}"
        )
    return storage


def sampler(s: Searcher) -> BaseSampler:
    if s.type == "tpe":  # TPE handles one objective or several
        with warnings.catch_warnings():  # group and constant_liar are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return TPESampler(
                seed=s.seed, multivariate=s.multivariate, n_startup_trials=s.n_startup_trials,
                group=s.group, constant_liar=s.constant_liar,
            )  # fmt: skip
    if s.type == "nsga2":
        return NSGAIISampler(seed=s.seed, population_size=s.population_size)
    return RandomSampler(seed=s.seed)


# ---------------------------------------------------------------- the searcher


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records intermediate values and tells scheduler-stopped trials PRUNED.

    ``epochs``: the trials' ``training.epochs``; a trial whose last result is at an earlier
    epoch was stopped by the scheduler (ASHA, or its ``max_t``). Tune calls
    ``on_trial_result`` for every result but the one it stops a trial at, which
    ``on_trial_complete`` receives.
    """

    def __init__(self, *args: Any, epochs: int, **kwargs: Any) -> None:
        self._epochs = epochs
        self._steps: dict[str, int] = {}  # trial_id -> the last epoch reported to Optuna
        super().__init__(*args, **kwargs)

    @property
    def single(self) -> bool:
        return not isinstance(self.metric, list)

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        """The result's metric as the Optuna trial's intermediate value at ``step = epoch``,
        when it was measured at that epoch (not repeated from an earlier evaluation)."""
        ot_trial = self._ot_trials.get(trial_id)
        value = fresh(result).get(self.metric)
        epoch = result.get("epoch")
        if ot_trial is None or epoch is None or isinstance(value, bool) or not isinstance(value, int | float):
            return
        epoch = int(epoch)
        if epoch <= self._steps.get(trial_id, 0):
            return  # reported before (a retried trial, a resumed driver)
        ot_trial.report(float(value), epoch)
        self._steps[trial_id] = epoch

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.single and trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        if self.single:
            self._report(trial_id, result)
        if int(result.get("epoch", 0)) >= self._epochs:
            super().on_trial_complete(trial_id, result=result, error=error)  # COMPLETE, final values
            return
        try:  # stopped early: PRUNED, valued (single objective) by its last intermediate value
            assert self._ot_study is not None
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # as OptunaSearch: a study that refuses is not the sweep's failure
            logger.warning(exc)
        self._completed_trials.add(trial_id)
