"""The model card's Hub metadata and the adapter's pointer to its base (issue 17).

A real LoRA adapter on the shipped tiny model (examples/models/tailor-tiny-llama), saved the way
the train stage saves it — from the directory the base was loaded from, so ``adapter_config.json``
first names that directory — then the evaluate stage's card writing, then plain PEFT and the
trainer's own loader on the result. An ``hf://`` base is played by a copy of the tiny model laid
out like a huggingface_hub cache snapshot; nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tailor_trainer import hub, render  # noqa: E402
from tailor_trainer.config import TrainerConfig  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "examples" / "models" / "tailor-tiny-llama"
HUB_KEYS = ["base_model", "library_name", "pipeline_tag", "tags", "datasets", "model-index", "tailor"]
RESULT = {"run": "cards-r1", "job": "cards", "configHash": "c0ffee", "datasetRevision": "rev-7",
          "datasetFingerprint": "f1n9er", "evaluatedOn": {"split": "test", "rows": 12},
          "metrics": {"loss": 1.25, "perplexity": 3.4903, "accuracy": 0.625, "baseLoss": 2.5,
                      "exactMatch": None, "trainLoss": 1.1},
          "artifacts": {"model": "/out/train/model"}, "steps": 3}


def _cfg(model: str, data: str = "/data/words.jsonl", method: str = "lora", **model_extra) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": {"job": "cards", "name": "cards-r1"}, "model": {"uri": model, **model_extra},
        "dataset": {"name": "words", "source": {"uri": data}, "schema": "completion"},
        "adaptation": {"method": method}, "outputUri": "/out"})


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 17, 42, 99, 7]])).logits


def _save_adapter(base_dir: Path, train_dir: Path) -> torch.Tensor:
    """A LoRA adapter (non-zero, so reloading it is visible in the logits) saved to train/model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    model.save_pretrained(str(train_dir / "model"))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(train_dir / "model"))
    config = json.loads((train_dir / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)  # what the issue is about
    return _logits(model)


def _write(cfg: TrainerConfig, train_dir: Path) -> str:
    """What the evaluate stage does with the card."""
    card = render.model_card(cfg, RESULT, {})
    hub.write_model_dirs(cfg, str(train_dir), card, render.model_card(cfg, RESULT, {}, merged=True))
    return card


def _reload(base_dir: Path, adapter_dir: Path, expected: torch.Tensor) -> None:
    """Plain PEFT on the local base, and the trainer's own loader, give the trained model back."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from tailor_trainer.adaptation import load_any

    PeftConfig.from_pretrained(str(adapter_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    torch.testing.assert_close(_logits(model), expected)
    ours = load_any(str(adapter_dir), base_fallback=str(base_dir)).eval()
    torch.testing.assert_close(_logits(ours), expected)


@pytest.fixture(scope="module")
def hub_snapshot(tmp_path_factory) -> Path:
    """The tiny model where huggingface_hub's snapshot_download would put hf://tailor/tiny-llama."""
    snap = tmp_path_factory.mktemp("hf") / "hub" / "models--tailor--tiny-llama" / "snapshots" / "9f3c0d1e"
    shutil.copytree(TINY, snap)
    return snap


def test_hf_base_is_named_by_its_hub_id(tmp_path, hub_snapshot):
    from peft import PeftConfig

    cfg = _cfg("hf://tailor/tiny-llama", data="hf://tailor/words", revision="9f3c0d1e")
    expected = _save_adapter(hub_snapshot, tmp_path / "train")
    card = _write(cfg, tmp_path / "train")
    adapter = tmp_path / "train" / "model"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tailor/tiny-llama" and config["revision"] == "9f3c0d1e"
    peft_config = PeftConfig.from_pretrained(str(adapter))
    assert (peft_config.base_model_name_or_path, peft_config.revision) == ("tailor/tiny-llama", "9f3c0d1e")
    _reload(hub_snapshot, adapter, expected)

    meta = _front_matter(card)
    assert list(meta) == HUB_KEYS
    assert meta["base_model"] == "tailor/tiny-llama" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"] == ["tailor", "lora", "text-generation"]
    assert meta["datasets"] == ["tailor/words"]
    [entry] = meta["model-index"]
    [res] = entry["results"]
    assert entry["name"] == "cards-r1" and res["task"]["type"] == "text-generation"
    assert res["dataset"] == {"name": "words", "type": "tailor/words", "split": "test"}
    assert [(m["type"], m["value"]) for m in res["metrics"]] == [
        ("loss", 1.25), ("perplexity", 3.4903), ("accuracy", 0.625)]  # exactMatch was not computed
    assert meta["tailor"] == {"run": "cards-r1", "job": "cards", "base_model": "hf://tailor/tiny-llama",
                              "base_model_revision": "9f3c0d1e", "method": "lora", "dataset": "words",
                              "dataset_revision": "rev-7", "dataset_fingerprint": "f1n9er",
                              "config_hash": "c0ffee"}
    assert "snapshots" not in card and str(hub_snapshot) not in card
    assert (adapter / "README.md").read_text() == card  # peft's own card, naming the cache, is replaced


def test_s3_base_leaks_no_cache_path(tmp_path):
    cache = tmp_path / "cache" / "models" / "0a1b2c3d4e5f6789"  # like storage.resolve_model_dir's download
    shutil.copytree(TINY, cache)
    cfg = _cfg("s3://models/tiny-llama")
    expected = _save_adapter(cache, tmp_path / "train")
    card = _write(cfg, tmp_path / "train")
    adapter = tmp_path / "train" / "model"

    text = (adapter / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == "s3://models/tiny-llama" and str(cache) not in text
    _reload(cache, adapter, expected)  # the trainer falls back to the base it resolved itself

    meta = _front_matter(card)
    assert list(meta) == ["library_name", "pipeline_tag", "tags", "model-index", "tailor"]  # no Hub ids
    assert meta["tailor"]["base_model"] == "s3://models/tiny-llama"
    assert str(cache) not in card and "<a local copy of s3://models/tiny-llama>" in card


def test_local_base_loads_with_plain_auto_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = _cfg(str(TINY), data="hf:///datasets/words")  # a local save_to_disk directory, no Hub id
    expected = _save_adapter(TINY, tmp_path / "train")
    card = _write(cfg, tmp_path / "train")
    adapter = tmp_path / "train" / "model"

    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(TINY)
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()), expected)
    _reload(TINY, adapter, expected)
    meta = _front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta  # the Hub accepts only its own ids there
    assert meta["tailor"]["base_model"] == str(TINY) and meta["library_name"] == "peft"


