"""Tracing + lowering cost against plain ``torch.export`` of the same model.

Two studies:

``gpt`` (the default) — a 12-layer GPT-style transformer with d_model = 1024 (16 heads, d_ff = 4096).
Reported: the best of ``--repeats`` wall times for

* ``torch.export.export(model, strict=False)`` alone (what every tracer pays);
* ``tpl.lower(model, base=...)``: the user's d_model=1024 model plus a base at d_model=256;
* ``tpl.lower("transformer", width=1024, ...)``: the registered family, traced at its small trace widths.

``models`` — tiny Hugging Face models built from configs (Llama, GPT-2, BERT; 2 layers, width 64) and the
built-in 12-layer GPT: ``torch.export`` alone against the whole ``tpl.lower`` (trace at two widths, the
state check, lowering, and the second lowering at another batch size that makes the program batch-generic),
with the time of each stage and the top entries of a cProfile of one lowering, restricted to tplimits' own
code.

Run: ``python benchmarks/bench_lowering.py`` (about a minute on 2 CPU cores) or
``python benchmarks/bench_lowering.py models`` (a few minutes; needs ``transformers``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
import warnings
from collections.abc import Callable

import torch

import tplimits as tpl
from tplimits.registry import manager as registry

CLOCK = time.perf_counter  # time.process_time with --cpu-time: what the run used, less disturbed by other jobs


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = CLOCK()
        result = fn()
        times.append(CLOCK() - start)
    return min(times), result


def gpt_study(args: argparse.Namespace) -> None:
    config = dict(n_layers=args.layers, n_heads=args.heads, vocab=256, seq_len=32, batch=2)
    arch = tpl.architecture("transformer")
    torch.manual_seed(0)
    model = arch.build(args.width, **config)
    base = arch.build(args.base_width, **config)
    inputs = arch.example_inputs(**config)
    torch.export.export(arch.build(64, **config), inputs, strict=False)  # warm up torch's own caches

    t_export, _ = best_of(lambda: torch.export.export(model, inputs, strict=False), args.repeats)
    t_base, prog = best_of(lambda: tpl.lower(model, base=base, example_inputs=inputs), args.repeats)
    t_name, _ = best_of(lambda: tpl.lower("transformer", width=args.width, **config), args.repeats)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers}-layer GPT-style transformer, d_model={args.width}, {params / 1e6:.0f}M parameters, "
          f"{len(prog)} program instructions {prog.counts()}")
    print(f"torch.export alone                         : {t_export:6.3f} s")
    print(f"tpl.lower(model, base=d_model {args.base_width:<4})        : {t_base:6.3f} s   "
          f"({t_base / t_export:.2f} x torch.export)")
    print(f"tpl.lower('transformer', width={args.width})      : {t_name:6.3f} s   "
          f"({t_name / t_export:.2f} x torch.export)")


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face models and the built-in GPT: where the time goes
# --------------------------------------------------------------------------------------------


def hf_models(width: int) -> dict[str, tuple[Callable[[int], torch.nn.Module], tuple]]:
    """name -> (width -> model, example inputs)."""
    import transformers as hf

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=100, max_position_embeddings=32)

    def llama(w: int) -> torch.nn.Module:
        return hf.LlamaForCausalLM(hf.LlamaConfig(hidden_size=w, intermediate_size=2 * w, num_key_value_heads=4,
                                                  use_cache=False, **common))

    def gpt2(w: int) -> torch.nn.Module:
        return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=w, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                                use_cache=False, bos_token_id=0, eos_token_id=0))

    def bert(w: int) -> torch.nn.Module:
        return hf.BertForSequenceClassification(hf.BertConfig(hidden_size=w, intermediate_size=4 * w, num_labels=3,
                                                              **common))

    return {"HF Llama": (llama, (ids,)), "HF GPT-2": (gpt2, (ids,)), "HF BERT": (bert, (ids,))}


def stages(arch: object, inputs: tuple | None, config: dict) -> dict[str, float]:
    """The stages of ``tpl.lower`` (core.frontend.lower_pair) timed one by one."""
    # imported here so that --no-stages times the whole lowering of an older checkout too
    from tplimits.core.frontend import resolve, with_batch_spec
    from tplimits.core.lower import lower_trace
    from tplimits.core.trace import check_no_state_updates, compare_widths, smaller, trace_graph

    rules = registry.lowering_rules()
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        start = CLOCK()
        result = fn()
        times[name] = CLOCK() - start
        return result

    pair = timed("build the two models", lambda: resolve(arch, inputs, None, **config))
    timed("state check (one forward)", lambda: check_no_state_updates(*smaller(pair), pair.inputs))
    main = timed("torch.export of the model", lambda: trace_graph(pair.model, pair.inputs))
    traced = timed("second width (more examples): trace + compare", lambda: compare_widths(pair, main))
    program = timed("lowering", lambda: lower_trace(traced, rules, pair.width))
    second = "another batch size" if traced.batch_trace is not None else "a separate trace at another batch size"
    timed(f"batch axes: lowering again ({second})", lambda: with_batch_spec(program, traced, pair, rules))
    return times


def own_profile(fn: Callable[[], object], top: int) -> str:
    """The ``top`` entries of tplimits' own code in a cProfile of ``fn``, by internal time."""
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = stats.total_tt
    stats.sort_stats("tottime").print_stats(r"/tplimits/", top)
    lines = [line for line in out.getvalue().splitlines() if "/tplimits/" in line]
    own = sum(row[2] for key, row in stats.stats.items() if "/tplimits/" in key[0])
    return (f"    profiled total {total:.2f} s, of which tplimits' own code (internal time) {own:.2f} s; top entries:\n"
            + "\n".join("    " + line.replace(os.getcwd() + "/", "") for line in lines))


