"""Evaluation throughput: scoring (log-likelihood) and KV-cache generation tokens/s of pythia-jax
against the HF PyTorch model with the same weights, on the same machine in the same run.

    python scripts/bench_eval.py                      # pythia-70m shape, random weights
    python scripts/bench_eval.py --model pythia-160m --requests 128 --batch-size 16

Scoring: zero-shot style requests (contexts of 40–300 tokens, 1–20 token continuations), both
sides sorted by length and batched the same way; tokens/s counts real (unpadded) tokens.
Generation: greedy, ``--new-tokens`` per prompt, left-padded prompts, both with a KV cache.
Generation task: ``--task-items`` arithmetic items (``pythia_jax.eval.arithmetic``, ``--task-shots``
shots) through ``generate_until`` (batches of ``--batch-size``, stop at a newline, at most 16 new
tokens) against HF ``generate`` with the same batches, left padding, 16-token limit and a stopping
criterion that ends a batch when every row has written a newline; items/s.
Memorization: the paper's score on real training rows (the bundled demo data in the demo run's
GPT-NeoX order): prompt = tokens [0, 32), 32 greedy tokens, per-row score = fraction equal to
tokens [32, 64); rows/s against HF ``generate`` (greedy, KV cache, same batches of rows, same
weights, never stopping early). Numerics: both sides float32 here (the original Pythia evaluation
generated in fp16 without a KV cache). Stacked scoring: K random checkpoints of the model scored in
one vmapped pass (``pythia_jax.eval.stacked``) against K separate ``Scorer`` passes (compilations
reused between them), tokens/s over all K, max |Δ loglik|.
Compilation (JAX) is timed separately and excluded from the throughput; each side's best of
``--repeats`` alternating runs is reported.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def alternating(jax_fn, hf_fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of each side over ``repeats`` alternating runs (the machine may be shared)."""
    t_jax, t_hf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax_fn()
        t_jax.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_fn()
        t_hf.append(time.perf_counter() - t0)
    return t_jax, t_hf


def best_of(jax_fn, hf_fn, repeats: int) -> tuple[float, float]:
    """Best wall time of each side over ``repeats`` alternating runs (the machine may be shared)."""
    t_jax, t_hf = alternating(jax_fn, hf_fn, repeats)
    return min(t_jax), min(t_hf)


