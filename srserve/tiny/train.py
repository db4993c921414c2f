"""Train the srd-tiny bundle: VAE, then the sketch DiT (`transformer`), then the render DiT (`transformer_2`).

    python -m srserve.tiny.train --out srserve/tiny/bundle/srd-tiny --work runs/tiny-train --seed 0

Stages write to `--work` (checkpoints, `train.json`, loss PNGs) and can be resumed with `--resume`. Flow matching
on the VAE's normalized latents: x_t = (1 - s) x0 + s eps, target eps - x0, timestep s * 1000, with 10% of
prompts dropped to "" so classifier-free guidance works. The text encoder is a frozen random UMT5.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from srserve.tiny import models as M
from srserve.tiny.common import Budget, clip_tensor, log, lr_at
from srserve.tiny.domain import DEFAULT_FRAMES, FORMS, prompts_of, sample_scene
from srserve.tiny.tokenizer import MAX_LENGTH, build_tokenizer
from srserve.tiny.train_vae import finetune_decoder, reconstruction_summary, train_vae

COMPACT_LEN = 16  # text rows kept in training: the longest prompt (pair, 12 tokens) plus padding rows
DEFAULT_OUT = Path(__file__).parent / "bundle" / "srd-tiny"


def training_prompts() -> list[str]:
    """Every prompt the DiTs train on, in table order: core, pair, then (their embedding rows; "" comes last)."""
    return [p for form in FORMS for p in prompts_of(form)]


def parse_clip_counts(text: str) -> dict[str, int]:
    """'core:2160,pair:6600,then:3240' -> clips per prompt form."""
    counts = {}
    for item in text.split(","):
        form, _, n = item.partition(":")
        if form.strip() not in FORMS or not n.strip().isdigit():
            raise ValueError(f"--clips {text!r}: items FORM:COUNT, FORM one of {list(FORMS)}")
        counts[form.strip()] = int(n)
    return counts


@torch.no_grad()
def encode_dataset(vae, args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Latents (N, z, 5, 8, 8) (raw, un-normalized) and prompt ids (rows of `training_prompts`) of fresh clips:
    per form the count `--clips` asks for, the form's prompts in balanced cycles."""
    rng = np.random.default_rng(args.seed + 2)
    table_prompts = training_prompts()
    row = {p: i for i, p in enumerate(table_prompts)}
    t0 = time.perf_counter()
    ids = []
    for form, n in parse_clip_counts(args.clips).items():
        prompts = prompts_of(form)
        cycle = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-n // len(prompts)))])[:n]
        ids += [row[prompts[i]] for i in cycle]
    ids = np.asarray(ids)
    rng.shuffle(ids)
    latents = []
    for i in range(0, len(ids), 8):
        batch = [clip_tensor(rng, DEFAULT_FRAMES, sample_scene(rng, prompt=table_prompts[pid])) for pid in ids[i:i + 8]]
        latents.append(vae.encode(torch.stack(batch)).latent_dist.mode())
        if i % 2000 == 0:
            log(f"encoded {i} of {len(ids)} clips")
    latents = torch.cat(latents)
    log(f"encoded {len(ids)} clips in {time.perf_counter() - t0:.0f}s, latents {tuple(latents.shape)}")
    return latents, torch.from_numpy(ids), {"clips": args.clips, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def prompt_table(tokenizer, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact embeddings (P + 1, COMPACT_LEN, text_dim) of `training_prompts` then "", and their token counts.

    Same computation as WanPipeline._get_t5_prompt_embeds (prompt_clean, pad to 512, trim, zero-pad), kept to
    COMPACT_LEN rows (see models.CompactTextAttnProcessor)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = [prompt_clean(p) for p in training_prompts() + [""]]
    outs, all_lens = [], []
    for i in range(0, len(texts), 256):
        toks = tokenizer(texts[i:i + 256], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        hidden = text_encoder(toks.input_ids, toks.attention_mask).last_hidden_state
        lens = toks.attention_mask.sum(dim=1)
        if int(lens.max()) >= COMPACT_LEN:
            raise ValueError(f"a prompt has {int(lens.max())} tokens; COMPACT_LEN {COMPACT_LEN} needs a padding row")
        out = torch.zeros(len(lens), COMPACT_LEN, hidden.shape[-1])
        for j, n in enumerate(lens.tolist()):
            out[j, :n] = hidden[j, :n]
        outs.append(out)
        all_lens.append(lens)
    return torch.cat(outs), torch.cat(all_lens)


def sample_sigmas(kind: str, n: int, gen: torch.Generator, render_max_sigma: float = 1.0,
                  render_power: float = 1.0) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    if kind == "sketch":  # the density the sampler visits with flow_shift
        return (M.FLOW_SHIFT * u / (1 + (M.FLOW_SHIFT - 1) * u)).clamp(1e-3, 1.0)
    # render: only the low-noise range it is handed in SR; a power > 1 weights its low end more
    return (render_max_sigma * u ** render_power).clamp(1e-3, 1.0)


def train_dit(kind: str, cfg: dict, latents, prompt_ids, table, lens, args, steps, minutes, lr, batch, stop):
    seed = args.seed + (3 if kind == "sketch" else 4)
    gen = torch.Generator().manual_seed(seed)
    model = M.make_transformer(cfg, seed).train()
    proc = M.use_compact_text(model)
    ema_model = M.make_transformer(cfg, seed).eval()
    ema_model.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    empty = table.shape[0] - 1
    budget, curve, step, ema = Budget(steps, minutes, stop), [], 0, None
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=200)
        idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
        x0 = latents[idx]
        pid = prompt_ids[idx].clone()
        pid[torch.rand(batch, generator=gen) < args.cfg_dropout] = empty
        s = sample_sigmas(kind, batch, gen, args.render_max_sigma, args.render_sigma_power)
        eps = torch.randn(x0.shape, generator=gen)
        sv = s.view(-1, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * eps
        proc.bias = M.compact_bias(lens[pid], COMPACT_LEN)
        pred = model(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=table[pid], return_dict=False)[0]
        loss = (pred - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_model.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            curve.append((step, ema, budget.elapsed()))
            if step % 200 == 0:
                log(f"{kind} step {step} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} {budget.elapsed():.0f}s")
    M.use_default_attention(ema_model)
    stats = {"steps": step, "seconds": round(budget.elapsed(), 1), "final_loss": ema, "curve": curve,
             "batch": batch, "lr": lr, "params": M.num_params(ema_model)}
    log(f"{kind} done: {step} steps, loss {ema:.4f}, {budget.elapsed():.0f}s")
    return ema_model, stats


def plot_curves(stats: dict, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, keys in (("vae", ["vae", "decoder"]), ("dit", ["sketch", "render"])):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            if key in stats and stats[key].get("curve"):
                curve = np.asarray(stats[key]["curve"])
                offset = stats["vae"]["steps"] if key == "decoder" else 0  # the decoder fine-tune follows the VAE
                ax.plot(curve[:, 0] + offset, curve[:, 1], label=f"{key} ({stats[key]['steps']} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (smoothed)")
        ax.set_yscale("log")
        ax.set_title("srd-tiny VAE" if name == "vae" else "srd-tiny flow matching (EMA of batch loss)")
        ax.legend()
        fig.tight_layout()
        path = img_dir / f"srd-tiny-{name}-loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def save_bundle(out: Path, tokenizer, text_encoder, vae, sketch, render, boundary_ratio) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=M.make_scheduler(),
                       transformer=sketch, transformer_2=render, boundary_ratio=boundary_ratio)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def load_or_train_dit(kind: str, norm, prompt_ids, table, lens, args, resume: bool):
    """The `kind` DiT from its checkpoint in --work if `resume` and one is there, else trained and saved there."""
    from diffusers import WanTransformer3DModel

    ckpt = args.work / kind
    if resume and (ckpt / "config.json").exists():
        log(f"{kind}: resumed")
        return WanTransformer3DModel.from_pretrained(ckpt).eval(), json.loads(
            (args.work / f"{kind}_stats.json").read_text())
    a = vars(args)
    cfg = M.SKETCH if kind == "sketch" else M.dit_config(args.render_layers, args.render_heads)
    model, stats = train_dit(kind, cfg, norm, prompt_ids, table, lens, args, a[f"{kind}_steps"],
                             a[f"{kind}_minutes"], a[f"{kind}_lr"], a[f"{kind}_batch"], a[f"{kind}_stop"])
    model.save_pretrained(ckpt)
    (args.work / f"{kind}_stats.json").write_text(json.dumps(stats))
    return model, stats


def spawn_stage(kind: str, argv: list[str], work: Path) -> subprocess.Popen:
    """This same command in a child process that resumes the VAE and latents and trains only `kind` on 1 thread."""
    cmd = [sys.executable, "-m", "srserve.tiny.train", *argv, "--resume", "--only", kind, "--threads", "1"]
    log(f"{kind}: training in a child process, log {work / (kind + '.log')}")
    return subprocess.Popen(cmd, stdout=open(work / f"{kind}.log", "w"), stderr=subprocess.STDOUT)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="srserve tiny train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle directory to write")
    p.add_argument("--work", type=Path, default=Path("runs/tiny-train"), help="checkpoints, logs, stats")
    p.add_argument("--img-dir", type=Path, default=None, help="where loss PNGs go (default: --work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="reuse finished stages found in --work")
    p.add_argument("--parallel", action="store_true",
                   help="after the VAE, train the sketch DiT in a child process (1 thread) while this one trains "
                        "the render DiT and the decoder (1 thread): uses both cores of a 2-core machine")
    p.add_argument("--only", choices=["sketch", "render"], default=None,
                   help="train just this DiT (VAE and latents resumed from --work), save it to --work and stop")
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-stop", type=int, default=None, help="stop after this many steps (default: --vae-steps)")
    p.add_argument("--vae-minutes", type=float, default=28.0)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--vae-image-steps", type=int, default=1500, help="first steps on single frames")
    p.add_argument("--vae-image-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=40, help="train on crops (multiple of 8) around the object")
    p.add_argument("--vae-lr", type=float, default=3e-4)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--decoder-steps", type=int, default=1000, help="last stage: decoder fine-tune, encoder frozen")
    p.add_argument("--decoder-stop", type=int, default=None)
    p.add_argument("--decoder-minutes", type=float, default=12.0)
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--decoder-edges", type=float, default=0.5)
    p.add_argument("--clips", default="core:2160,pair:6600,then:3240",
                   help="DiT training clips per prompt form, FORM:COUNT,...")
    p.add_argument("--vae-forms", default="core,pair,then", help="prompt forms of the VAE's training clips")
    p.add_argument("--sketch-steps", type=int, default=3800)
    p.add_argument("--sketch-stop", type=int, default=None, help="stop after this many steps (default: --sketch-steps)")
    p.add_argument("--sketch-minutes", type=float, default=62.0)
    p.add_argument("--sketch-lr", type=float, default=5e-4)
    p.add_argument("--sketch-batch", type=int, default=32)
    p.add_argument("--render-steps", type=int, default=14000)
    p.add_argument("--render-stop", type=int, default=None, help="stop after this many steps (default: --render-steps)")
    p.add_argument("--render-minutes", type=float, default=45.0)
    p.add_argument("--render-lr", type=float, default=1e-3)
    p.add_argument("--render-batch", type=int, default=32)
    p.add_argument("--render-layers", type=int, default=M.RENDER["num_layers"])
    p.add_argument("--render-heads", type=int, default=M.RENDER["num_attention_heads"], help="x 32 = its width")
    p.add_argument("--render-max-sigma", type=float, default=0.9,
                   help="the render DiT trains on noise levels s <= this (the bundle hands over at s <= 0.89)")
    p.add_argument("--render-sigma-power", type=float, default=1.5,
                   help="render noise levels are --render-max-sigma * u**power, u uniform: > 1 favours low noise")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--boundary-ratio", type=float, default=None,
                   help="boundary_ratio written to model_index.json (None: plain diffusers runs sketch only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    stats: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    t_start = time.perf_counter()

    tokenizer = build_tokenizer()
    text_encoder = M.make_text_encoder(args.seed)
    table, lens = prompt_table(tokenizer, text_encoder)

    vae_dir = work / "vae"
    if args.resume and (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKLWan

        vae, stats["vae"] = AutoencoderKLWan.from_pretrained(vae_dir).eval(), json.loads(
            (work / "vae_stats.json").read_text())
        log("vae: resumed")
    else:
        vae, stats["vae"] = train_vae(args)
        vae.save_pretrained(vae_dir)
        (work / "vae_stats.json").write_text(json.dumps(stats["vae"]))

    lat_path = work / "latents.pt"
    if args.resume and lat_path.exists():
        latents, prompt_ids, stats["encode"] = torch.load(lat_path).values()
    else:
        latents, prompt_ids, stats["encode"] = encode_dataset(vae, args)
        torch.save({"latents": latents, "ids": prompt_ids, "stats": stats["encode"]}, lat_path)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    norm = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    stats["latents"] = {"mean": mean.tolist(), "std": std.tolist(), "normalized_var": norm.var().item()}
    log(f"latent std per channel {[round(v, 3) for v in std.tolist()]}, normalized var {norm.var().item():.3f}")

    child = None
    if args.parallel and not args.only and not (args.resume and (work / "sketch" / "config.json").exists()):
        child = spawn_stage("sketch", argv if argv is not None else sys.argv[1:], work)
        torch.set_num_threads(1)  # the other core is the child's
    kinds = [args.only] if args.only else [k for k in ("sketch", "render") if not (child and k == "sketch")]
    models = {}
    for kind in kinds:
        # --only always trains: it is the child of a --parallel run, which resumes only the VAE and latents
        models[kind], stats[kind] = load_or_train_dit(kind, norm, prompt_ids, table, lens, args,
                                                      resume=args.resume and not args.only)
    if args.only:
        return 0

    if args.decoder_steps > 0:
        dec_dir = work / "vae_decoder"
        if args.resume and (dec_dir / "config.json").exists():
            from diffusers import AutoencoderKLWan

            vae, stats["decoder"] = AutoencoderKLWan.from_pretrained(dec_dir).eval(), json.loads(
                (work / "decoder_stats.json").read_text())
            log("vae decoder: resumed")
        else:
            stats["decoder"] = finetune_decoder(vae, args)
            vae.save_pretrained(dec_dir)
            (work / "decoder_stats.json").write_text(json.dumps(stats["decoder"]))

    if child is not None:
        if child.wait() != 0:
            raise SystemExit(f"the sketch stage failed (exit {child.returncode}); see {work / 'sketch.log'}")
        models["sketch"], stats["sketch"] = load_or_train_dit("sketch", norm, prompt_ids, table, lens, args,
                                                              resume=True)
    for kind in ("sketch", "render"):
        stats[kind]["step_flops"] = M.step_flops(models[kind])
        stats[kind]["step_seconds"] = M.step_seconds(models[kind])
    stats["flops_ratio"] = stats["sketch"]["step_flops"] / stats["render"]["step_flops"]
    stats["seconds_ratio"] = stats["sketch"]["step_seconds"] / stats["render"]["step_seconds"]
    stats["vae_reconstruction"] = reconstruction_summary(vae)  # the ceiling of any generator on these latents
    stats["total_seconds"] = round(time.perf_counter() - t_start, 1)  # this invocation (less when resumed)
    stats["train_seconds"] = round(sum(stats[k]["seconds"] for k in ("vae", "encode", "sketch", "render", "decoder")
                                       if k in stats), 1)  # all stages, resumed ones included
    save_bundle(args.out, tokenizer, text_encoder, vae, models["sketch"], models["render"], args.boundary_ratio)
    stats["plots"] = plot_curves(stats, args.img_dir or work)
    (work / "train.json").write_text(json.dumps(stats, indent=1))
    summary = {k: v for k, v in stats.items() if k not in ("vae", "decoder", "sketch", "render", "latents", "args")}
    summary.update({k: {kk: vv for kk, vv in stats[k].items() if kk != "curve"}
                    for k in ("vae", "decoder", "sketch", "render") if k in stats})
    (args.out / "training_stats.json").write_text(json.dumps(summary, indent=1))
    log(f"bundle written to {args.out}; flops ratio {stats['flops_ratio']:.1f}, "
        f"seconds ratio {stats['seconds_ratio']:.1f}, total {stats['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
