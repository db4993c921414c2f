"""`srserve generate | serve | eval | tiny train | plan`: the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

GENERATE_EPILOG = """switch policies: none (large only), small-only, step:K, ratio:R,
adaptive[:THRESHOLD][:min=K][:max=K] (SRDiffusion's self-diff rule; default threshold 0.01)"""


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT, e.g. 832x480, got {text!r}") from None
    return width, height


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one video in this process", epilog=GENERATE_EPILOG)
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="diffusers directory or YAML/JSON spec (default: the bundled "
                                                 "srd-tiny)")
    p.add_argument("--switch", default=None, help="switch policy (default: the model's, usually adaptive)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default: the model's)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--guidance-2", type=float, default=None,
                   help="the render (small) model's guidance (default: the model's, else --guidance)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the spec's, cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default=None, help="native, xformers, flash, _native_cudnn, ...")
    p.add_argument("--out", default="out/video.mp4", help="output .mp4 (H.264) or .npy (float32 frames)")
    p.add_argument("--json", action="store_true", help="print one JSON line with timings")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve srserve's metrics (Prometheus format) on 127.0.0.1:PORT while generating")


def run_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from srserve.config import GenerationRequest
    from srserve.pipeline.families import load_engine
    from srserve.pipeline.spec import ModelSpecError, resolve_model_spec
    from srserve.pipeline.video import write_video
    from srserve.tiny import default_model_path

    if not args.out.endswith((".mp4", ".npy")):
        print(f"error: --out {args.out!r} must end in .mp4 or .npy", file=sys.stderr)
        return 2
    if args.metrics_port is not None:  # no Ray here, so prometheus-client serves them (srserve/serving/prom.py)
        from srserve.serving.prom import serve_metrics

        print(f"metrics at {serve_metrics(args.metrics_port)}", file=sys.stderr)
    width, height = args.size if args.size else (None, None)
    try:
        request = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            num_frames=args.frames, height=height, width=width, seed=args.seed, guidance_scale=args.guidance,
            guidance_scale_2=args.guidance_2,
            switch=args.switch, max_sequence_length=args.max_sequence_length,
        )
        spec = resolve_model_spec(args.model or default_model_path(), device=args.device, dtype=args.dtype,
                                  attention_backend=args.attention_backend)
        engine = load_engine(spec)  # SREngine, or the simulated family's
        request = engine.resolve(request)
    except (ValidationError, ModelSpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timer, steps = _step_timer()
    with tqdm(total=request.num_inference_steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        result = engine.generate(request, on_step=lambda i, n: (bar.update(i - bar.n), timer(i, n)))
    if args.metrics_port is not None:
        _record_run(spec.name, request.switch, result, steps)
    path = write_video(result.frames, args.out, fps=spec.fps)
    if args.json:
        print(json.dumps({
            "output": str(path), "model": spec.name, "switch": request.switch, "switch_step": result.switch_step,
            "num_inference_steps": result.num_inference_steps, "num_frames": request.num_frames,
            "size": f"{request.width}x{request.height}", "seed": request.seed,
            **{k: round(v, 4) for k, v in result.timings.items()},
        }))
    else:
        print(path)
    return 0


def _step_timer() -> tuple[Callable[[int, int], None], list[tuple[int, float]]]:
    """An on_step callback noting (step, seconds since the previous step)."""
    import time

    steps: list[tuple[int, float]] = []
    last = [time.perf_counter()]

    def on_step(step: int, num_steps: int) -> None:
        now = time.perf_counter()
        steps.append((step, now - last[0]))
        last[0] = now
    return on_step, steps


def _record_run(model: str, switch: str, result: Any, steps: list[tuple[int, float]]) -> None:
    """The run's figures as a served job records them (stage "colocated": one process runs every role); a step is
    the sketch's when it comes before the switch step, known once the run is over."""
    from srserve.serving.metrics import JobMetrics, StageMetrics, policy_kind

    stage = StageMetrics("colocated", model)
    for step, seconds in steps:
        stage.observe_step(seconds, 1, "sketch" if step <= result.switch_step else "render")
    stage.observe_stage(result.timings["total_seconds"])
    JobMetrics(model).ended("completed", policy=policy_kind(switch), seconds=result.timings["total_seconds"],
                            switch_step=result.switch_step)


def _forward(name: str, help_text: str, target: Callable[[], Callable[[list[str]], int]],
             sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(name, help=help_text, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(forward=target)


FORWARDED = ("serve", "eval", "tiny", "plan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _forward("serve", "run the Ray Serve app (srserve serve [CONFIG] --help)",
             lambda: __import__("srserve.serving.runner", fromlist=["serve_main"]).serve_main, sub)
    _forward("eval", "score videos of the srd-tiny domain (srserve eval --help)",
             lambda: __import__("srserve.tiny.evaluate", fromlist=["main"]).main, sub)
    _forward("tiny", "srd-tiny tools: srserve tiny train|quality ...",
             lambda: _tiny_main, sub)
    _forward("plan", "capacity planner: pool sizes, p95 and $ per video per setup (srserve plan --help)",
             lambda: __import__("srserve.sim.plan", fromlist=["main"]).main, sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        # Forwarded commands own their flags, --help included.
        args = parser.parse_args([argv[0]])
        return args.forward()(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    return args.forward()(args.rest)


def _tiny_main(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        from srserve.tiny.train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "quality":
        from srserve.tiny.quality import main as quality_main

        return quality_main(argv[1:])
    print("usage: srserve tiny {train,quality} [--help]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
