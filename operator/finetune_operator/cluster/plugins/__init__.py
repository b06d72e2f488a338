"""Cross-cutting concerns of the stage Jobs, one module each, applied in order over the base Job.

A plugin is `apply(ctx, objects) -> None`: it edits the freshly built objects of one stage (the Job and the
extra objects) and may add objects. A new scheduler integration or stage option is one new module listed here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..context import BuildContext, StageObjects
from . import credentials, failure, kueue, rendezvous, resources, scheduling, security, storage, volcano

Plugin = Callable[[BuildContext, StageObjects], None]

PLUGINS: list[Plugin] = [
    failure.apply,
    security.apply,
    resources.apply,
    storage.apply,
    credentials.apply,
    scheduling.apply,
    rendezvous.apply,
    kueue.apply,
    volcano.apply,
]
