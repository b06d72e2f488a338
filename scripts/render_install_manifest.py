"""Write deploy/finetune-operator.yaml: the chart with its default values, as one file for `kubectl apply`.

For clusters installed without Helm. It is the Helm chart rendered by the real Helm engine (helm-python-sdk, from
the test extra), preceded by the Namespace and the CRDs; a test fails when it is out of date.
Run: python scripts/render_install_manifest.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "finetune-operator"
OUTPUT = REPO / "deploy" / "finetune-operator.yaml"
RELEASE, NAMESPACE = "finetune-operator", "finetune-system"
ORDER = ["CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
         "RoleBinding", "Service", "Deployment"]  # fmt: skip


def render() -> str:
    rendered = helm_python.Chart.load(CHART).render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for path in sorted((CHART / "crds").glob("*.yaml")):
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    objects.sort(key=lambda o: ORDER.index(o["kind"]) if o["kind"] in ORDER else len(ORDER))
    header = (
        "# finetune-operator, installed without Helm: kubectl apply --server-side -f deploy/finetune-operator.yaml\n"
        "# Generated from charts/finetune-operator with its default values by scripts/render_install_manifest.py;\n"
        "# do not edit. For other values (namespaces to watch, replicas, trainer image) use the chart.\n"
    )
    return header + yaml.safe_dump_all(objects, sort_keys=False)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python scripts/render_install_manifest.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
