"""srd-tiny's VAE training: an `AutoencoderKLWan` trained from scratch, then its decoder sharpened.

Used by `srserve.tiny.train` (stage 1 and the last stage). See docs/srd-tiny.md for the recipe.
"""
from __future__ import annotations

import numpy as np
import torch

from srserve.tiny import models as M
from srserve.tiny.common import Budget, clip_tensor, log, lr_at, parse_forms


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan._decode without its final clamp to [-1, 1], which would stop the gradient of every pixel
    pushed past black (and so of the object, once the background is learned)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


@torch.no_grad()
def vae_probe(vae, clips: list[torch.Tensor]) -> float:
    """Mean absolute error (in [0, 1] units) over object pixels of full-size 17-frame clips, as the pipeline decodes."""
    errs = []
    for x in clips:
        rec = vae.decode(vae.encode(x[None]).latent_dist.mode()).sample[0]
        obj = x.amax(dim=0) > -0.8
        errs.append(((rec - x).abs().amax(dim=0)[obj] / 2).mean().item())
    return float(np.mean(errs))


@torch.no_grad()
def reconstruction_summary(vae, n: int = 48, seed: int = 123, form: str = "core") -> dict:
    """The evaluator's scores of VAE reconstructions of n random ground-truth clips of one prompt form (PSNR/SSIM
    against the clips): the ceiling for any generator that works in this VAE's latent space."""
    from srserve.tiny.domain import render_scene, sample_scene
    from srserve.tiny.evaluate import score_video, summarize

    rng, scores = np.random.default_rng(seed), []
    for _ in range(n):
        spec = sample_scene(rng, form)
        frames, _ = render_scene(spec)
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None] * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        video = ((rec.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()
        scores.append(score_video(video, spec.prompt, frames))
    return summarize(scores)


def vae_loss(rec: torch.Tensor, x: torch.Tensor, edges: float = 0.0) -> torch.Tensor:
    """L1 + L2 where object and background weigh the same: with a plain mean, black everywhere is a minimum the
    VAE cannot leave. `edges` adds an L1 on spatial gradients (per object pixel), for sharp shapes."""
    obj = (x.amax(dim=1, keepdim=True) > -0.9).float().expand_as(x)
    err = (rec - x).abs() + (rec - x).pow(2)
    loss = (err * obj).sum() / obj.sum().clamp_min(1) + (err * (1 - obj)).sum() / (1 - obj).sum()
    if edges:
        d = rec - x
        grad = (d[..., 1:, :] - d[..., :-1, :]).abs().sum() + (d[..., 1:] - d[..., :-1]).abs().sum()
        loss = loss + edges * grad / obj.sum().clamp_min(1)
    return loss


def finetune_decoder(vae, args) -> dict:
    """Sharpen the decoder with the encoder frozen: the latent space (and the DiTs trained on it) stay valid."""
    rng = np.random.default_rng(args.seed + 5)
    torch.manual_seed(args.seed + 5)
    forms = parse_forms(args.vae_forms)
    probe = [clip_tensor(np.random.default_rng(10_000 + i)) for i in range(4)]
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    budget, curve, step, ema = Budget(args.decoder_steps, args.decoder_minutes, args.decoder_stop), [], 0, None
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr, warmup=50)
        x = torch.stack([clip_tensor(rng, args.vae_frames, crop=args.vae_crop, forms=forms)
                         for _ in range(args.vae_batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = vae_loss(decode_unclamped(vae, z), x, edges=args.decoder_edges)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        if step % 25 == 0:
            curve.append((step, ema, budget.elapsed()))
            log(f"decoder step {step} loss {ema:.4f} {budget.elapsed():.0f}s")
        if step % 200 == 0:
            log(f"decoder step {step} probe: mean |error| on object pixels of full clips {vae_probe(vae, probe):.3f}")
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(True)
    return {"probe_error": vae_probe(vae, probe), "steps": step, "seconds": round(budget.elapsed(), 1),
            "final_loss": ema, "curve": curve}


def train_vae(args) -> tuple[torch.nn.Module, dict]:
    rng = np.random.default_rng(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    forms = parse_forms(args.vae_forms)  # clips of every prompt form: two colors in one frame, turning objects
    vae = M.make_vae().train()
    with torch.no_grad():  # start with a small posterior noise (std 0.05), or the decoder sees noise only at first
        vae.quant_conv.bias[M.Z_DIM:] = -6.0
    probe = [clip_tensor(np.random.default_rng(10_000 + i)) for i in range(4)]  # full frames, all 17
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget, curve, step, ema = Budget(args.vae_steps, args.vae_minutes, args.vae_stop), [], 0, None
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        if step < args.vae_image_steps:  # first the frame-0 path on single full frames: spatial code, colors, shapes
            x = torch.stack([clip_tensor(rng, 1, forms=forms) for _ in range(args.vae_image_batch)])
        else:  # then whole 17-frame clips (cropped): the temporal path, as the pipeline decodes
            x = torch.stack([clip_tensor(rng, args.vae_frames, crop=args.vae_crop, forms=forms)
                             for _ in range(args.vae_batch)])
        post = vae.encode(x).latent_dist
        rec = decode_unclamped(vae, post.sample())
        rec_loss = vae_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        if step % 25 == 0:
            curve.append((step, ema, budget.elapsed()))
            log(f"vae step {step} loss {ema:.4f} (rec {rec_loss.item():.4f} kl {kl.item():.3f}) {budget.elapsed():.0f}s")
        if step % 200 == 0:
            log(f"vae step {step} probe: mean |error| on object pixels of full clips {vae_probe(vae, probe):.3f}")
    vae.eval()
    stats = {"probe_error": vae_probe(vae, probe), "steps": step, "seconds": round(budget.elapsed(), 1), "final_loss": ema, "curve": curve}
    return vae, stats
