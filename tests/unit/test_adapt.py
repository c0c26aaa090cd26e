"""adapt: every CPU adaptation method gives the expected trainable parameters; the checks that
must come before any heavy work (QLoRA on CPU, unknown target modules, bad freeze rules) do;
inserted blocks start as the identity. Real transformers + PEFT on the tiny Llama fixture."""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tailor_trainer.config import Adaptation, TrainerConfig  # noqa: E402
from tailor_trainer.stages import InvalidSpec, StageContext  # noqa: E402
from tailor_trainer.adaptation import apply_adaptation, load_base  # noqa: E402
from tailor_trainer.stages.adapt import run_adapt  # noqa: E402

N_LAYERS = 2  # the tiny fixture model


def _trainable(model) -> set[str]:
    """Trainable parameter names with PEFT's wrapper prefixes removed."""
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.replace("base_model.model.", "").replace(".default", "")
            out.add(name)
    return out


def _block_params(i: int, model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")}


def _adapt(model_dir, spec: dict, meta: bool = False):
    return apply_adaptation(load_base(str(model_dir), meta=meta), Adaptation.model_validate(spec), seed=0)


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("spec, expected", [
    ({"method": "lora"},
     {f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
      for i in range(N_LAYERS) for m in ("q_proj", "v_proj") for ab in "AB"}),
    ({"method": "lora", "lora": {"r": 4, "targetModules": ["up_proj", "o_proj"]}},
     {f"model.layers.{i}.{m}.lora_{ab}.weight"
      for i in range(N_LAYERS) for m in ("mlp.up_proj", "self_attn.o_proj") for ab in "AB"}),
    ({"method": "dora"},
     {f"model.layers.{i}.self_attn.{m}.{w}"
      for i in range(N_LAYERS) for m in ("q_proj", "v_proj")
      for w in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight")}),
    ({"method": "ia3"},
     {f"model.layers.{i}.{m}.ia3_l"
      for i in range(N_LAYERS) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}),
    ({"method": "prefix", "prefix": {"numVirtualTokens": 4}}, {"prompt_encoder.embedding.weight"}),
])
def test_peft_methods_train_exactly_their_adapters(tiny_model_dir, spec, expected):
    model, plan = _adapt(tiny_model_dir, spec)
    assert _trainable(model) == expected
    assert plan.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < plan.trainable_percent < 10
    # The adapted model runs forward and backward, and gradients reach exactly the adapters.
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    with_grad = {n.replace("base_model.model.", "").replace(".default", "")
                 for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected


def test_full_trains_everything(tiny_model_dir):
    model, plan = _adapt(tiny_model_dir, {"method": "full"})
    assert all(p.requires_grad for p in model.parameters())
    assert plan.trainable_parameters == plan.total_parameters


def test_freeze_rules(tiny_model_dir):
    model, _ = _adapt(tiny_model_dir, {"method": "freeze", "freeze": {"firstLayers": 1}})
    everything = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == everything - _block_params(0, model) - {"model.embed_tokens.weight"}

    model, _ = _adapt(tiny_model_dir, {"method": "freeze", "freeze": {
        "layers": [1], "modules": ["*.mlp.*", "lm_head"], "unfreezeModules": ["*.layers.1.*norm*"]}})
    trainable = _trainable(model)
    assert "lm_head.weight" not in trainable
    assert not any(".mlp." in n for n in trainable)
    assert {n for n in trainable if n.startswith("model.layers.1.")} == {
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in trainable
    assert "model.embed_tokens.weight" in trainable


@pytest.mark.parametrize("freeze, message", [
    ({"firstLayers": 5}, "firstLayers 5 is more than the model's 2 blocks"),
    ({"layers": [7]}, "index 7 is out of range"),
    ({"modules": ["*.nothing_like_this.*"]}, "matches no parameter"),
])
def test_bad_freeze_rules_are_invalid_spec(tiny_model_dir, freeze, message):
    with pytest.raises(InvalidSpec, match=re.escape(message)) as err:
        _adapt(tiny_model_dir, {"method": "freeze", "freeze": freeze}, meta=True)
    assert err.value.field.startswith("spec.adaptation.freeze")


def test_unknown_target_module_lists_existing_ones(tiny_model_dir):
    with pytest.raises(InvalidSpec) as err:
        _adapt(tiny_model_dir, {"method": "lora", "lora": {"targetModules": ["q_proj", "query_key_value"]}},
               meta=True)
    msg = err.value.message
    assert "'query_key_value'" in msg and "'q_proj'" not in msg.split("not found")[0]
    for existing in LINEARS:
        assert existing in msg
    assert err.value.field == "spec.adaptation.lora.targetModules"
    with pytest.raises(InvalidSpec, match="not found"):
        _adapt(tiny_model_dir, {"method": "ia3", "ia3TargetModules": ["fc_in"]}, meta=True)


@pytest.mark.parametrize("count", [1, 2])
def test_added_layers_start_as_identity(tiny_model_dir, count):
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (2, 12))
    base = load_base(str(tiny_model_dir)).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model, plan = _adapt(tiny_model_dir, {"method": "freeze", "addLayers": {"count": count}})
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert len(model.model.layers) == model.config.num_hidden_layers == N_LAYERS + count
    assert [m.self_attn.layer_idx for m in model.model.layers] == list(range(N_LAYERS + count))
    # Only the inserted blocks train (train_only_new defaults to true).
    new = set().union(*(_block_params(i, model) for i in plan.new_blocks))
    assert _trainable(model) == new and len(plan.new_blocks) == count
    # Generation uses the KV cache indexed by layer_idx: still the same as the base model.
    with torch.no_grad():
        g1 = base.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False)
        g2 = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(g1, g2)


def test_activation_swap(tiny_model_dir):
    from transformers.activations import GELUActivation

    ids = torch.randint(5, 300, (1, 8))
    base = load_base(str(tiny_model_dir)).eval()
    model, plan = _adapt(tiny_model_dir, {"method": "lora", "activation": "gelu"})
    assert model.config.hidden_act == "gelu"
    assert all(isinstance(b.mlp.act_fn, GELUActivation) for b in model.base_model.model.model.layers)
    assert any("activation set to gelu" in c for c in plan.changes)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def _config(tmp_path, model_uri: str, adaptation: dict, gpus: int = 0) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": {"job": "t", "name": "t-r1"}, "model": {"uri": model_uri},
        "dataset": {"source": {"uri": "data.jsonl"}}, "adaptation": adaptation,
        "resources": {"gpusPerWorker": gpus}, "outputUri": str(tmp_path / "run")})


def test_qlora_on_cpu_is_refused_before_loading_anything(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # The model directory does not exist: the refusal must come first, with its own message.
    cfg = _config(tmp_path, str(tmp_path / "no-such-model"), {"method": "qlora"}, gpus=1)
    ctx = StageContext(config=cfg, run_dir=str(tmp_path / "run"), config_hash=cfg.config_hash())
    with pytest.raises(InvalidSpec, match="qlora needs a CUDA GPU") as err:
        run_adapt(ctx)
    assert err.value.field == "spec.adaptation.method"


def test_adapt_stage_checks_on_a_weightless_skeleton(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, str(tiny_model_dir), {"method": "freeze", "addLayers": {"count": 1}})
    seen = []
    ctx = StageContext(config=cfg, run_dir=str(tmp_path / "run"), config_hash=cfg.config_hash(),
                       progress=lambda **kw: seen.append(kw))
    manifest = run_adapt(ctx)
    real, plan = _adapt(tiny_model_dir, {"method": "freeze", "addLayers": {"count": 1}})
    stored = json.loads((tmp_path / "run" / "adapt" / "plan.json").read_text())
    assert stored["trainableParameters"] == plan.trainable_parameters == manifest["trainableParameters"]
    assert stored["totalParameters"] == plan.total_parameters
    assert stored["newBlocks"] == [2] and stored["numBlocks"] == 3
    assert any(s.get("trainableParameters") == plan.trainable_parameters for s in seen)
