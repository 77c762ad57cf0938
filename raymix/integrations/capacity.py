"""How many trials a Ray cluster holds at once: now, and at most once its autoscaler has
added every node it may add.

A sweep's concurrency limit (``max_concurrent_trials``) is computed against the cluster's
**maximum**, so on an autoscaling cluster whose GPU workers start at ``min_workers: 0``
(``launch/cluster.yaml``) a GPU sweep is neither refused nor capped by the empty snapshot
at start: Tune queues the trials that do not fit yet, and their pending resource requests
are what make the autoscaler add nodes. Only a trial that can never fit (no node type
holds one of its bundles, or more than the cluster may ever have in total) is refused.

Where the maximum comes from, first found wins:

1. ``RAYMIX_AUTOSCALER_CONFIG``: a cluster-launcher YAML (``available_node_types`` with
   ``resources`` and ``max_workers``, the global ``max_workers``, ``head_node_type``);
2. the cluster configuration the autoscaler reports to Ray's GCS (node groups with their
   resources and ``max_count``; read with Ray's ``ray._private.state``, the call Ray Train
   itself makes for the same check, guarded: no answer means unknown);
3. ``~/ray_bootstrap_config.yaml`` when joining a cluster (``RAY_ADDRESS``): the file the
   cluster launcher (``ray up``) writes on the head, with the node types' CPUs and GPUs
   filled in; a job's driver runs on the head;
4. else no autoscaler is known: the nodes alive now are the maximum.

The computations (:func:`holds`, :func:`plan`) take plain resource dicts and need no Ray.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymix.config import ConfigError

AUTOSCALER_CONFIG_ENV = "RAYMIX_AUTOSCALER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` writes on the head
DEFAULT_MAX_WORKERS = 2  # the cluster launcher's default global max_workers
EPS = 1e-9
KINDS = ("CPU", "GPU")  # the resources a trial reserves

Resources = Mapping[str, float]


@dataclass(frozen=True)
class NodeGroup:
    """``count`` nodes (None: no limit of their own) with ``resources`` each; ``capped``:
    they count against the cluster's ``max_nodes`` (a launcher's workers, not its head)."""

    resources: dict[str, float]
    count: int | None = 1
    name: str = ""
    capped: bool = True


@dataclass(frozen=True)
class Cluster:
    """Nodes that exist now, or may exist at most."""

    groups: tuple[NodeGroup, ...]
    source: str = "the Ray cluster"
    max_nodes: int | None = None  # a cap on the nodes of all capped groups together
    max_resources: dict[str, float] = field(default_factory=dict)  # caps on totals, per kind
    autoscaling: bool = False

    @classmethod
    def of_nodes(cls, nodes: Iterable[Resources], source: str = "the Ray cluster") -> Cluster:
        """Live nodes, by their CPUs and GPUs (what trials reserve); alike nodes as one group."""
        alike = Counter(tuple(sorted((k, float(v)) for k, v in n.items() if k in KINDS)) for n in nodes)
        return cls(tuple(NodeGroup(dict(kinds), count) for kinds, count in alike.items()), source)

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            shown = ", ".join(f"{k} {v:g}" for k, v in sorted(g.resources.items()) if k in KINDS)
            many = "any" if g.count is None else g.count
            count = "" if g.count == 1 and not self.autoscaling else f" x{many}"
            parts.append(f"{g.name + ': ' if g.name else ''}{{{shown or 'no CPU/GPU'}}}{count}")
        return "; ".join(parts) or "no nodes"


@dataclass(frozen=True)
class Shape:
    """What one trial places: ``count`` bundles of ``bundle``, each on one node (a Ray Train
    worker, or the whole in-process trial), ``total`` over all of them."""

    bundle: dict[str, float]
    count: int
    total: dict[str, float]

    def describe(self) -> str:
        total = ", ".join(f"{k} {v:g}" for k, v in self.total.items() if v > 0)
        if self.count == 1:
            return f"{{{total}}} on one node"
        each = ", ".join(f"{k} {v:g}" for k, v in self.bundle.items() if v > 0)
        return f"{{{total}}}: {self.count} workers of {{{each}}}, each on one node"


def per_node(node: Resources, bundle: Resources) -> int:
    """How many ``bundle`` fit on one ``node``."""
    fits = [node.get(kind, 0.0) / amount for kind, amount in bundle.items() if amount > 0]
    return math.floor(min(fits) + EPS) if fits else 0


def holds(cluster: Cluster, shape: Shape) -> float:
    """How many trials of ``shape`` the cluster holds at once (``math.inf``: no limit).

    Bundles are packed node by node, node groups that hold the most first (up to the
    cluster's cap on nodes); the totals (each trial's ``total``, e.g. a Ray Train trial's
    driver) must fit the sum over the nodes as well.
    """
    ranked = sorted(cluster.groups, key=lambda g: per_node(g.resources, shape.bundle), reverse=True)
    nodes_left: float = math.inf if cluster.max_nodes is None else cluster.max_nodes
    slots = 0.0
    totals: dict[str, float] = {}
    for group in ranked:
        count: float = math.inf if group.count is None else group.count
        if group.capped:
            count = min(count, nodes_left)
            if nodes_left < math.inf:
                nodes_left -= count
        if count <= 0:
            continue
        if per_node(group.resources, shape.bundle):
            slots += count * per_node(group.resources, shape.bundle)
        for kind, amount in group.resources.items():
            if amount > 0:
                totals[kind] = totals.get(kind, 0.0) + count * amount
    for kind, cap in cluster.max_resources.items():
        totals[kind] = min(totals.get(kind, 0.0), cap)
    most = slots // shape.count if slots < math.inf else math.inf
    for kind, amount in shape.total.items():
        have = totals.get(kind, 0.0)
        if amount > 0 and have < math.inf:
            most = min(most, math.floor(have / amount + EPS))
    return most


@dataclass(frozen=True)
class Plan:
    limit: int  # max_concurrent_trials
    now: float  # trials the cluster holds now
    most: float  # trials it may hold at most
    source: str  # where the maximum came from
    autoscaling: bool = False  # the maximum is an autoscaler's (nodes may be added)


def plan(shape: Shape, now: Cluster, most: Cluster | None, *, explicit: int | None, num_samples: int) -> Plan:
    """The concurrency limit: ``explicit`` when given, else what the cluster's maximum holds
    (``most``, else ``now``), never more than ``num_samples``. Raises :class:`ConfigError`
    for a trial that can never fit."""
    reach = max(holds(now, shape), holds(most, shape) if most else 0.0)
    if reach < 1:
        seen = most or now
        lacks = [
            kind
            for kind, amount in shape.bundle.items()
            if amount > 0 and not any(g.resources.get(kind, 0.0) > 0 for g in seen.groups)
        ]
        if lacks:
            fix = f"no node has any {' or '.join(lacks)}"
            fix += ": set scaling.use_gpu=false" if "GPU" in lacks else ""
        else:
            fix = "lower scaling.cpus_per_worker, scaling.num_workers or gpus_per_trial"
        if not most:
            fix += f"; if an autoscaler can add such nodes, set {AUTOSCALER_CONFIG_ENV} to its cluster YAML"
        raise ConfigError(
            f"one trial needs {shape.describe()}, which no node can ever hold "
            f"({seen.source}: {seen.describe()}); {fix}"
        )
    wanted = explicit or (num_samples if reach == math.inf else int(reach))
    limit = max(1, min(wanted, num_samples))
    return Plan(limit, holds(now, shape), reach, most.source if most else now.source, most is not None)


# ---------------------------------------------------------------- where the maximum comes from


def from_launcher(raw: Any, source: str) -> Cluster:
    """A cluster-launcher YAML's node types: the head plus up to ``max_workers`` workers."""
    if not isinstance(raw, dict) or not isinstance(raw.get("available_node_types"), dict):
        raise ConfigError(f"{source}: expected a cluster YAML with available_node_types")
    head = raw.get("head_node_type")
    limit = raw.get("max_workers", DEFAULT_MAX_WORKERS)
    groups = []
    for name, node_type in raw["available_node_types"].items():
        node_type = node_type or {}
        resources = node_type.get("resources") or {}
        if not isinstance(resources, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in resources.values()
        ):
            raise ConfigError(f"{source}: available_node_types.{name}.resources: expected numbers")
        workers = node_type.get("max_workers", 0 if name == head else limit)
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ConfigError(f"{source}: available_node_types.{name}.max_workers: expected a count >= 0")
        if name == head:
            shown = str(name) if "head" in str(name) else f"{name} (head)"
            groups.append(NodeGroup({k: float(v) for k, v in resources.items()}, 1, shown, capped=False))
        if workers:
            groups.append(NodeGroup({k: float(v) for k, v in resources.items()}, workers, str(name)))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"{source}: max_workers: expected a count >= 0")
    return Cluster(tuple(groups), source, max_nodes=limit, autoscaling=True)


