#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, one document at a time.

- Built-in kinds: against the Kubernetes JSON schemas of `kubernetes-validate`
  (strict: unknown fields fail), for each --kube-version given.
- Custom resources of a CRD given with --crd (e.g. ImageIndex): against that CRD's own
  openAPIV3Schema, with Python jsonschema. Strict as well: an object with declared
  properties rejects undeclared ones (the API server would silently prune them).
- monitoring.coreos.com/v1 (ServiceMonitor, PodMonitor): against the prometheus-operator
  models of `cloudcoil-models-prometheus-operator` (pydantic models generated from the
  prometheus-operator CRDs); a field that does not survive the model round trip is unknown.
- Anything else fails: no document is skipped silently.

Prints one line per document, `OK <kind>/<name>: <how>` or `FAIL <kind>/<name>: <why>`, and
exits 1 if any failed. Runs in the tools venv (scripts/setup.sh):
    $IMAGEINDEX_TOOLS/venv/bin/python tests/tools/validate_manifests.py \
        --kube-version 1.22.0 --crd crds/imageindex.yaml FILE...
"""

import argparse
import copy
import sys

import jsonschema
import kubernetes_validate
import yaml

MONITORING = "monitoring.coreos.com/v1"


def kube_schema_to_jsonschema(node):
    """An OpenAPI v3 structural schema as JSON Schema, strict about unknown fields."""
    if isinstance(node, list):
        return [kube_schema_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: kube_schema_to_jsonschema(v) for k, v in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "default"):
            continue
        else:
            out[key] = kube_schema_to_jsonschema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(paths):
    """(apiVersion, kind) -> (validator, crd name) for every served version of each CRD."""
    validators = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for crd in yaml.safe_load_all(f):
                if not crd:
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                    props = schema.setdefault("properties", {})
                    props.setdefault("apiVersion", {"type": "string"})
                    props.setdefault("kind", {"type": "string"})
                    props.setdefault("metadata", {"type": "object"})
                    js = kube_schema_to_jsonschema(schema)
                    jsonschema.Draft7Validator.check_schema(js)
                    validators[(f"{group}/{version['name']}", kind)] = (
                        jsonschema.Draft7Validator(js),
                        crd["metadata"]["name"],
                    )
    return validators


def validate_monitoring(doc):
    from cloudcoil.models.prometheus_operator import v1  # imported only when needed

    cls = getattr(v1, doc["kind"], None)
    if cls is None:
        raise ValueError(f"no prometheus-operator model for kind {doc['kind']}")
    model = cls.model_validate(doc)
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    lost = unknown_fields(doc, back)
    if lost:
        raise ValueError("unknown fields: " + ", ".join(lost))


def unknown_fields(original, kept, path=""):
    """Paths present in `original` but dropped from `kept` by the model."""
    lost = []
    if isinstance(original, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        for k, v in original.items():
            p = f"{path}.{k}"
            if k not in kept:
                lost.append(p)
            else:
                lost.extend(unknown_fields(v, kept[k], p))
    elif isinstance(original, list):
        if not isinstance(kept, list) or len(kept) != len(original):
            return [path]
        for i, (a, b) in enumerate(zip(original, kept)):
            lost.extend(unknown_fields(a, b, f"{path}[{i}]"))
    return lost


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", action="append", required=True)
    parser.add_argument("--crd", action="append", default=[])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    crds = load_crds(args.crd)
    failed = 0
    count = 0
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            count += 1
            api, kind = doc.get("apiVersion", "?"), doc.get("kind", "?")
            name = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
            try:
                if (api, kind) in crds:
                    validator, crd = crds[(api, kind)]
                    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
                    if errors:
                        raise ValueError(
                            "; ".join(
                                f"{'.'.join(str(p) for p in e.path) or '.'}: {e.message}"
                                for e in errors
                            )
                        )
                    how = f"CRD {crd} openAPIV3Schema"
                elif api == MONITORING:
                    validate_monitoring(doc)
                    how = "prometheus-operator model (cloudcoil-models-prometheus-operator)"
                else:
                    for version in args.kube_version:
                        kubernetes_validate.validate(doc, version, strict=True)
                    how = "Kubernetes " + ", ".join(args.kube_version) + " (strict)"
                print(f"OK {name}: {how}")
            except kubernetes_validate.SchemaNotFoundError as e:
                failed += 1
                print(f"FAIL {name}: no schema ({e})")
            except Exception as e:  # noqa: BLE001 - every failure is reported per document
                failed += 1
                message = " ".join(str(e).split())
                print(f"FAIL {name}: {message[:2000]}")
    print(f"checked {count} documents, {failed} invalid")
    return 1 if failed or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