def models_study(args: argparse.Namespace) -> None:
    cases = hf_models(args.hf_width)
    gpt_config = dict(n_layers=args.layers, n_heads=args.heads, vocab=256, seq_len=32, batch=2)
    rows = []
    for name, (make, inputs) in cases.items():
        lowered = lambda make=make, inputs=inputs: tpl.lower(make, example_inputs=inputs, width=args.hf_width)  # noqa: E731
        rows.append((name, make(args.hf_width), inputs, lowered, (make, inputs, {"width": args.hf_width})))
    arch = tpl.architecture("transformer")
    gpt_inputs = arch.example_inputs(**gpt_config)
    rows.append((f"built-in GPT ({args.layers} layers, d_model {args.width})", arch.build(args.width, **gpt_config),
                 gpt_inputs, lambda: tpl.lower("transformer", width=args.width, **gpt_config),
                 (registry.architecture("transformer"), None, {"width": args.width, **gpt_config})))
    load = os.getloadavg()[0]
    clock = "CPU seconds, one thread" if CLOCK is time.process_time else "wall clock"
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs, torch {torch.__version__}, {clock}")
    table = []
    for name, model, inputs, lowered, (arch_like, stage_inputs, config) in rows:
        torch.export.export(model, inputs, strict=False)  # warm up
        lowered()
        t_export, _ = best_of(lambda model=model, inputs=inputs: torch.export.export(model, inputs, strict=False),
                              args.repeats)
        t_lower, prog = best_of(lowered, args.repeats)
        parts = {} if args.no_stages else min(
            (stages(arch_like, stage_inputs, dict(config)) for _ in range(args.repeats)), key=lambda t: sum(t.values()))
        table.append((name, t_export, t_lower, len(prog)))
        print(f"\n{name}: {len(prog)} instructions, batch-generic {getattr(prog, 'batch_generic', None)}")
        print(f"  torch.export alone {t_export:.2f} s, tpl.lower {t_lower:.2f} s ({t_lower / t_export:.2f} x)")
        for stage, seconds in parts.items():
            print(f"    {stage:<52} {seconds:6.3f} s")
        if args.profile:
            print(own_profile(lowered, args.profile))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    print("\n| model | instructions | torch.export alone | tpl.lower | ratio |")
    print("|---|---|---|---|---|")
    for name, t_export, t_lower, count in table:
        print(f"| {name} | {count} | {t_export:.2f} s | {t_lower:.2f} s | {t_lower / t_export:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="gpt", choices=("gpt", "models"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--base-width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hf-width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=8, help="cProfile entries of tplimits' own code (0: none)")
    parser.add_argument("--cpu-time", action="store_true", help="CPU seconds of this process (one thread)")
    parser.add_argument("--no-stages", action="store_true", help="only torch.export and the whole tpl.lower")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    (gpt_study if args.study == "gpt" else models_study)(args)


if __name__ == "__main__":
    main()
