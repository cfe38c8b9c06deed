"""``python -m gpt.generate``: stream text for one prompt, or generate for a file of prompts.

    python -m gpt.generate --init SOURCE --prompt TEXT [--max-new-tokens N --temperature T --top-k K
                           --top-p P --seed S --no-cache --backend B --device D]
    python -m gpt.generate --init SOURCE --prompts-file FILE --out FILE.jsonl [--batch-size N ...]

The generation is ``gpt.generate.stream`` and ``gpt.batch_generate.iter_batch``; this module parses the
flags, prints, writes the output file and turns errors into exit code 2 (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..batch_generate import DEFAULT_BATCH_SIZE, iter_batch
from ..checkpoint import CheckpointError
from ..generate import check_sampling, stream, supports_kv_cache
from ..recipes import model_class
from ..tokenizer import ENDOFTEXT, EOT_ID, TokenizerError, get_tokenizer, text_to_token_ids
from ..weights import WeightsError
from .stopping import exit_code, sigterm_raises


def _check_cli_args(args) -> None:
    """The numeric flags, before anything is loaded: ValueError naming the flag."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)  # the library's rule, named by its flag
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    if args.batch_size is not None and args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.prompts_file is None and (args.out is not None or args.batch_size is not None):
        raise ValueError("--out and --batch-size go with --prompts-file")
    if args.prompts_file is not None and args.out is None:
        raise ValueError("--prompts-file needs --out FILE.jsonl")


def read_prompts(path: Path, out: Path) -> list[dict]:
    """Records ``{"prompt": text, ...}`` from ``path``: ``.jsonl`` objects with a string ``prompt`` field
    (other fields are kept), or one prompt per line (blank lines skipped). ValueError on anything else,
    and when ``out`` would overwrite ``path`` or cannot be written."""
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    if out.resolve() == path.resolve():
        raise ValueError("--out must not be the --prompts-file (it would be overwritten)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no part of a prompt
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {path}: cannot read it as UTF-8 text ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line})
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty string 'prompt' field")
        records.append(rec)
    if not records:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    return records


def cli_batch(model, tok, records: list[dict], args, generator, device) -> int:
    """Generate for every record with a progress bar, write ``args.out`` (jsonl: the record plus
    ``completion``) atomically, report tokens/s on stderr."""
    ids = [tok.encode(r["prompt"], allowed_special={ENDOFTEXT}) for r in records]
    it = iter_batch(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_id=EOT_ID, generator=generator, batch_size=args.batch_size,
                    use_cache=not args.no_cache)
    news: list[list[int] | None] = [None] * len(ids)
    n_tokens, start = 0, time.perf_counter()
    with tqdm(total=len(ids), unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        for i, new in it:
            news[i] = new
            n_tokens += len(new)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - start, 1e-9):.1f} tokens/s", refresh=False)
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec, new in zip(records, news):
                f.write(json.dumps({**rec, "completion": tok.decode(new)}, ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot write it ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    cache = "KV cache" if supports_kv_cache(model) and not args.no_cache else "no cache"
    B = min(len(ids), args.batch_size or DEFAULT_BATCH_SIZE)
    print(f"[{len(ids)} prompts, {n_tokens} tokens in {elapsed:.2f} s: {n_tokens / max(elapsed, 1e-9):.1f} "
          f"tokens/s, batch {B}, {cache}, {device}] wrote {args.out}", file=sys.stderr)
    return 0



def main(argv=None) -> int:
    """``python -m gpt.generate``'s exit code for ``argv`` (default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(prog="python -m gpt.generate", description="Generate text with a GPT-2.")
    p.add_argument("--init", required=True, help="weights: HF folder, .safetensors, checkpoint, run folder, model name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt: the text streams to stdout")
    src.add_argument("--prompts-file", type=Path, default=None,
                     help="many prompts: one per line (blank lines skipped), or .jsonl with a 'prompt' field")
    p.add_argument("--out", type=Path, default=None, help="with --prompts-file: the output .jsonl (prompt, completion)")
    p.add_argument("--batch-size", type=int, default=None, help="with --prompts-file: rows generated at once (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step")
    p.add_argument("--backend", choices=["fused", "reference"], default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    with sigterm_raises():  # SIGTERM stops as Ctrl-C does (exit 143)
        try:
            return _generate(args)
        except (ValueError, CheckpointError, WeightsError, TokenizerError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            what = f"{args.out} not written" if args.prompts_file is not None else "the text so far is above"
            print(f"\ninterrupted: {what}", file=sys.stderr)
            return exit_code(e)


def _generate(args) -> int:
    """The work of ``main`` for parsed ``args``: stream one prompt to stdout, or run a prompts file."""
    _check_cli_args(args)
    if args.prompts_file is not None:
        records = read_prompts(args.prompts_file, args.out)
    elif not args.prompt.strip():
        raise ValueError("--prompt is empty")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = get_tokenizer()
    model = model_class(args.backend)[0].from_pretrained(args.init, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    if args.prompts_file is not None:
        return cli_batch(model, tok, records, args, gen, device)
    idx = text_to_token_ids(args.prompt, tok).to(device)
    tokens = stream(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_id=EOT_ID, use_cache=not args.no_cache, generator=gen)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new_ids: list[int] = []
    printed = 0
    start = time.perf_counter()
    for token in tokens:
        new_ids.append(int(token[0, 0]))
        text = tok.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write(tok.decode(new_ids)[printed:] + "\n")  # what was held back, and end the line
    sys.stdout.flush()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = len(new_ids)
    print(f"\n[{n} tokens in {elapsed:.2f} s: {n / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{'KV cache' if supports_kv_cache(model) and not args.no_cache else 'no cache'}, {device}]", file=sys.stderr)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
