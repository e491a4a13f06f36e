"""The load-balancer extension point: ``LoadBalancer.select(workers, task) -> worker | None``.

A balancer only chooses.  The router hands it the candidates (online workers that support the
task's type and have a free slot) and reserves the slot on the one it picks; a balancer never
does I/O.  A balancer whose choice depends on earlier choices (a rotation, an assignment) also
describes itself as a ``SharedPlan`` (``shared_plan``): the router then keeps that state in
Redis for the whole cluster (``routing/shared.py``), and ``select`` with in-process state is the
fallback (``scheduler.load_balance_state: local``).  Third-party balancers register under the
``celery_ext.balancers`` entry-point group or are named by ``module:Class`` in
``scheduler.load_balance_strategy``; their settings come from ``scheduler.load_balance_config``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from celery_ext.config import validate_section
from celery_ext.routing.workers import WorkerInfo

if TYPE_CHECKING:
    from celery_ext.routing.shared import SharedPlan


class BalancerSettings(BaseModel):
    """Settings of a balancer (none by default); subclass to add fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class RoutedTask:
    """What a balancer may look at to place one task."""

    task_type: str
    task_id: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    priority: int | None = None


class LoadBalancer(abc.ABC):
    """Chooses the worker that runs a task.  Called under the router's lock: no thread safety
    needed inside ``select``."""

    name: ClassVar[str] = ""
    settings_model: ClassVar[type[BalancerSettings]] = BalancerSettings

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.settings_model()
        # {"strategy": name, "config": settings} when built from config (router.balancer_from)
        self.spec: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], path: str = "scheduler.load_balance_config") -> LoadBalancer:
        return cls(validate_section(cls.settings_model, config, path))

    @abc.abstractmethod
    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        """Pick one of ``workers`` (never empty when called) or None to leave the task in its
        type's shared queue."""

    def shared_plan(self, pool: Sequence[WorkerInfo], task_type: str) -> SharedPlan | None:
        """This strategy as cluster-shared state over ``pool`` (every online worker of the type,
        full or not), or None (the default) when ``select`` needs no state beyond the registry's
        loads.  Called once per change of the pool, not per decision."""
        return None

    @property
    def state_name(self) -> str:
        """Names this strategy's shared state (``<name>|<task type>``)."""
        return self.name or f"{type(self).__module__}:{type(self).__qualname__}"

    def startup(self) -> None:  # noqa: B027 - optional hook
        """Called once before the first ``select``."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Called when the balancer is replaced or the process stops."""
