"""Pod Security Standard "restricted": non-root, no privilege escalation, no capabilities, RuntimeDefault
seccomp, a read-only root filesystem (caches go to the workspace, scratch to /tmp), and no API token: the stage
programs never talk to the Kubernetes API."""

from __future__ import annotations

from ..context import BuildContext, StageObjects

UID = 1000


def apply(ctx: BuildContext, objs: StageObjects) -> None:
    pod = objs.pod
    pod["automountServiceAccountToken"] = False
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod["containers"]:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
