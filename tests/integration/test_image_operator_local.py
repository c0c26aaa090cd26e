"""The image quickstart through the operator on the real control plane (local backend): the
image-caption Dataset is validated with a bad image reported by file name, and the FineTuneJob
reaches Succeeded with the denoising-loss metrics (loss, baseLoss) in status. A shortened
examples/image-quickstart.yaml (48 images, 6 steps, no sample prompts) keeps it to about a minute."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from operator_fixtures import REPO, Kube, OperatorProcess, load_yaml_docs, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MANIFEST = REPO / "examples" / "image-quickstart.yaml"
TINY_SD = REPO / "examples" / "models" / "tailor-tiny-sd"
DATA = REPO / "examples" / "data" / "striped-shapes"


def _manifest(data: Path, out: Path) -> list[dict]:
    data.mkdir()
    lines = (DATA / "metadata.jsonl").read_text().splitlines()[:48]
    for line in lines:
        shutil.copy(DATA / json.loads(line)["file_name"], data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append(json.dumps({"file_name": "broken.png", "text": "a broken image"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    docs = copy.deepcopy(load_yaml_docs(MANIFEST))
    for doc in docs:
        spec = doc["spec"]
        if doc["kind"] == "Dataset":
            spec["source"]["uri"] = str(data)
        else:
            spec["baseModel"]["uri"] = str(TINY_SD)
            spec["output"]["uri"] = str(out)
            spec["hyperparameters"].update(maxSteps=6, batchSize=4, checkpointEverySteps=3, evalEverySteps=3)
            spec["evaluation"]["samplePrompts"] = []
    return docs


@pytest.mark.skipif(not (TINY_SD / "model_index.json").exists(), reason="tailor-tiny-sd not built")
def test_image_quickstart_on_the_local_backend(control_plane, k8s_client, namespace, tmp_path) -> None:
    kube = Kube(k8s_client, namespace)
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "op", namespaces=[namespace],
                               env={"TAILOR_DATASET_BACKEND": "local", "TAILOR_LOCAL_MAX_CONCURRENT": "1"}).start()
    try:
        manifest = tmp_path / "image-quickstart.yaml"
        manifest.write_text(yaml.safe_dump_all(_manifest(tmp_path / "data", tmp_path / "runs"), sort_keys=False))
        control_plane.kubectl("apply", "-n", namespace, "-f", str(manifest), check=True)

        ds = wait_until(lambda: (c := kube.condition("Dataset", "striped-shapes", "Ready")).get("status")
                        in ("True", "False") and c, 180, interval=1, what="Dataset validated",
                        on_timeout=operator.log_tail)
        assert ds["status"] == "True", ds
        ds_status = kube.status("Dataset", "striped-shapes")
        assert ds_status["rows"] == 48 and ds_status["dropped"] == {"corruptImage": 1}
        assert ds_status["firstErrors"][0]["file"] == "broken.png"

        deadline = time.monotonic() + 420
        phase = None
        while time.monotonic() < deadline:
            phase = kube.status("FineTuneJob", "striped-style").get("phase")
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        status = kube.status("FineTuneJob", "striped-style")
        assert phase == "Succeeded", f"{status}\n{operator.log_tail()}"
        metrics = status["metrics"]
        assert 0 < metrics["loss"] and 0 < metrics["baseLoss"]
        model = Path(status["artifacts"]["model"].replace("file://", ""))
        assert (model / "pytorch_lora_weights.safetensors").is_file()
        assert status["progress"]["summary"] == "100% 6/6"
    finally:
        operator.stop()
