#!/usr/bin/env python3
"""Regenerates the vendored JSON Schemas that tests/k8s.rs validates config/k8s/*.yaml against.

Kubernetes kinds come from the PyPI package kubernetes-validate (its bundled
`kubernetes-json-schema/vX.Y.0-local-strict/` tree: the Kubernetes OpenAPI turned into JSON Schema
draft 2020-12, with additionalProperties: false everywhere, so a misspelt field fails). Each kind's
schema refers into one shared `_definitions.json` of the whole API (1.4 MB); this script writes one
self-contained file per kind instead, holding only the definitions that kind reaches, with
`"$ref": "#/$defs/..."` and the prose descriptions dropped (they are not needed to validate).

Custom resources (KEDA ScaledObject, prometheus-operator ServiceMonitor, cert-manager Issuer)
have no schema in that package: their hand-written sources are in crd-src/ (see README.md there)
and may refer to Kubernetes definitions (`#/$defs/io.k8s...`), which this script bundles the same
way.

Usage (no network needed once the wheel is downloaded):

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    python3 config/k8s/schemas/vendor.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

import json
import sys
import zipfile
from pathlib import Path

K8S_VERSION = "v1.30.0"  # the oldest Kubernetes the manifests support (preStop `sleep`)
PACKAGE = "kubernetes-validate 1.37.0 (PyPI)"
KINDS = [
    "configmap-v1",
    "secret-v1",
    "service-v1",
    "statefulset-apps-v1",
    "poddisruptionbudget-policy-v1",
    "horizontalpodautoscaler-autoscaling-v2",
    "networkpolicy-networking-v1",
]
HERE = Path(__file__).resolve().parent
EXTERNAL_PREFIX = "/api/_definitions.json#/$defs/"
LOCAL_PREFIX = "#/$defs/"


def strip(node):
    """Drops prose and rewrites refs into the shared definitions file to local ones."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                continue
            if k == "$ref" and isinstance(v, str) and v.startswith(EXTERNAL_PREFIX):
                v = LOCAL_PREFIX + v[len(EXTERNAL_PREFIX):]
            out[k] = strip(v)
        return out
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(LOCAL_PREFIX):
                yield v[len(LOCAL_PREFIX):]
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def bundle(schema, defs, source):
    """`schema` with the closure of the definitions it refers to under `$defs`."""
    schema = strip(schema)
    own = schema.pop("$defs", {})
    needed, todo = {}, list(refs(schema)) + [r for d in own.values() for r in refs(d)]
    while todo:
        name = todo.pop()
        if name in needed or name in own:
            continue
        needed[name] = strip(defs[name])
        todo.extend(refs(needed[name]))
    schema["$defs"] = dict(sorted({**needed, **own}.items()))
    schema["$comment"] = source
    return schema


def write(name, schema):
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path.relative_to(HERE.parent.parent.parent)} ({path.stat().st_size} bytes)")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    base = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-local-strict/"
    with zipfile.ZipFile(sys.argv[1]) as wheel:
        defs = json.loads(wheel.read(base + "_definitions.json"))["$defs"]
        for kind in KINDS:
            schema = json.loads(wheel.read(base + kind + ".json"))
            source = f"Kubernetes {K8S_VERSION} {kind} (strict), from {PACKAGE}, bundled by vendor.py"
            write(kind, bundle(schema, defs, source))
    for src in sorted((HERE / "crd-src").glob("*.json")):
        schema = json.loads(src.read_text())
        note = schema.pop("$comment", "hand-written")
        source = f"{note}; Kubernetes {K8S_VERSION} definitions from {PACKAGE}, bundled by vendor.py"
        write(src.stem, bundle(schema, defs, source))


if __name__ == "__main__":
    main()