def from_cluster_config(config: Any, source: str = "the autoscaler's cluster config") -> Cluster | None:
    """Ray's ``autoscaler_pb2.ClusterConfig`` (node groups, ``max_count`` -1: unbounded)."""
    if config is None or not config.node_group_configs:
        return None
    groups = tuple(
        NodeGroup(
            {k: float(v) for k, v in g.resources.items()},
            None if g.max_count < 0 else int(g.max_count),
            g.name,
        )
        for g in config.node_group_configs
    )
    caps = {k: float(v) for k, v in config.max_resources.items()}
    return Cluster(groups, source, max_resources=caps, autoscaling=True)


def read_launcher(path: str | Path, source: str) -> Cluster:
    import yaml

    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {file} is not YAML: {str(exc).splitlines()[0]}") from None
    return from_launcher(raw, source)


def autoscaler_maximum(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster's maximum per the module's rules (Ray must be initialised); None: unknown."""
    environ = os.environ if environ is None else environ
    given = environ.get(AUTOSCALER_CONFIG_ENV)
    if given:
        return read_launcher(given, f"{AUTOSCALER_CONFIG_ENV}={given}")
    try:
        import ray._private.state  # the call Ray Train's worker group makes for its own check

        found = from_cluster_config(ray._private.state.state.get_cluster_config())
    except Exception:  # a private API: no answer is "unknown"
        found = None
    if found is not None:
        return found
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if environ.get("RAY_ADDRESS") and bootstrap.is_file():
        try:
            return read_launcher(bootstrap, f"the autoscaler's {BOOTSTRAP_CONFIG}")
        except ConfigError:
            return None
    return None


def live_nodes() -> Cluster:
    """The nodes alive now (Ray must be initialised)."""
    import ray

    return Cluster.of_nodes(node.get("Resources", {}) for node in ray.nodes() if node.get("Alive"))
