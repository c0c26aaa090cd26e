"""Text-to-image diffusion models (Stable Diffusion architecture) through the same four stages.

A Dataset of ``schema: image-caption`` selects the diffusion stages at the stage registry
(``tailor_trainer.stages``); everything else — the run directory, manifests, Ray Train launch,
checkpoint files and their verification, progress and result documents — is the language path's.

- ``model``: load the diffusers pipeline's parts, check and apply LoRA on the UNet (PEFT as
  diffusers integrates it), save/load the adapter in the standard diffusers LoRA format.
- ``recipe``: the training recipe (noise-prediction MSE with the model's scheduler) that each
  Ray Train worker runs, with checkpoints and resume.
- ``measure``: held-out denoising loss at fixed timesteps and noise, and sample grids.
The stages themselves (prep / adapt / train / evaluate for this family) are
``tailor_trainer.stages.diffusion``.

docs/image-models.md describes the contract and what is (not) supported.
"""
