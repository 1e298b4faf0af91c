"""Throughput of critic scoring: one batched forward pass vs ``generate()``-then-parse.

    python benchmarks/critic_score.py --tiny [--samples 32] [--batch-sizes 8 1] [--max-new-tokens 16]
    python benchmarks/critic_score.py --critic llava-hf/llava-1.5-7b-hf --device cuda [--adapter DIR]
    python benchmarks/critic_score.py --random-llava15-7b --device cuda   # same shapes, random weights, no download

Three ways to get a yes/no judgement for the same N (views, caption) samples from the same model:

* **single-pass** -- :meth:`Critic.score`: one forward pass per batch, P(Yes) read from the logits
  at the first answer position (this project's critic), at each batch size given (B and 1);
* **generate** -- the way LLaVA-Critic-style evaluators work: the same question through the
  processor's chat template and its own image preprocessing (of the same tiled grid), then
  ``model.generate(max_new_tokens=k)`` (greedy), decode, and parse the first "yes"/"no" in the
  text. By default ``min_new_tokens=k`` too, so every sample decodes exactly k tokens: a random
  tiny model would otherwise stop at a random early EOS (or never say yes/no at all), and the
  cost being measured is that of generating an answer of k tokens, whatever it says.
  ``--allow-early-stop`` lets a real model stop at EOS.

Every timed run includes the preprocessing from PIL views (tiling, resizing, normalising,
tokenising). Timing: one process loads the model once, runs a warm-up batch of every
configuration, then ``--repeats`` rounds in which each configuration makes a full pass over the N
samples in turn (interleaved, so load from other processes on a shared machine hits all alike);
the median pass is reported. Peak memory is measured separately, each configuration in its own
fresh process (warm-up batch + one full pass): on CUDA ``torch.cuda.max_memory_allocated``
(weights included); on CPU, the peak resident set size of that process during the runs (``/proc/self/statm``
sampled every 2 ms in a thread; weights and the Python/torch runtime included) and its increase
over the RSS once the model and the inputs are loaded, i.e. the working memory of scoring
(``ru_maxrss``, the lifetime peak that includes loading, is kept in the ``--json`` output). Ratios are against the ``generate`` baseline, measured in the same run on the same machine: the
per-sample generate loop (batch 1), which is how generate-then-parse evaluators run (LLaVA's
``model_vqa.py`` asks one question at a time; its ``model_vqa_loader.py`` asserts batch size 1),
and also against ``generate`` at the same batch size, the stricter comparison (left-padded batched
generation, which this script also runs). The
issue's target: single-pass at least 5x the generate baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAPTIONS = [
    "a red cube on top of a yellow cylinder",
    "two blue spheres to the left of a green cone",
    "one torus",
    "three purple cylinders",
    "a black cube next to a white sphere",
    "an orange cone behind two brown cubes",
]
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- worker (one configuration)


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RssSampler:
    """Peak RSS while it runs, sampled every ``interval`` s in a thread.

    ``ru_maxrss`` alone is the process's lifetime peak, which may come from loading the model
    rather than from scoring; sampling covers just the runs.
    """

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval, self.peak = interval, _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def make_inputs(n: int, num_views: int, view_size: int, seed: int):
    """N samples of V random RGB views (PIL) and captions; the same for every configuration."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    views = [[Image.fromarray(rng.integers(0, 256, (view_size, view_size, 3), dtype=np.uint8)) for _ in range(num_views)] for _ in range(n)]
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return views, prompts


def _generate_runner(critic, max_new_tokens: int, force_length: bool):
    """A function (views, prompts) -> (answers, parsed, new tokens) doing generate-then-parse."""
    import numpy as np
    import torch
    from PIL import Image

    from coherendream.grid import tile
    from coherendream.prompts import prompt_messages

    processor, tokenizer, config = critic.processor, critic.tokenizer, critic.config
    layout = config.layout() if config.image_mode == "grid" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(views, prompts):
        if layout is not None:
            images = [[Image.fromarray(tile(np.stack([np.asarray(v.convert("RGB")) for v in sample]), layout))] for sample in views]
        else:
            images = [[v.convert("RGB") for v in sample] for sample in views]
        texts = [
            processor.apply_chat_template(prompt_messages(q, len(im)), add_generation_prompt=True, tokenize=False)
            for q, im in zip(critic.questions(prompts), images)
        ]
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (bos and all(t.startswith(bos) for t in texts))  # the rule Critic uses
        inputs = processor(text=texts, images=images, padding=True, padding_side="left",
                           add_special_tokens=add_special, return_tensors="pt").to(critic.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(critic.dtype)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id}
        if force_length:
            kwargs["min_new_tokens"] = max_new_tokens
        with torch.no_grad():
            out = critic.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new, skip_special_tokens=True)
        parsed = [(m.group(1).lower() if (m := _YES_NO.search(a)) else None) for a in answers]
        return answers, parsed, int((new != pad_id).sum())

    return run


