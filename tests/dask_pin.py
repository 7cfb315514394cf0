"""A Dask scheduler preload for tests/test_machines.py: pins tasks to workers by name.

`dask scheduler --preload tests/dask_pin.py` with PTQFLOW_PIN="quantize_task=a,*=b" lets
tasks whose key starts with `quantize_task` (prefect-dask names a task's key after its
function) run only on the worker named `a`, and every other task only on `b`. The plugin
keeps, for each task that finished, its prefix and the name of the worker that ran it
(`ran`), for the test to read with `Client.run_on_scheduler`.
"""

from __future__ import annotations

import os

from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin

NAME = "ptqflow-pin"


class Pin(SchedulerPlugin):
    name = NAME

    def __init__(self, rules: dict[str, str]):
        self.rules = rules
        self.ran: list[tuple[str, str]] = []
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def update_graph(self, scheduler, *, tasks, **kwargs) -> None:
        # called before the new tasks are given to any worker
        address = {ws.name: addr for addr, ws in scheduler.workers.items()}
        for key in tasks:
            ts = scheduler.tasks.get(key)
            where = self.rules.get(key_split(key), self.rules.get("*"))
            if ts is not None and where is not None and ts.state in ("released", "waiting"):
                ts.worker_restrictions = {address[where]}
                ts.loose_restrictions = False

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "memory" and "worker" in kwargs:
            ws = self.scheduler.workers.get(kwargs["worker"])
            self.ran.append((key_split(key), ws.name if ws else kwargs["worker"]))


def dask_setup(scheduler) -> None:
    spec = os.environ.get("PTQFLOW_PIN", "")
    rules = dict(part.split("=", 1) for part in spec.split(",") if part)
    scheduler.add_plugin(Pin(rules))
