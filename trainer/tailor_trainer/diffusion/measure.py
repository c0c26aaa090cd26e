"""What the diffusion recipe and the evaluate stage measure: denoising loss at fixed timesteps and
noise, and sample images from fixed seeds.

Held-out denoising loss: every row is encoded to its latent *mean* (no sampling), then noised at
``EVAL_TIMESTEPS`` (spread over the schedule) with noise drawn from a generator seeded by the row's
position and ``seed``; the loss of a row is the mean over those timesteps of the MSE between the
UNet's prediction and its target (the noise, or the velocity for v-prediction models). The base,
the fine-tuned model and a champion therefore see exactly the same rows, timesteps and noise.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Optional

EVAL_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
"""Fixed timesteps (of a 1000-step schedule; scaled to the model's) for held-out losses."""
EVAL_SEED = 1234
SAMPLE_SEEDS = (0, 1, 2, 3)
"""Images per sample prompt, one per seed, the same before and after fine-tuning."""


def pixels_to_tensor(rows: list[dict[str, Any]], resolution: int) -> Any:
    """uint8 HWC bytes (prep's ``pixels``) -> float NCHW in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.stack([np.frombuffer(r["pixels"], dtype=np.uint8).reshape(resolution, resolution, 3)
                    for r in rows])
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def encode_rows(rows: list[dict[str, Any]], vae: Any, text_encoder: Any, resolution: int, device: Any,
                chunk: int = 64) -> tuple[Any, Any, Any]:
    """(latent mean, latent std, caption embeddings) of every row, scaled as the UNet sees them.
    The VAE and text encoder are frozen, so this is done once, not per step."""
    import torch

    means, stds, embs = [], [], []
    scale = vae.config.scaling_factor
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            x = pixels_to_tensor(part, resolution).to(device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean * scale)
            stds.append(dist.std * scale)
            ids = torch.tensor([r["input_ids"] for r in part], dtype=torch.long, device=device)
            embs.append(text_encoder(ids)[0])
    return torch.cat(means), torch.cat(stds), torch.cat(embs)


def target_of(scheduler: Any, latents: Any, noise: Any, t: Any) -> Any:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"prediction type {kind!r} is not supported")


def eval_timesteps(scheduler: Any) -> list[int]:
    n = scheduler.config.num_train_timesteps
    return sorted({min(n - 1, round(t * n / 1000)) for t in EVAL_TIMESTEPS})


def denoising_losses(unet: Any, scheduler: Any, latents: Any, embeddings: Any, *, seed: int = EVAL_SEED,
                     batch_size: int = 32, amp: Any = None) -> list[float]:
    """Per-row held-out denoising loss (mean over the fixed timesteps), same noise for any UNet."""
    import contextlib

    import torch
    import torch.nn.functional as F

    steps = eval_timesteps(scheduler)
    device = latents.device
    was_training = unet.training
    unet.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], batch_size):
            lat, emb = latents[i:i + batch_size], embeddings[i:i + batch_size]
            total = torch.zeros(lat.shape[0], device=device)
            for k, t in enumerate(steps):
                g = torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + k)
                noise = torch.randn(lat.shape, generator=g).to(device, lat.dtype)
                tt = torch.full((lat.shape[0],), t, device=device, dtype=torch.long)
                noisy = scheduler.add_noise(lat, noise, tt)
                with amp or contextlib.nullcontext():
                    pred = unet(noisy, tt, encoder_hidden_states=emb).sample
                err = F.mse_loss(pred.float(), target_of(scheduler, lat, noise, tt).float(), reduction="none")
                total += err.mean(dim=(1, 2, 3))
            out.extend((total / len(steps)).tolist())
    unet.train(was_training)
    return out


def sample_images(pipe: Any, prompts: list[str], *, steps: int = 25, guidance: float = 3.0,
                  seeds: tuple[int, ...] = SAMPLE_SEEDS) -> list[list[Any]]:
    """For each prompt, one PIL image per seed (DDIM sampling, the same seeds for every model)."""
    import torch
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    original, pipe.scheduler = pipe.scheduler, sampler
    try:
        images = []
        for p in prompts:
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            out = pipe([p] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       output_type="pil")
            images.append(list(out.images))
        return images
    finally:
        pipe.scheduler = original


def grid_png(rows: list[list[Any]], cell: int = 96, labels: Optional[list[str]] = None) -> bytes:
    """PNG of a grid of PIL images (nearest-neighbour upscaled to ``cell`` px)."""
    from PIL import Image, ImageDraw

    label_w = 70 if labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * (cell + 2), len(rows) * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, i * (cell + 2) + cell // 2 - 5), labels[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + j * (cell + 2), i * (cell + 2)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
