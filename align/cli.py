"""`align` command line: sft, grpo, eval, report, merge, config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from align.errors import AlignError

RECIPE_HELP = "YAML recipe (see recipes/); omit to use the embedded tiny defaults"
OVERRIDE_HELP = "key.sub=value overrides, e.g. train.max_steps=50 lora.r=8 (list keys: align config --doc)"


def _cfg(args):
    from align.config import load_config

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe] + overrides
    return load_config(recipe, overrides)


def cmd_config(args) -> int:
    from align.config import describe, dump_yaml

    if args.doc:
        print("\n".join(describe()))
        return 0
    print(dump_yaml(_cfg(args)), end="")
    return 0


def _stage(run, cfg) -> int:
    """Run a training stage; if it fails before its final model, the run it was replacing comes back."""
    from transformers.utils import logging as hf_logging

    from align import rundir

    import datasets

    # One progress line per phase: no "Loading weights" / "Writing model shards" / dataset-map bars.
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        summary = run(cfg)
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:
            rundir.restore_previous(cfg.output.dir)
        raise
    print(_brief(summary))
    return 0


def _brief(summary: dict) -> str:
    """The few numbers that matter; everything is in ``<output.dir>/summary.json``."""
    before, after = summary.get("held_out_before") or {}, summary.get("held_out_after") or {}
    get = summary.get
    lines = [f"{get('stage')}: {get('steps')} steps in {get('wall_s')} s -> {get('final')}"]
    for k in ("greedy_accuracy", "sampled_accuracy", "sampled_pass@4"):
        if isinstance(after.get(k), float):
            was = f"{100 * before[k]:.1f} -> " if isinstance(before.get(k), float) else ""
            lines.append(f"  held-out {k}: {was}{100 * after[k]:.1f}%")
    lines.append(f"  full summary: {Path(str(summary.get('final'))).parent / 'summary.json'}")
    return "\n".join(lines)


def cmd_sft(args) -> int:
    cfg = _cfg(args)  # before torch and TRL import: a config error answers in a moment
    from align.sft import run_sft

    return _stage(run_sft, cfg)


def cmd_grpo(args) -> int:
    cfg = _cfg(args)
    from align.grpo.loop import run_grpo

    return _stage(run_grpo, cfg)


def cmd_eval(args) -> int:
    from eval.run import run_eval

    print(run_eval(args.checkpoints, args.tasks, args.recipe, args.overrides, args.out, args.n, args.k))
    return 0


def cmd_report(args) -> int:
    from eval.report import write_report

    print(write_report(args.run_dirs, args.out, args.eval))
    return 0


def cmd_merge(args) -> int:
    from align.merge import merge_checkpoint

    print(merge_checkpoint(args.checkpoint, args.out, args.dtype, args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="SFT then GRPO post-training for DeepSeek-V2 MoE models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(sp):
        sp.add_argument("recipe", nargs="?", help=RECIPE_HELP)
        sp.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
        return sp

    sft = sub.add_parser("sft", help="supervised fine-tuning -> Chat (SFT) checkpoint",
                         description="Fine-tune with LoRA (or fully) on chat data; writes <output.dir>/final.")
    with_recipe(sft).set_defaults(fn=cmd_sft)
    grpo = sub.add_parser("grpo", help="GRPO with rule-based rewards -> Chat (RL) checkpoint",
                          description="GRPO from an SFT checkpoint; writes <output.dir>/final.")
    with_recipe(grpo).set_defaults(fn=cmd_grpo)
    c = with_recipe(sub.add_parser("config", help="print the resolved config (or --doc: every key)"))
    c.add_argument("--doc", action="store_true", help="print every config key with its type, default and meaning")
    c.set_defaults(fn=cmd_config)
    e = sub.add_parser("eval", help="evaluate checkpoints on tasks with the training verifiers")
    e.add_argument("checkpoints", nargs="+", help="checkpoint dirs, model paths, hub ids, or 'tiny'")
    e.add_argument("--tasks", default="synthetic", help="comma list: synthetic, gsm8k, math500, humaneval, mbpp")
    e.add_argument("--recipe", default=None, help="recipe whose model/rollout/eval sections to use")
    e.add_argument("--n", type=int, default=None, help="samples per prompt")
    e.add_argument("--k", default=None, help="comma list of k for pass@k")
    e.add_argument("--out", default="runs/eval", help="output directory")
    e.add_argument("-o", "--set", dest="overrides", action="append", default=[], help=OVERRIDE_HELP)
    e.set_defaults(fn=cmd_eval)
    r = sub.add_parser("report", help="plots and a markdown summary of one or more runs")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", default=None, help="report directory (default: the first run dir)")
    r.add_argument("--eval", default=None, help="an `align eval --out` directory whose table to include")
    r.set_defaults(fn=cmd_report)
    m = sub.add_parser("merge", help="fold a LoRA checkpoint into a full Hugging Face model")
    m.add_argument("checkpoint")
    m.add_argument("out")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    m.set_defaults(fn=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rewards.sandbox import SandboxUnavailable
    from rollout.base import EngineError

    try:
        return args.fn(args)
    except (AlignError, EngineError, SandboxUnavailable) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
