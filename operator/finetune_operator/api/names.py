"""What a FineTuneJob's `metadata.name` must be so that every child object named after it is valid.

The operator names the children of a job NAME after it: the stage Jobs and the train Service `NAME-<stage>`, the
stage ConfigMaps `NAME-<stage>-config`, the created workspace PVC `NAME-workspace`, and the Indexed train pods
get the hostnames `NAME-train-<index>`. A Service name and a hostname must be a DNS-1035 label: at most 63
characters, lower-case letters, digits and '-', starting with a letter (so no leading digit, no dot).
"""

from __future__ import annotations

from .base import cel
from .spec import STAGES, ResourcesSpec

DNS_LABEL_MAX = 63
DNS_1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def _max_workers() -> int:
    field = ResourcesSpec.model_fields["workers"]
    return next(int(m.le) for m in field.metadata if getattr(m, "le", None) is not None)


def child_name_suffixes() -> list[str]:
    """Every suffix the operator appends to the job's name, longest last."""
    suffixes = [f"-{stage}" for stage in STAGES]
    suffixes += [f"-{stage}-config" for stage in STAGES]
    suffixes += ["-workspace", f"-train-{_max_workers() - 1}"]
    return sorted(suffixes, key=len)


LONGEST_SUFFIX = child_name_suffixes()[-1]
MAX_NAME_LENGTH = DNS_LABEL_MAX - len(LONGEST_SUFFIX)

NAME_FORMAT_MESSAGE = (
    "metadata.name must start with a lower-case letter and hold only lower-case letters, digits and '-' "
    "(no dots): the train Service and the training pods' hostnames are named after it, and Kubernetes allows "
    "only DNS-1035 labels there"
)
NAME_LENGTH_MESSAGE = (
    f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the job's children are named after it with "
    f"suffixes of up to {len(LONGEST_SUFFIX)} characters (e.g. NAME{LONGEST_SUFFIX}), and Kubernetes allows "
    f"{DNS_LABEL_MAX} at most"
)


def name_rules() -> list[dict]:
    """CEL rules on the root object (the only place a CRD may check metadata.name)."""
    return [
        cel(f"self.metadata.name.matches('{DNS_1035_LABEL_PATTERN}')", NAME_FORMAT_MESSAGE, ".metadata.name"),
        cel(f"size(self.metadata.name) <= {MAX_NAME_LENGTH}", NAME_LENGTH_MESSAGE, ".metadata.name"),
    ]