def load(spec: dict):
    """The critic and the N inputs of a run."""
    import torch

    from coherendream.critic import Critic

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    critic = Critic.from_pretrained(spec["model"], adapter=spec["adapter"], device=spec["device"], dtype=spec["dtype"])
    views, prompts = make_inputs(spec["samples"], critic.config.num_views, spec["view_size"], spec["seed"])
    return critic, views, prompts


def make_pass(critic, views, prompts, method: str, batch: int, spec: dict):
    """``(warm_up, full_pass)`` of one configuration: one batch, and all N samples in batches."""
    import torch

    cuda = critic.device.type == "cuda"
    if method == "score":
        def step(v, p):
            with torch.no_grad():
                return critic.score(v, p).prob_yes.cpu()
    else:
        step = _generate_runner(critic, spec["max_new_tokens"], not spec["allow_early_stop"])

    def run(n: int):
        outs = [step(views[i:i + batch], prompts[i:i + batch]) for i in range(0, n, batch)]
        if cuda:
            torch.cuda.synchronize()
        return outs

    return (lambda: run(batch)), (lambda: run(len(prompts)))


def worker(spec: dict) -> dict:
    """Peak memory of one configuration, in this fresh process: warm-up batch + one full pass."""
    import torch

    critic, views, prompts = load(spec)
    cuda = critic.device.type == "cuda"
    rss_loaded = _rss_mib()  # model and inputs in memory, nothing run yet
    warm_up, full_pass = make_pass(critic, views, prompts, spec["method"], spec["batch_size"], spec)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as sampler:
        warm_up()
        full_pass()
    if cuda:
        return {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20, "mem_kind": "CUDA max_memory_allocated"}
    return {"peak_mem_mib": sampler.peak, "mem_delta_mib": sampler.peak - rss_loaded,
            "ru_maxrss_mib": _peak_rss_mib(), "mem_kind": "peak RSS during runs"}


def time_interleaved(spec: dict, configs: list[tuple[str, int]], repeats: int) -> list[dict]:
    """Median seconds per full pass of each configuration, measured round-robin in one process.

    Round-robin (A B C, A B C, ...) rather than one configuration after the other, so that load
    from other processes on a shared machine hits every configuration alike.
    """
    critic, views, prompts = load(spec)
    passes = [make_pass(critic, views, prompts, method, batch, spec) for method, batch in configs]
    for warm_up, _ in passes:
        warm_up()
    times: list[list[float]] = [[] for _ in configs]
    last: list = [None] * len(configs)
    for _ in range(repeats):
        for i, (_, full_pass) in enumerate(passes):
            start = time.perf_counter()
            last[i] = full_pass()
            times[i].append(time.perf_counter() - start)
    results = []
    for (method, batch), seconds, outs in zip(configs, times, last):
        median = statistics.median(seconds)
        result = {"method": method, "batch_size": batch, "seconds": seconds, "median_s": median,
                  "samples_per_s": len(prompts) / median, "max_new_tokens": spec["max_new_tokens"]}
        if method == "generate":
            result["parsed_yes_no"] = sum(p is not None for _, ps, _ in outs for p in ps)
            result["new_tokens_per_sample"] = sum(t for _, _, t in outs) / len(prompts)
            result["example_answer"] = outs[0][0][0][:80]
        results.append(result)
    return results


# --------------------------------------------------------------------------- driver


