"""Derives the OpenAPI schemas our manifest tests validate against from KubeRay's CRDs.

    python k8s/derive_schemas.py ../shared/kuberay-crds

writes k8s/schemas/<kind>.v1.json.gz: the `openAPIV3Schema` of the CRD's v1 version, as
published (KubeRay commit feeaf72, 2026-08-19), so that tests also run outside our CI, where
the CRDs are not next to the checkout. Strictness is added by the test, not stored here.
"""

import gzip
import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "schemas"


def v1_schema(crd_path: Path) -> tuple[str, dict]:
    crd = yaml.safe_load(crd_path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def main(crd_dir: str) -> None:
    OUT.mkdir(exist_ok=True)
    for path in sorted(Path(crd_dir).glob("ray.io_*.yaml")):
        kind, schema = v1_schema(path)
        target = OUT / f"{kind}.v1.json.gz"
        with gzip.open(target, "wt") as f:
            json.dump(schema, f, sort_keys=True)
        print(f"{path.name} -> {target.relative_to(OUT.parent.parent)} ({target.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/kuberay-crds")
