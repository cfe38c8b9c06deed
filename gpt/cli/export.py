"""``python -m gpt.export SOURCE OUT_DIR [--force] [--no-tokenizer]``: the flags and the exit codes.

The work is ``gpt.export.load_source`` + ``gpt.export.export_state_dict``; errors are one ``error:`` line on
stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from ..export import check_target, export_state_dict, load_source
from .stopping import exit_code, sigterm_raises


def main(argv: list[str] | None = None) -> int:
    """``python -m gpt.export``'s exit code for ``argv`` (default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt.export",
        description="Write a model as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer "
                    "and generation config) that transformers.GPT2LMHeadModel.from_pretrained loads.")
    parser.add_argument("source", help="a run folder, a checkpoint, a .safetensors file, a Hugging Face folder "
                                       "or a model name (as from_pretrained)")
    parser.add_argument("out_dir", help="the folder to write (new or empty)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in OUT_DIR")
    parser.add_argument("--no-tokenizer", action="store_true", help="leave out the tokenizer files")
    args = parser.parse_args(argv)
    with sigterm_raises():  # SIGTERM stops as Ctrl-C does: the staging folder removed, exit 143
        try:
            check_target(args.out_dir, args.force)  # before loading a large model
            sd, cfg, labels = load_source(args.source)
            out = export_state_dict(sd, cfg, args.out_dir, labels=labels, tokenizer=not args.no_tokenizer,
                                    force=args.force)
        except (ValueError, OSError, RuntimeError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"interrupted: {args.out_dir} not written", file=sys.stderr)
            return exit_code(e)
    n_out = sd["out_head.weight"].shape[0]
    kind = "GPT2LMHeadModel" if n_out == cfg.vocab_size else f"GPT2ForSequenceClassification, {n_out} labels"
    print(f"wrote {out} ({kind}, {cfg.n_layers} layers, width {cfg.emb_dim}): load it with "
          f"transformers.AutoModel...from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
