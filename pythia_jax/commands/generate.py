"""``pythia-jax generate``: sample continuations of a prompt from a model."""

from __future__ import annotations

import argparse

HELP = "generate text from a model (HF directory or pythia-jax checkpoint) with a KV cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import nonneg_float, nonneg_int, positive_int, probability, seed, text

    parser.add_argument("model", help="HF model directory, folder of step<N>/ HF revisions, checkpoint dir "
                                        "or training run folder (its checkpoints/)")
    parser.add_argument("--step", type=nonneg_int, default=None,
                        help="checkpoint step or HF revision (default: newest)")
    parser.add_argument("--prompt", action="append", required=True, type=text,
                        help="prompt text (repeat for several prompts, generated as one batch)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")


def run(args: argparse.Namespace) -> int:
    from pythia_jax.config import EOD_TOKEN_ID
    from pythia_jax.data.tokenizer import decode as decode_with_eod  # keeps <|endoftext|>
    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.eval.generate import Generator, SamplingConfig
    from pythia_jax.eval.loading import load_model_params
    from pythia_jax.eval.runtime import place_model
    from pythia_jax.eval.tokens import decode, encode, get_tokenizer

    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        raise PythiaJaxError("--top-k and --top-p shape sampling, and --temperature 0 (the default) is greedy "
                             "decoding: pass --temperature > 0 (e.g. 0.8) to sample")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    config, params = load_model_params(args.model, args.step)
    tokenizer = get_tokenizer()
    prompts = [encode(tokenizer, p) or [EOD_TOKEN_ID] for p in args.prompt]
    gen = Generator(place_model(params, config=config), batch_size=len(prompts))
    outs = gen.generate(prompts, args.max_new_tokens, sampling=sampling, seed=args.seed,
                        stop_token=None if args.no_stop else EOD_TOKEN_ID)
    for text, new in zip(args.prompt, outs):
        # with --no-stop the document boundaries it generates are shown (decode drops special tokens)
        print(text + (decode_with_eod(new) if args.no_stop else decode(tokenizer, new)))
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0
