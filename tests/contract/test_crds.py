"""Committed CRDs are exactly what the generator writes; examples match the generated schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tailor_operator import crdgen

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `tailor crds` (or `python -m tailor_operator.crdgen`) and commit the result"


@pytest.mark.parametrize("name", sorted(crdgen.build_crds()))
def test_committed_crds_equal_fresh_generation(name: str) -> None:
    """crds/ (plain YAML) and the chart's templates/crds/ (the same CRD behind crds.install)."""
    targets = crdgen.targets(ROOT)
    assert [d for d, _ in targets] == [ROOT / "crds", ROOT / "charts" / "tailor" / "templates" / "crds"]
    for directory, renderer in targets:
        path = directory / name
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: {REGENERATE}"
        assert path.read_text() == renderer(crdgen.build_crds()[name]), f"{path.relative_to(ROOT)} is stale: {REGENERATE}"


def test_chart_has_no_crds_folder() -> None:
    """Helm installs a chart's crds/ once and never upgrades it; the chart's CRDs are templates."""
    assert not (ROOT / "charts" / "tailor" / "crds").exists()


@pytest.mark.parametrize("name", sorted(crdgen.build_crds()))
def test_chart_template_is_the_plain_crd_with_release_metadata(name: str) -> None:
    """Without its template lines the chart's copy is the plain CRD's spec, byte for byte."""
    crd = crdgen.build_crds()[name]
    template = crdgen.render_template(crd)
    assert template.splitlines()[2] == "{{- if .Values.crds.install }}" and template.endswith("{{- end }}\n")
    spec = template[template.index("\nspec:\n") + 1:template.rindex("{{- end }}")]
    assert yaml.safe_load(spec) == {"spec": crd["spec"]}
    assert "helm.sh/resource-policy: keep" in template and "{{- if .Values.crds.keep }}" in template


def _walk(node: Any, path: str = "$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("name", sorted(crdgen.build_crds()))
def test_schema_is_structural(name: str) -> None:
    crd = crdgen.build_crds()[name]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "const", "title", "default"):
            assert banned not in node, f"{name} {path} has {banned}"
        if "properties" in node or "enum" in node or "pattern" in node:
            assert "type" in node, f"{name} {path} has no type"
        if "x-kubernetes-preserve-unknown-fields" in node:
            assert path.endswith(".affinity"), f"{name} {path}: preserve-unknown-fields only where deliberate"
    assert version["subresources"] == {"status": {}}
    names = crd["spec"]["names"]
    assert names["categories"] == ["tailor"]


def test_printer_columns() -> None:
    crds = crdgen.build_crds()
    cols = lambda n: [c["name"] for c in crds[n]["spec"]["versions"][0]["additionalPrinterColumns"]
                      if not c.get("priority")]
    assert cols("tailor.dev_finetunejobs.yaml") == ["Phase", "Stage", "Progress", "Eval loss", "Champion", "Age"]
    assert cols("tailor.dev_datasets.yaml") == ["Revision", "Rows", "Ready", "Age"]
    assert crds["tailor.dev_finetunejobs.yaml"]["spec"]["names"]["shortNames"] == ["ftj"]
    assert crds["tailor.dev_datasets.yaml"]["spec"]["names"]["shortNames"] == ["tds"]


def test_every_field_has_a_description() -> None:
    for name, crd in crdgen.build_crds().items():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            for field, sub in (node.get("properties") or {}).items():
                if isinstance(sub, dict):
                    assert sub.get("description"), f"{name} {path}.{field} has no description"


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 boolean exclusive bounds -> JSON Schema numbers, for the jsonschema library."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("exclusiveMinimum", False) is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.pop("exclusiveMaximum", False) is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    return out


EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))  # examples/cluster/ too


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_match_generated_schema(path: Path) -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in crdgen.build_crds().values()}
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment: what it assumes, how to apply"
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert docs
    for doc in docs:
        crd = crds.get(doc.get("kind"))
        if crd is None:
            continue
        schema = _openapi_to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        jsonschema.validate(doc, schema)
