"""Bytes per hop: what each stage-to-stage hop of a disaggregated request moves, for srd-tiny and for Wan2.1's
480p x 81-frame shape, through the serving layer's own wire form (`srserve.serving.messages.dump_state`).

srd-tiny states come from the real engine (encode, prepare, sketch to the request's switch step). The Wan2.1
state is built without weights: latents 16x21x60x104 (float32, as diffusers' WanPipeline keeps them), prompt and
negative embeddings 2 x 512 x 4096 (bfloat16, the text encoder's dtype), and Wan's UniPC scheduler (flow_shift
3.0, 50 steps) stepped to the switch step with random model outputs, so its carried history has its real size.

    python benchmarks/hop_bytes.py --out benchmarks/results/hop_bytes.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from srserve.config import GenerationRequest
from srserve.pipeline.handoff import HandoffState, PromptEmbeddings, capture_scheduler
from srserve.serving.messages import dump_state

WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type":
                 "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2}


def wire_bytes(state: HandoffState) -> int:
    header, buffers = dump_state(state)
    return len(header) + sum(b.raw().nbytes for b in buffers)


def embeddings_bytes(embeddings: PromptEmbeddings) -> int:
    return sum(t.numel() * t.element_size() for t in (embeddings.prompt_embeds, embeddings.negative_prompt_embeds)
               if t is not None)


def hops(prepared: HandoffState, sketched: HandoffState, rendered: HandoffState) -> dict[str, Any]:
    """Bytes each receiver gets: the state without embeddings, plus the embeddings it fetches by reference."""
    emb = embeddings_bytes(prepared.embeddings)
    out = {
        "encode->sketch": {"state": wire_bytes(prepared.replace(embeddings=None)), "embeddings_by_reference": emb},
        "sketch->render": {"state": wire_bytes(sketched.replace(embeddings=None)), "embeddings_by_reference": emb},
        "render->decode": {"state": wire_bytes(rendered.for_decode()), "embeddings_by_reference": 0},
    }
    # For contrast: the whole state on every hop, embeddings included (what crossed before each hop carried only
    # what its receiver reads; `previous_output` then also crossed sketch->render, one more latent-sized tensor).
    whole = {"encode->sketch": prepared, "sketch->render": sketched, "render->decode": rendered}
    for name, state in whole.items():
        out[name]["whole_state"] = wire_bytes(state)
    out["embeddings_put_once"] = emb
    out["total_moved"] = sum(h["state"] + h["embeddings_by_reference"] for k, h in out.items() if "->" in k)
    return out


def srd_tiny(switch: str) -> dict[str, Any]:
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    engine = SREngine.load(resolve_model_spec(default_model_path()))
    request = engine.resolve(GenerationRequest(prompt="a red circle moving right", seed=1, switch=switch))
    prepared = engine.prepare(request, engine.encode(request))
    sketched = engine.sketch(prepared)
    rendered = engine.render(sketched)
    shape = f"{request.width}x{request.height} x {request.num_frames} frames, {request.num_inference_steps} steps"
    return {"model": "srd-tiny", "shape": shape, "switch_step": sketched.switch_step,
            "hops": hops(prepared, sketched, rendered)}


def wan_480p(switch_step: int = 15, steps: int = 50) -> dict[str, Any]:
    import diffusers

    latents = torch.randn(1, 16, 21, 60, 104)
    embeddings = PromptEmbeddings(torch.randn(1, 512, 4096).to(torch.bfloat16),
                                  torch.randn(1, 512, 4096).to(torch.bfloat16))
    scheduler = diffusers.UniPCMultistepScheduler.from_config(WAN_SCHEDULER)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    request = GenerationRequest(prompt="x", num_inference_steps=steps, num_frames=81, height=480, width=832,
                                switch=f"step:{switch_step}", guidance_scale_2=5.0)

    def state_at(step: int, sample: torch.Tensor) -> HandoffState:
        name, config, carried = capture_scheduler(scheduler)
        return HandoffState(request=request, family="wan", latents=sample, step_index=step,
                            timesteps=scheduler.timesteps, scheduler_class=name, scheduler_config=config,
                            scheduler_state=carried, embeddings=embeddings,
                            generator_state=torch.Generator().get_state(), switch_step=switch_step)

    prepared, sample = state_at(0, latents), latents
    for i in range(steps):
        sample = scheduler.step(torch.randn_like(sample), scheduler.timesteps[i], sample, return_dict=False)[0]
        if i + 1 == switch_step:
            sketched = state_at(switch_step, sample)
    rendered = state_at(steps, sample)
    return {"model": "Wan2.1 480p shape (no weights)", "shape": f"832x480 x 81 frames, {steps} steps",
            "switch_step": switch_step, "hops": hops(prepared, sketched, rendered)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | hop | state (kB) | + embeddings by reference (kB) | whole state, for contrast (kB) |",
             "|---|---|---|---|---|"]
    for r in results:
        for name, h in r["hops"].items():
            if "->" in name:
                lines.append(f"| {r['model']} ({r['shape']}, k={r['switch_step']}) | {name} | {h['state'] / 1e3:,.1f} "
                             f"| {h['embeddings_by_reference'] / 1e3:,.1f} | {h['whole_state'] / 1e3:,.1f} |")
        lines.append(f"| | all hops | {r['hops']['total_moved'] / 1e3:,.1f} (embeddings put once: "
                     f"{r['hops']['embeddings_put_once'] / 1e3:,.1f}) | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", default="adaptive", help="srd-tiny's switch policy")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    results = [srd_tiny(opts.switch), wan_480p()]
    print(table(results))
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
