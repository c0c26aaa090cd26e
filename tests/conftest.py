"""Shared fixtures: a tiny tokenizer and a tiny Llama model built on the spot (no hub access).

Both are session-scoped and cheap (~1 s): a byte-level BPE trained on a few sentences, saved as a
``PreTrainedTokenizerFast`` with a ChatML chat template, and a 2-layer, 64-wide
``LlamaForCausalLM`` saved together with a copy of that tokenizer (so
``AutoTokenizer.from_pretrained(tiny_model_dir)`` and ``AutoModelForCausalLM.from_pretrained``
both work on the same directory).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password? Open settings and choose reset password.",
    "Our support team answers every ticket within one business day.",
    "Fine-tuning adapts a pretrained model to your own data.",
    "system user assistant: hello, how can I help you today?",
    "Invoices are sent on the first day of each month by email.",
    "Café, naïve, résumé, Zürich — unicode text is normalized to NFC.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 question answer instruction input output",
]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    """Train a byte-level BPE on a small corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: a BOS is added when add_special_tokens=True (chat templates add it themselves).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) saved with a copy of the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory with a tiny byte-level BPE tokenizer (ChatML chat template, BOS/EOS/PAD)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Directory with a tiny LlamaForCausalLM (hidden 64, 2 layers) and the same tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on loopback (real HTTP, real botocore/s3fs clients): the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def aws_env(moto_endpoint, tmp_path) -> dict[str, str]:
    """AWS_* variables that point boto3/s3fs at the moto server and nowhere else."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
