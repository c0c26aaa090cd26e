#!/usr/bin/env python3
"""Build the image quickstart: a tiny Stable-Diffusion-architecture pipeline, pretrained on CPU,
and a small image-caption dataset in a style that pipeline never saw.

No model hub is reachable from where Tailor is developed and tested, so — as for
``examples/models/tailor-tiny-llama`` — the project ships a small *pretrained* text-to-image
model that it builds itself, reproducibly (fixed seeds, fixed step counts), from synthetic images:

- **pretraining images**: one flat-coloured shape (circle, square, triangle) of one of 8 colours,
  at a random place and size, on a flat background of another colour, captioned
  ``"a red circle on a blue background"``;
- **the fine-tuning dataset** (``examples/data/striped-shapes/``, Hugging Face imagefolder layout:
  PNGs plus ``metadata.jsonl`` with ``file_name`` and ``text``): the same shapes on *diagonal
  two-colour stripes*, captioned ``"a red circle on blue and white stripes"``. The UNet never saw
  a striped image nor the words "and"/"stripes" in a caption during pretraining.

Components (diffusers / transformers classes, saved with ``save_pretrained`` so
``StableDiffusionPipeline.from_pretrained(dir)`` loads it): ``CLIPTokenizer`` over a small
word-level BPE vocabulary built here (every caption word is one token), ``CLIPTextModel`` (2 layers,
width 32), ``AutoencoderKL`` (32 px images <-> 4x16x16 latents), ``UNet2DConditionModel``
(channels 32/64, cross-attention in the outer blocks) and ``DDPMScheduler`` (1000 steps,
scaled-linear betas, epsilon prediction).

Steps: 1) train the VAE as a general autoencoder (reconstruction MSE + a small KL term) on the
flat images *and* on random stripe/checker textures, so it can also encode the new style — as
Stable Diffusion's VAE is generic; 2) set ``scaling_factor`` to 1/std of the latents; 3) train
the UNet and the text encoder jointly on the flat images (noise-prediction MSE); 4) save.

Usage: python scripts/build_quickstart_image_model.py [--out DIR] [--data-out DIR]
       [--vae-steps N] [--unet-steps N] [--threads 2] [--data-only]
Takes a few minutes on 2 CPU cores (the shipped build: see pretrain.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

RES = 32
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
WORDS = sorted({"a", "on", "background", "and", "stripes", *COLORS, *SHAPES})


# ---------------------------------------------------------------------------------------------
# Synthetic images


def _draw_shape(img: Image.Image, rng: random.Random, shape: str, color: tuple[int, int, int]) -> None:
    d = ImageDraw.Draw(img)
    size = rng.randint(RES // 3, RES * 2 // 3)
    x0, y0 = rng.randint(1, RES - size - 1), rng.randint(1, RES - size - 1)
    box = (x0, y0, x0 + size, y0 + size)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=color)


def _stripes(c1: tuple[int, int, int], c2: tuple[int, int, int], period: int, phase: int,
             direction: int = 1) -> Image.Image:
    y, x = np.mgrid[0:RES, 0:RES]
    band = ((x + direction * y + phase) // (period // 2)) % 2
    arr = np.where(band[..., None] == 0, np.array(c1), np.array(c2)).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def flat_example(rng: random.Random) -> tuple[Image.Image, str]:
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(sorted(COLORS), 2)
    img = Image.new("RGB", (RES, RES), COLORS[bg])
    _draw_shape(img, rng, shape, COLORS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def striped_example(rng: random.Random) -> tuple[Image.Image, str]:
    """The fine-tuning style: diagonal stripes (period 8 px, up-right) behind the shape."""
    shape = rng.choice(SHAPES)
    fg, b1, b2 = rng.sample(sorted(COLORS), 3)
    img = _stripes(COLORS[b1], COLORS[b2], period=8, phase=rng.randrange(8))
    _draw_shape(img, rng, shape, COLORS[fg])
    return img, f"a {fg} {shape} on {b1} and {b2} stripes"


def texture_example(rng: random.Random) -> Image.Image:
    """Generic textures for the VAE only (random periods, both diagonals, checkers, noise)."""
    c1, c2 = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    kind = rng.randrange(3)
    if kind == 0:
        img = _stripes(c1, c2, period=rng.choice((4, 6, 8, 10, 12)), phase=rng.randrange(12),
                       direction=rng.choice((-1, 1)))
    elif kind == 1:
        y, x = np.mgrid[0:RES, 0:RES]
        p = rng.choice((4, 8))
        band = ((x // p) + (y // p)) % 2
        img = Image.fromarray(np.where(band[..., None] == 0, np.array(c1), np.array(c2)).astype(np.uint8))
    else:
        arr = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (RES // 4, RES // 4, 3))
        img = Image.fromarray(arr.astype(np.uint8)).resize((RES, RES), Image.BILINEAR)
    if rng.random() < 0.7:
        _draw_shape(img, rng, rng.choice(SHAPES), tuple(rng.randrange(256) for _ in range(3)))
    return img


def build_dataset(out: str, n: int = 240, seed: int = 1234) -> None:
    """examples/data/striped-shapes/: PNGs + metadata.jsonl (imagefolder layout)."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    rng = random.Random(seed)
    with open(os.path.join(out, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            img, caption = striped_example(rng)
            name = f"{i:04d}.png"
            img.save(os.path.join(out, name), optimize=True)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer(out: str) -> None:
    """A CLIP BPE tokenizer whose merges spell every caption word as one token (plus single
    characters, so unknown words still tokenize)."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab: list[str] = []
    seen: set[str] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merge = f"{cur} {p}"
            if merge not in merges:
                merges.append(merge)
            cur = cur + p
            add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, indent=0)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


# ---------------------------------------------------------------------------------------------
# Training


def to_tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def build_model(out: str, vae_steps: int, unet_steps: int, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok_dir = os.path.join(out, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=RES,
                        mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=RES // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                              clip_sample=False, steps_offset=1)
    stats: dict = {"seed": seed, "resolution": RES}

    # 1) VAE: a general autoencoder (flat images, stripes, checkers, smooth noise)
    t0 = time.monotonic()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae.train()
    for step in range(vae_steps):
        imgs = [flat_example(rng)[0] if rng.random() < 0.5 else texture_example(rng) for _ in range(32)]
        x = torch.stack([to_tensor(i) for i in imgs])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (4 * (RES // 2) ** 2)
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            print(f"vae step {step} loss {loss.item():.4f}", flush=True)
    stats["vae"] = {"steps": vae_steps, "finalLoss": round(loss.item(), 5),
                    "seconds": round(time.monotonic() - t0, 1)}
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = torch.stack([to_tensor(flat_example(rng)[0]) for _ in range(256)])
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    stats["vae"]["scalingFactor"] = vae.config.scaling_factor

    # 2) UNet + text encoder on flat images only (the style the base knows)
    t0 = time.monotonic()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, unet_steps) / unet_steps)))
    unet.train()
    text_encoder.train()
    for step in range(unet_steps):
        batch = [flat_example(rng) for _ in range(32)]
        x = torch.stack([to_tensor(i) for i, _ in batch])
        ids = tokenizer([c for _, c in batch], padding="max_length", max_length=16, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids)[0]
        # 10% empty captions so classifier-free guidance has an unconditional model to contrast
        drop = torch.rand(len(batch)) < 0.1
        if drop.any():
            empty = tokenizer([""] * int(drop.sum()), padding="max_length", max_length=16,
                              return_tensors="pt").input_ids
            cond = cond.clone()
            cond[drop] = text_encoder(empty)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == unet_steps - 1:
            print(f"unet step {step} loss {loss.item():.4f}", flush=True)
    stats["unet"] = {"steps": unet_steps, "batchSize": 32, "finalLoss": round(loss.item(), 5),
                     "seconds": round(time.monotonic() - t0, 1)}

    unet.eval()
    text_encoder.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    stats["parameters"] = {name: sum(p.numel() for p in m.parameters())
                           for name, m in (("unet", unet), ("vae", vae), ("textEncoder", text_encoder))}
    with open(os.path.join(out, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return stats


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "examples/models/tailor-tiny-sd"))
    ap.add_argument("--data-out", default=os.path.join(here, "examples/data/striped-shapes"))
    ap.add_argument("--vae-steps", type=int, default=250)
    ap.add_argument("--unet-steps", type=int, default=700)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-only", action="store_true")
    args = ap.parse_args(argv)
    build_dataset(args.data_out)
    print(f"dataset written to {args.data_out}")
    if args.data_only:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    readme = os.path.join(args.out, "README.md")
    kept = open(readme, encoding="utf-8").read() if os.path.exists(readme) else None
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    started = time.monotonic()
    stats = build_model(args.out, args.vae_steps, args.unet_steps)
    stats["totalSeconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "pretrain.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    if kept is not None:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(kept)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