def run_isolated(spec: dict) -> dict:
    """Run :func:`worker` in a fresh interpreter, so each peak-memory figure is its own."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {spec['method']} batch {spec['batch_size']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    # --critic as in the commands; --model, the older spelling, still works
    source.add_argument("--critic", "--model", dest="critic", help="critic checkpoint (hub id or folder), e.g. llava-hf/llava-1.5-7b-hf")
    source.add_argument("--tiny", action="store_true", help="build a tiny random LLaVA critic offline and use it")
    source.add_argument("--random-llava15-7b", action="store_true",
                        help="build a random model with LLaVA-1.5-7B's shapes (bf16, ~14 GB on disk) offline and use it: "
                             "the same cost per step as the real model where the hub cannot be reached")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder on top of --critic")
    parser.add_argument("--tiny-image-size", type=int, default=64, help="image size of the tiny critic (default 64)")
    parser.add_argument("--tiny-patch-size", type=int, default=8,
                        help="patch size of the tiny critic (default 8); 336/14 gives LLaVA-1.5's 576 image tokens")
    parser.add_argument("--samples", type=int, default=32, help="samples per timed pass (default 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], help="single-pass batch sizes (default 8 1)")
    parser.add_argument("--generate-batch-sizes", type=int, nargs="*", default=None,
                        help="batch sizes of the generate baseline (default: 1 and the largest of --batch-sizes)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--allow-early-stop", action="store_true", help="let generate stop at EOS (default: exactly k tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--view-size", type=int, default=256, help="pixels per rendered view (default 256)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    if not (args.critic or args.tiny or args.random_llava15_7b):
        parser.error("give --critic PATH, --tiny or --random-llava15-7b")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.critic
        if args.tiny:
            from coherendream.critic import build_tiny_critic

            model = str(build_tiny_critic(Path(tmp) / "tiny", image_size=args.tiny_image_size, patch_size=args.tiny_patch_size))
        elif args.random_llava15_7b:
            from coherendream.critic.tiny import LLAVA15_7B_SHAPES, build_tiny_critic

            print("building a random LLaVA-1.5-7B-shaped critic ...", file=sys.stderr, flush=True)
            model = str(build_tiny_critic(Path(tmp) / "random-llava15-7b", **LLAVA15_7B_SHAPES, dtype=torch.bfloat16))
        base = {"model": model, "adapter": args.adapter, "device": device, "dtype": args.dtype, "samples": args.samples,
                "view_size": args.view_size, "seed": args.seed, "repeats": args.repeats, "threads": args.threads,
                "max_new_tokens": args.max_new_tokens, "allow_early_stop": args.allow_early_stop}
        gen_sizes = sorted(set(args.generate_batch_sizes or [1, max(args.batch_sizes)]), reverse=True)
        if 1 not in gen_sizes:
            parser.error("--generate-batch-sizes must include 1: the per-sample generate loop is the baseline")
        configs = [("score", b) for b in args.batch_sizes] + [("generate", b) for b in gen_sizes]
        print(f"timing {len(configs)} configurations, {args.repeats} interleaved rounds ...", file=sys.stderr, flush=True)
        results = time_interleaved(base, configs, args.repeats)
        for result in results:
            print(f"peak memory of {result['method']} batch {result['batch_size']} (fresh process) ...", file=sys.stderr, flush=True)
            result.update(run_isolated({**base, "method": result["method"], "batch_size": result["batch_size"]}))

    reference = next(r for r in results if r["method"] == "generate" and r["batch_size"] == 1)
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads: {args.threads or torch.get_num_threads()})"
    tokens = (args.tiny_image_size // args.tiny_patch_size) ** 2
    name = f"tiny random LLaVA ({args.tiny_image_size} px, {tokens} image tokens)" if args.tiny else args.critic
    if args.random_llava15_7b:
        name = "random weights in LLaVA-1.5-7B's shapes (336 px, 576 image tokens, 7.06 B parameters)"
    print(f"model: {name}; device: {dev}; "
          f"{args.samples} samples of 4 views at {args.view_size} px; median of {args.repeats} interleaved rounds after a warm-up batch; "
          f"generate: max_new_tokens={args.max_new_tokens}{'' if args.allow_early_stop else ' (forced: min_new_tokens = max_new_tokens)'}")
    mem_kind = results[0]["mem_kind"]
    delta = "mem_delta_mib" in results[0]
    print()
    print(f"| method | batch | samples/s | median s / {args.samples} samples | vs generate baseline (per sample, batch 1) "
          f"| vs generate (same batch) | {mem_kind}, MiB |"
          + (" increase over loaded model + inputs, MiB |" if delta else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if delta else ""))
    generate_at = {r["batch_size"]: r for r in results if r["method"] == "generate"}
    for r in results:
        name = "single-pass `Critic.score`" if r["method"] == "score" else f"`generate` + parse (k={r['max_new_tokens']})"
        ratio = r["samples_per_s"] / reference["samples_per_s"]
        same = generate_at.get(r["batch_size"])
        same_ratio = f"{r['samples_per_s'] / same['samples_per_s']:.1f}x" if same else "-"
        print(f"| {name} | {r['batch_size']} | {r['samples_per_s']:.1f} | {r['median_s']:.3f} | {ratio:.1f}x | {same_ratio} | {r['peak_mem_mib']:.0f} |"
              + (f" {r['mem_delta_mib']:.0f} |" if delta else ""))
    for r in results:
        if r["method"] == "generate":
            print(f"\ngenerate batch {r['batch_size']}: {r['new_tokens_per_sample']:.1f} new tokens/sample; a yes/no parsed in "
                  f"{r['parsed_yes_no']}/{args.samples} answers (e.g. {r['example_answer']!r}); a random tiny model need not say "
                  "yes or no: what is measured is the cost of generating the answer.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
