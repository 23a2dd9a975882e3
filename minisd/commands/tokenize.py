"""`minisd tokenize PROMPT`: print the 77 CLIP token ids the text encoder receives, as one JSON list.

    $ minisd tokenize "a photo of a cat"
    [49406, 320, 1125, 539, 320, 2368, 49407, 49407, ..., 49407]
    $ minisd tokenize --sd2 "a photo of a cat"       # SD 2.x pads with 0 ("!") instead of 49407

Useful to check a prompt against another implementation (diffusers: `pipe.tokenizer(prompt, padding="max_length",
max_length=77, truncation=True).input_ids`). A prompt over 75 tokens is truncated; the warning goes to stderr,
so stdout stays valid JSON.
"""
import json
import sys
import warnings


def configure(parser):
    parser.add_argument("prompt", metavar="PROMPT",
                        help="the text prompt (quote it; put -- before a prompt that starts with -)")
    parser.add_argument("--sd2", action="store_true",
                        help="pad with 0 like SD 2.x / OpenCLIP (default: pad with 49407 like SD 1.x)")


def run(args):
    from ..tokenizer import CLIPTokenizer  # imported here: `minisd --help` should not read the vocabulary

    tokenizer = CLIPTokenizer.sd2() if args.sd2 else CLIPTokenizer.sd1()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer(args.prompt)[0]  # (77,)
    for w in caught:
        print(f"minisd tokenize: warning: {w.message}", file=sys.stderr)
    print(json.dumps(ids.tolist()))
    return 0