def test_full_fine_tunes_and_merged_models_are_transformers_models(tmp_path):
    for d in ("model", "merged"):
        shutil.copytree(TINY, tmp_path / "train" / d)
    lora = _cfg("hf://tailor/tiny-llama")
    card = _write(lora, tmp_path / "train")
    assert _front_matter(card)["library_name"] == "peft"  # the card of the adapter (evaluate/README.md)
    merged = (tmp_path / "train" / "merged" / "README.md").read_text()
    assert _front_matter(merged)["library_name"] == "transformers" and "AutoPeftModel" not in merged
    assert _front_matter(merged)["base_model"] == "tailor/tiny-llama"

    full = _cfg("hf://tailor/tiny-llama", method="full")
    card = _write(full, tmp_path / "train")
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["tags"] == ["tailor", "full", "text-generation"]
    assert (tmp_path / "train" / "model" / "README.md").read_text() == card
    assert not (tmp_path / "train" / "model" / "adapter_config.json").exists()


def test_front_matter_without_metrics_has_no_model_index():
    cfg = _cfg("pvc://models/tiny-llama")
    card = render.model_card(cfg, {"run": "r", "metrics": {"loss": float("nan")}, "artifacts": {}}, {})
    meta = _front_matter(card)
    assert list(meta) == ["library_name", "pipeline_tag", "tags", "tailor"]
    assert meta["tailor"] == {"run": "r", "base_model": "pvc://models/tiny-llama", "method": "lora",
                              "dataset": "words"}


@pytest.mark.parametrize("uri, repo", [
    ("hf://org/name", "org/name"), ("hf://gpt2", "gpt2"), ("hf://org/name/", "org/name"),
    ("hf:///local/dir", None), ("hf://a/b/c", None), ("hf://", None), ("s3://org/name", None),
    ("/models/org/name", None), (None, None)])
def test_hub_repo_id(uri, repo):
    assert hub.hub_repo_id(uri) == repo