def ratio_summary(t_jax: list[float], t_hf: list[float]) -> str:
    """HF time / ours per alternating turn: median and range (a turn's two runs share the load)."""
    r = sorted(h / j for j, h in zip(t_jax, t_hf))
    return f"ratio per turn median {float(np.median(r)):.2f}x, range {r[0]:.2f}-{r[-1]:.2f}x ({len(r)} turns)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-70m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-items", type=int, default=64, help="arithmetic items of the generation-task bench")
    p.add_argument("--task-shots", type=int, default=4)
    p.add_argument("--mem-rows", type=int, default=64, help="training rows of the memorization bench")
    p.add_argument("--stack", type=int, default=4, help="checkpoints of the stacked-scoring bench")
    p.add_argument("--sections", default="scoring,generation,task,memorization,stack",
                   help="which benches to run (comma-separated)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per side, alternating jax/hf; the best of each is reported")
    args = p.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    from flax import nnx
    from transformers import GPTNeoXForCausalLM

    from pythia_jax.config import ModelConfig
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.scoring import Scorer
    from pythia_jax.model import GPTNeoX, params_to_dict

    cfg = ModelConfig.preset(args.model)
    print(f"{args.model}: {cfg.num_params():,} params; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    model = GPTNeoX(cfg, rngs=nnx.Rngs(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_hf_dir(cfg, params_to_dict(model), os.path.join(tmp, "hf"), dtype="float32")
        hf = GPTNeoXForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()

    rng = np.random.default_rng(args.seed)
    reqs = [(rng.integers(2, 50000, int(rng.integers(40, 300))).tolist(),
             rng.integers(2, 50000, int(rng.integers(1, 20))).tolist()) for _ in range(args.requests)]
    n_tokens = sum(len(c) + len(x) - 1 for c, x in reqs)

    sections = set(args.sections.split(","))
    if "memorization" in sections:
        bench_memorization(args, model, hf)
    if "stack" in sections:
        bench_stack(args, cfg, model, reqs, n_tokens)
    if "scoring" not in sections:
        return
    # ---------------------------------------------------------------- scoring
    scorer = Scorer(model, batch_size=args.batch_size)
    t0 = time.perf_counter()
    scorer.loglikelihood(reqs)  # compiles each bucket once
    t_first = time.perf_counter() - t0
    ours = scorer.loglikelihood(reqs)

    def hf_score():
        order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
        out = np.zeros(len(reqs))
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            wholes = [reqs[i][0] + reqs[i][1] for i in idx]
            L = max(len(w) - 1 for w in wholes)
            toks = torch.zeros((len(idx), L), dtype=torch.long)
            for r, w in enumerate(wholes):
                toks[r, :len(w) - 1] = torch.tensor(w[:-1])
            with torch.inference_mode():
                lp = torch.log_softmax(hf(toks).logits.float(), -1)
            for r, (i, w) in enumerate(zip(idx, wholes)):
                n, m = len(reqs[i][1]), len(w) - 1
                tgt = torch.tensor(w[-n:])
                out[i] = lp[r, m - n:m].gather(-1, tgt[:, None]).sum().item()
        return out

    ref = hf_score()  # warm-up
    times_jax, times_hf = alternating(lambda: scorer.loglikelihood(reqs), hf_score, args.repeats)
    t_jax, t_hf = min(times_jax), min(times_hf)
    print(f"scoring   : {len(reqs)} requests, {n_tokens} tokens, batch {scorer.batch_size}, "
          f"shapes {sorted(scorer.compiled_shapes)}")
    print(f"  pythia-jax {n_tokens / t_jax:10.0f} tok/s ({t_jax:.2f} s; first call incl. compile {t_first:.1f} s)")
    print(f"  HF torch   {n_tokens / t_hf:10.0f} tok/s ({t_hf:.2f} s)")
    print(f"  ratio jax/hf {t_hf / t_jax:.2f}x (best of each)   {ratio_summary(times_jax, times_hf)}   "
          f"max |Δ loglik| {np.max(np.abs(ours.loglik - ref)):.2e}")

    if "generation" not in sections:
        return
    # ---------------------------------------------------------------- generation
    prompts = [rng.integers(2, 50000, int(rng.integers(8, 64))).tolist() for _ in range(args.gen_prompts)]
    gen = Generator(model, batch_size=args.gen_prompts)
    t0 = time.perf_counter()
    gen.generate(prompts, args.new_tokens, stop_token=None)
    t_first = time.perf_counter() - t0
    out = gen.generate(prompts, args.new_tokens, stop_token=None)

    def hf_generate():
        P = max(len(x) for x in prompts)
        toks = torch.full((len(prompts), P), 1, dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for r, x in enumerate(prompts):
            toks[r, P - len(x):] = torch.tensor(x)
            mask[r, P - len(x):] = 1
        with torch.inference_mode():
            res = hf.generate(toks, attention_mask=mask, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=1)
        return res[:, P:].tolist()

    hf_out = hf_generate()  # warm-up
    t_jax, t_hf = best_of(lambda: gen.generate(prompts, args.new_tokens, stop_token=None), hf_generate,
                          args.repeats)
    n_new = len(prompts) * args.new_tokens
    same = sum(a == b for a, b in zip(out, hf_out))
    print(f"generation: {len(prompts)} prompts x {args.new_tokens} new tokens, greedy, KV cache")
    print(f"  pythia-jax {n_new / t_jax:10.0f} tok/s ({t_jax:.2f} s; first call incl. compile {t_first:.1f} s)")
    print(f"  HF torch   {n_new / t_hf:10.0f} tok/s ({t_hf:.2f} s)")
    print(f"  ratio jax/hf {t_hf / t_jax:.2f}x   identical greedy outputs: {same}/{len(prompts)}")

    if "task" not in sections:
        return
    # ---------------------------------------------------------------- generation task (arithmetic)
    from transformers import StoppingCriteria, StoppingCriteriaList

    from pythia_jax.eval import arithmetic
    from pythia_jax.eval.generate import cut_at_stops, generate_until
    from pythia_jax.eval.tokens import encode, get_tokenizer

    tok = get_tokenizer()
    items = [it for t in arithmetic.expand_task_name("arithmetic", [args.task_shots]) for it in t.items()]
    items = [items[i] for i in rng.choice(len(items), args.task_items, replace=False)]
    prompts = [encode(tok, it.prompt) for it in items]
    tgen = Generator(model, batch_size=args.batch_size)
    stop_mask = torch.tensor(tgen.stop_string_tokens(tok, ["\n"]))
    t0 = time.perf_counter()
    ours = generate_until(tgen, tok, prompts, ["\n"], arithmetic.MAX_NEW_TOKENS)
    t_first = time.perf_counter() - t0

    class AllStopped(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            new = input_ids[:, self.start:]
            return bool((stop_mask[new].any(dim=1) | (new == 0).any(dim=1)).all())

    def hf_task():
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # same batches as ours
        texts = [""] * len(prompts)
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            P = max(len(prompts[i]) for i in idx)
            toks = torch.full((len(idx), P), 1, dtype=torch.long)
            mask = torch.zeros((len(idx), P), dtype=torch.long)
            for r, i in enumerate(idx):
                toks[r, P - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, P - len(prompts[i]):] = 1
            with torch.inference_mode():
                res = hf.generate(toks, attention_mask=mask, max_new_tokens=arithmetic.MAX_NEW_TOKENS,
                                  do_sample=False, use_cache=True, pad_token_id=1,
                                  stopping_criteria=StoppingCriteriaList([AllStopped(P)]))
            for r, i in enumerate(idx):
                new = [t for t in res[r, P:].tolist()]
                new = new[:new.index(0)] if 0 in new else new
                texts[i] = cut_at_stops(tok.decode(new), ["\n"])
        return texts

    hf_texts = hf_task()  # warm-up
    t_jax, t_hf = best_of(lambda: generate_until(tgen, tok, prompts, ["\n"], arithmetic.MAX_NEW_TOKENS),
                          hf_task, args.repeats)
    same = sum(a == b for a, b in zip(ours, hf_texts))
    print(f"generation task: {len(items)} arithmetic items ({args.task_shots}-shot), batch {tgen.batch_size}, "
          f"until newline, <= {arithmetic.MAX_NEW_TOKENS} new tokens")
    print(f"  pythia-jax {len(items) / t_jax:10.1f} items/s ({t_jax:.2f} s; first call incl. compile {t_first:.1f} s)")
    print(f"  HF torch   {len(items) / t_hf:10.1f} items/s ({t_hf:.2f} s)")
    print(f"  ratio jax/hf {t_hf / t_jax:.2f}x   identical outputs: {same}/{len(items)}")


def bench_memorization(args, model, hf) -> None:
    """Memorization rows/s: pythia-jax (Generator, KV cache) vs HF generate, same rows and batches."""
    import torch

    from pythia_jax.data.run_data import RunData
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.memorization import memorization_scores

    run = RunData.from_flags(data="demo", order="neox", seq_len=128, global_batch=8, seed=1234,
                             train_iters=200)  # configs/demo.gin's rows
    rows = run.read_rows(run.open_order(), np.arange(args.mem_rows)).astype(np.int64)[:, :64]
    gen = Generator(model, batch_size=args.batch_size)
    t0 = time.perf_counter()
    ours = memorization_scores(gen, rows)
    t_first = time.perf_counter() - t0
    hf.generation_config.eos_token_id = None  # never stop early

    def hf_scores():
        out = np.zeros(len(rows), np.float32)
        for s in range(0, len(rows), gen.batch_size):
            batch = torch.as_tensor(rows[s:s + gen.batch_size, :32])
            with torch.inference_mode():
                res = hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=32,
                                  do_sample=False, use_cache=True, pad_token_id=1)[:, 32:].numpy()
            out[s:s + len(batch)] = (res == rows[s:s + len(batch), 32:64]).mean(axis=1)
        return out

    ref = hf_scores()  # warm-up
    t_jax, t_hf = best_of(lambda: memorization_scores(gen, rows), hf_scores, args.repeats)
    same = int((ours.per_row["score"] == ref).sum())
    print(f"memorization: {len(rows)} demo training rows, 32-token prompt + 32 greedy tokens, batch "
          f"{gen.batch_size}, float32 both sides, KV cache both sides")
    print(f"  pythia-jax {len(rows) / t_jax:10.1f} rows/s ({t_jax:.2f} s; first call incl. compile {t_first:.1f} s)")
    print(f"  HF torch   {len(rows) / t_hf:10.1f} rows/s ({t_hf:.2f} s)")
    print(f"  ratio jax/hf {t_hf / t_jax:.2f}x   identical per-row scores: {same}/{len(rows)}")


def bench_stack(args, cfg, model, reqs, n_tokens) -> None:
    """K checkpoints in one vmapped pass vs K separate passes of the same Scorer."""
    from flax import nnx

    from pythia_jax.eval.runtime import place_model
    from pythia_jax.eval.scoring import Scorer
    from pythia_jax.eval.stacked import StackedScorer
    from pythia_jax.model import GPTNeoX, params_to_dict

    ckpts = [params_to_dict(model)] + [params_to_dict(GPTNeoX(cfg, rngs=nnx.Rngs(args.seed + k)))
                                       for k in range(1, args.stack)]
    stacked = StackedScorer(ckpts, cfg, batch_size=args.batch_size)
    single = Scorer(place_model(ckpts[0], config=cfg), batch_size=args.batch_size)
    t0 = time.perf_counter()
    got = stacked.loglikelihood(reqs).loglik
    t_first = time.perf_counter() - t0
    ref = np.zeros_like(got)

    def separate():
        for k, params in enumerate(ckpts):
            single.placed.replace_params(params)
            ref[:, k] = single.loglikelihood(reqs).loglik

    separate()  # compiles once, reused for every checkpoint
    t_stack, t_sep = best_of(lambda: stacked.loglikelihood(reqs), separate, args.repeats)
    total = n_tokens * args.stack
    print(f"stacked scoring: {args.stack} checkpoints x {len(reqs)} requests ({n_tokens} tokens each), "
          f"batch {stacked.batch_size}")
    print(f"  stacked (one pass)  {total / t_stack:10.0f} tok/s ({t_stack:.2f} s; "
          f"first call incl. compile {t_first:.1f} s)")
    print(f"  {args.stack} separate passes  {total / t_sep:10.0f} tok/s ({t_sep:.2f} s)")
    print(f"  ratio stacked/separate {t_sep / t_stack:.2f}x   max |Δ loglik| {np.max(np.abs(got - ref)):.2e}")


if __name__ == "__main__":
    main()
