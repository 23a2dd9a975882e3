"""CLIP tokenizer: vocabulary, hand-written split vs the `regex` package, HF parity on generated prompts, CLI.

References are never minisd: Hugging Face's vocab.json/merges.txt, the `regex` package (the engine HF's slow
tokenizer and openai/CLIP use), transformers' CLIPTokenizer and the shared reference ids.

Which HF? minisd targets HF's *slow* Python CLIPTokenizer with ftfy (transformers <= 4.x, what SD 1.x pipelines
ran). transformers >= 5 has no slow CLIP tokenizer: `CLIPTokenizer` and `CLIPTokenizerFast` are the same Rust
`tokenizers` class, which does NFC + lowercase and never calls ftfy. So:
  * with transformers 4.x the slow tokenizer is the reference as is;
  * with transformers 5.x the reference is that tokenizer fed with the text HF's slow tokenizer would have handed
    to its BPE: `ftfy.fix_text(piece).lower()` for the pieces between special tokens (ftfy and str.lower are the
    very functions the slow tokenizer calls; the split, byte map, BPE and truncation come from `tokenizers`);
  * minisd with use_ftfy=False is compared with the Rust tokenizer on the raw prompts (transformers 5 behaviour);
    the one known difference, word-final capital sigma, is counted and checked.
"""
import io
import json
import re
import subprocess
import sys
import unicodedata
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from minisd import cli
from minisd.tokenizer import (BASE_VOCAB_SIZE, EOT_ID, SOT_ID, CLIPTokenizer, WHITESPACE, bytes_to_unicode,
                              pre_tokenize)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts_tokenizer import HAND_WRITTEN, generate_prompts  # noqa: E402

SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
N_PROMPTS = 240


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.sd1()


@pytest.fixture(scope="module")
def hf_dir(shared_dir):
    return shared_dir / "data" / "sd15_configs" / "tokenizer"


@pytest.fixture(scope="module")
def hf(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


def _hf_is_slow(hf_tok):
    return hasattr(hf_tok, "fix_text")  # the transformers 4.x Python tokenizer keeps ftfy's function here


def _slow_hf_text(prompt, special_texts):
    """What HF's slow tokenizer hands to its split regex: special-token pieces untouched, every other piece
    ftfy.fix_text + lower (whitespace is collapsed by the Rust normalizer afterwards)."""
    ftfy = pytest.importorskip("ftfy")
    # exact-case, like HF's added-token trie (longest first)
    specials = "|".join(re.escape(t) for t in sorted(special_texts, key=len, reverse=True))
    pieces = re.split(f"({specials})", prompt)
    return "".join(p if i % 2 else ftfy.fix_text(p).lower() for i, p in enumerate(pieces))


def _hf_reference(hf_tok, prompt, **kwargs):
    """HF slow-with-ftfy ids for `prompt` (see the module docstring)."""
    text = prompt if _hf_is_slow(hf_tok) else _slow_hf_text(prompt, hf_tok.all_special_tokens)
    return hf_tok(text, **kwargs).input_ids


# ----------------------------------------------------------------------------------------------------------------
# vocabulary and byte map

def test_vocab_matches_hf_files(tok, hf_dir):
    vocab_json = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok.vocab.decoder) == BASE_VOCAB_SIZE == len(vocab_json) == 49408
    assert tok.vocab.encoder == vocab_json
    merges = (hf_dir / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    assert len(merges) == 48894
    assert tok.vocab.ranks == {tuple(m.split()): r for r, m in enumerate(merges)}


def test_bytes_to_unicode_is_the_byte_level_alphabet():
    tokenizers = pytest.importorskip("tokenizers")
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"  # spaces show as 'Ġ' in BPE vocabularies


def test_vocab_is_lazy_and_shared():
    a, b = CLIPTokenizer(), CLIPTokenizer.sd2()
    assert a._vocab is None  # nothing read yet
    assert a.vocab is b.vocab  # one copy per file for every instance


# ----------------------------------------------------------------------------------------------------------------
# the hand-written split against the regex it replaces

def test_whitespace_set_is_regex_backslash_s():
    regex = pytest.importorskip("regex")
    every_char = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)  # no surrogates
    assert set(regex.findall(r"\s", every_char)) == WHITESPACE


def test_pre_tokenize_matches_regex_on_every_code_point():
    """Every character assigned in this Python's Unicode tables, in several contexts, split like the regex.

    Characters the `regex` package knows but unicodedata does not (assigned after Unicode 14 for Python 3.11)
    are skipped: for them minisd differs by design (module docstring); they are counted below.
    """
    regex = pytest.importorskip("regex")
    pat = regex.compile(SPLIT_PATTERN, regex.IGNORECASE)
    contexts = []
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if unicodedata.category(c) in ("Cn", "Cs", "Co"):  # unassigned, surrogates, private use (all 'P')
            continue
        contexts.append(f"{c}a{c}{c}1{c}! '{c} {c}'{c}e <|{c}")
    assert len(contexts) > 140_000
    # Pre-tokens never span white space, so a space-joined block splits into the concatenation of its strings'
    # pre-tokens: one call per block of 2048 strings instead of one per string; a failure is then located.
    for start in range(0, len(contexts), 2048):
        block = contexts[start:start + 2048]
        if pre_tokenize(" ".join(block)) != pat.findall(" ".join(block)):
            for s in block:
                assert pre_tokenize(s) == pat.findall(s), (hex(ord(s[0])), s)


HAND_SPLIT_CASES = ["it's", "IT'S", "it'ſ", "'s't're've'm'll'd", "''s", "!'s", "'", "'x", "'rex", "' s",
                    "<|startoftext|>", "<|STARTOFTEXT|>", "<|ſtartoftext|>", "<|startoftext", "a<|endoftext|>b",
                    "!<|endoftext|>", "abc123def", "١٢٣", "x²", "e\u0301", "a\u200bb", "   ", "", "a\x1cb",
                    "ǅemal", "ⅫⅩ", "👩\u200d🚀!", "\u3000x\u2028y\x85z"]


@pytest.mark.parametrize("text", HAND_SPLIT_CASES)
def test_pre_tokenize_matches_regex_hand_cases(text):
    regex = pytest.importorskip("regex")
    assert pre_tokenize(text) == regex.findall(SPLIT_PATTERN, text, regex.IGNORECASE)


def test_pre_tokenize_matches_regex_fuzz():
    regex = pytest.importorskip("regex")
    rng = np.random.default_rng(1)
    alphabet = list("aZsStTrRvVmMlLdD'<|>!.,1 2\t\n\xa0") + ["ſ", "é", "e\u0301", "日", "٣", "²", "\u200b", "🐱",
                                                            "<|startoftext|>", "<|endoftext|>", "\x1c", "Σ"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet, size=rng.integers(0, 25)))
        assert pre_tokenize(s) == regex.findall(SPLIT_PATTERN, s, regex.IGNORECASE), repr(s)


# ----------------------------------------------------------------------------------------------------------------
# published and shared reference ids

# sd-reference.md §1.5 (computed with the openai tokenizer; ASCII, so ftfy does not matter)
GOLDENS = [
    ("a photograph of an astronaut riding a horse", [320, 8853, 539, 550, 18376, 6765, 320, 4558]),
    ("A painting of a squirrel eating a burger", [320, 3086, 539, 320, 14004, 4371, 320, 6548]),
    ("open neural network exchange", [1488, 26388, 3304, 6616]),
    ("", []),
    ("Hello,   World!! it's 2024 café", [3306, 267, 1002, 748, 585, 568, 273, 271, 273, 275, 15304]),
]


@pytest.mark.parametrize("prompt,ids", GOLDENS)
def test_sd_reference_goldens(tok, prompt, ids):
    assert tok.encode(prompt) == ids
    row = tok(prompt)[0]
    assert row.tolist() == [SOT_ID] + ids + [EOT_ID] * (77 - len(ids) - 1)


def test_shared_reference_ids(tok, shared_dir):
    """clip_tokenizer_reference_ids.json: its HF fields come from transformers 5 (no ftfy). Where ftfy changes a
    prompt, HF's slow tokenizer with ftfy gives open_clip's ids (open_clip runs ftfy too); where open_clip
    disagrees for another reason (special-token text), HF's ids are the target."""
    data = json.loads((shared_dir / "data" / "clip_tokenizer" / "clip_tokenizer_reference_ids.json").read_text())
    no_ftfy = CLIPTokenizer.sd1(use_ftfy=False)
    try:
        import ftfy
    except ImportError:
        ftfy = None
    used_open_clip = 0
    for case in data["cases"]:
        prompt = case["prompt"]
        # without ftfy minisd is the transformers-5 tokenizer: the HF fields, always
        assert no_ftfy.encode(prompt) == case["ids_no_special"], prompt
        expected = case["ids_no_special"]
        if ftfy is not None and ftfy.fix_text(prompt) != unicodedata.normalize("NFC", prompt):
            assert isinstance(case["ids_open_clip"], list), prompt
            expected = case["ids_open_clip"]
            used_open_clip += 1
        assert tok.encode(prompt) == expected, prompt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one case is > 75 tokens
            row = tok(prompt)[0].tolist()
        assert row == [SOT_ID] + expected[:75] + [EOT_ID] * (77 - len(expected[:75]) - 1)
        if expected is case["ids_no_special"]:
            assert row == case["input_ids_77"], prompt
            assert tok.tokenize(prompt)[:len(case["tokens"])] == case["tokens"]  # the json lists at most 40
    assert ftfy is None or used_open_clip == 1  # the mojibake case


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face parity on generated prompts

@pytest.fixture(scope="module")
def prompts():
    ps = generate_prompts(N_PROMPTS, seed=0)
    assert len(ps) >= 200
    return ps


def test_matches_hf_slow_with_ftfy_sd1(tok, hf, prompts):
    pytest.importorskip("ftfy")
    n_long = 0
    for p in prompts:
        ref = _hf_reference(hf, p, padding="max_length", max_length=77, truncation=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = tok(p)
        assert ours.shape == (1, 77) and ours.dtype == np.int64
        assert ours[0].tolist() == ref, repr(p)
        n_ids = len(_hf_reference(hf, p)) - 2  # untruncated content length by HF
        assert len(caught) == (n_ids > 75), repr(p)
        n_long += n_ids > 75
    assert n_long >= 15  # the generator's long prompts are really long


def test_matches_hf_sd2_padding(tok, hf, hf_dir, prompts):
    """SD 2.x as diffusers runs it: HF's tokenizer with pad_token "!". HF makes "!" a special token, so every "!"
    in a prompt becomes a lone id 0 (CLIPTokenizer.sd2() does the same); with match_pad_token=False minisd gives
    open_clip's ids instead: the SD 1.x ids, padded with 0."""
    transformers = pytest.importorskip("transformers")
    ftfy = pytest.importorskip("ftfy")
    hf2 = transformers.CLIPTokenizer.from_pretrained(str(hf_dir), pad_token="!")
    assert hf2.pad_token_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = CLIPTokenizer.sd2()(prompts)  # the whole batch at once: (N, 77)
        open_clip_style = CLIPTokenizer.sd2(match_pad_token=False)(prompts)
        sd1 = tok(prompts)
    assert ours.shape == (len(prompts), 77)
    with_bang, by_pieces = 0, 0
    for p, row, row_oc, row1 in zip(prompts, ours, open_clip_style, sd1):
        if _hf_is_slow(hf2) or ftfy.fix_text(p).count("!") == p.count("!"):
            ref = _hf_reference(hf2, p, padding="max_length", max_length=77, truncation=True)
        else:
            # ftfy turns a fullwidth '！' into '!'. The slow tokenizer cut its special tokens out of the raw text
            # before ftfy; the Rust one, fed the fixed text, would cut this new '!' too. So build the slow
            # tokenizer's ids the way it does: each raw piece between special tokens tokenized on its own
            # (by the SD 1.x tokenizer, for which '!' is not special), then SOT + first 75 + EOT + 0-padding.
            pieces = re.split(r"(<\|startoftext\|>|<\|endoftext\|>|!)", p)
            ids = []
            for i, piece in enumerate(pieces):
                if i % 2:
                    ids.append(hf2.convert_tokens_to_ids(piece))
                elif piece:
                    ids.extend(hf(ftfy.fix_text(piece).lower(), add_special_tokens=False).input_ids)
            ref = [SOT_ID] + ids[:75] + [EOT_ID] + [0] * (75 - len(ids[:75]))
            by_pieces += 1
        assert row.tolist() == ref, repr(p)
        n = min(len(tok.encode(p)), 75) + 1  # position of the closing EOT in the SD 1.x row
        assert row_oc[:n + 1].tolist() == row1[:n + 1].tolist() and (row_oc[n + 1:] == 0).all()
        with_bang += "!" in p
    assert with_bang >= 10  # the "!" rule is exercised
    print(f"\nSD2: {len(prompts)} prompts, {with_bang} with '!', {by_pieces} referenced piece by piece")


def test_matches_hf_rust_tokenizer_without_ftfy(hf_dir, prompts):
    """transformers' tokenizers-backed CLIPTokenizerFast (in transformers 5 also `CLIPTokenizer`) on the raw
    prompts vs minisd with use_ftfy=False. Known difference: the Rust lowercase writes a word-final capital
    sigma as 'σ', Python's str.lower as 'ς'; those prompts must match once the text is lowercased by Python."""
    transformers = pytest.importorskip("transformers")
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(hf_dir))
    ours = CLIPTokenizer.sd1(use_ftfy=False)
    sigma, special_case = [], []
    for p in prompts:
        ref = fast(p).input_ids[1:-1]
        mine = ours.encode(p)
        if mine == ref:
            continue
        # Rust matches "<|STARTOFTEXT|>" as a unit only sometimes (after its lowercase, and its ByteLevel regex
        # splits the regex's special-token alternative apart); HF's slow tokenizer always does.
        if re.search(r"<\|(startoftext|endoftext)\|>", p, re.IGNORECASE) and not re.fullmatch(
                r"(?:(?!<\|(?i:startoftext|endoftext)\|>).|<\|startoftext\|>|<\|endoftext\|>)*", p, re.DOTALL):
            special_case.append(p)
            continue
        lowered = unicodedata.normalize("NFC", p).lower()
        assert "ς" in lowered, repr(p)  # anything else is a bug
        assert mine == fast(lowered).input_ids[1:-1], repr(p)
        sigma.append(p)
    assert len(sigma) + len(special_case) < len(prompts) // 4  # every difference is explained above
    print(f"\n{len(prompts)} prompts vs transformers {transformers.__version__} CLIPTokenizerFast without ftfy: "
          f"{len(sigma)} differ by word-final sigma, {len(special_case)} by upper-case special-token text")


def test_truncation_warning_shows_dropped_text(tok, hf):
    prompt = " ".join(f"word{i}" for i in range(60))  # 'word', digit(s): well over 75 tokens
    full = hf(prompt).input_ids[1:-1]
    with pytest.warns(UserWarning) as record:
        ids = tok(prompt)
    msg = str(record[0].message)
    assert f"{len(full) - 75} over the limit" in msg
    dropped = hf.decode(full[75:])  # the same decode diffusers uses for its message
    assert ("The following part of your input was truncated because CLIP can only handle sequences up to 77 "
            f"tokens: {dropped!r}") in msg
    assert ids[0].tolist() == [SOT_ID] + full[:75] + [EOT_ID]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 content tokens: no warning
        tok(" ".join(["a"] * 75))


# ----------------------------------------------------------------------------------------------------------------
# decode

def test_decode_round_trip_normalised_ascii(tok):
    rng = np.random.default_rng(2)
    words = ["photo", "of", "a", "cat", "astronaut", "xqzv", "hello", "!!", ",", "...", "(", ")", "'s", "'ll", "7",
             "0", "ultra", "-", "zebras", "@#$", "qu", "supercalifragilistic"]
    for _ in range(300):
        text = " ".join(rng.choice(words, size=rng.integers(1, 20)))
        assert tok.decode(tok.encode(text)) == text


def test_decode_matches_hf(tok, hf, prompts):
    for p in prompts:
        if "<|" in p:
            continue  # special-token text: spacing conventions around specials differ, not tested here
        ids = tok.encode(p)
        assert tok.decode(ids) == hf.decode(ids), repr(p)


def test_decode_specials_and_errors(tok):
    row = tok("a photo")[0]
    assert tok.decode(row, skip_special_tokens=True) == "a photo"
    assert tok.decode(row).startswith("<|startoftext|> a photo <|endoftext|>")
    assert tok.encode("語") == [34002, 508]  # one character, two byte-level tokens (shared reference json)
    assert tok.decode([34002]) == "\ufffd"  # half a character: replaced, not an exception
    with pytest.raises(ValueError, match=r"id 49408 is outside the vocabulary \[0, 49408\)"):
        tok.decode([49408])


# ----------------------------------------------------------------------------------------------------------------
# textual-inversion tokens

ADDED_PROMPTS = ["a <birb-style> cat", "a<birb-style>cat", "a  <birb-style>\t cat", "<birb-style><birb-style>",
                 "x <birb-style>s and <cat-toy>, <cat-toy>!", "<birb-style>", "painting in <birb-style> style "
                 "by <cat-toy>", "no token here", "<birb-style> " * 80]


def test_add_tokens_matches_hf(hf_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("ftfy")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    assert hf.add_tokens(["<birb-style>", "<cat-toy>"]) == 2
    tok = CLIPTokenizer.sd1()
    assert tok.add_tokens(["<birb-style>", "<cat-toy>"]) == hf.convert_tokens_to_ids(["<birb-style>", "<cat-toy>"])
    assert tok.vocab_size == len(hf) == 49410
    for p in ADDED_PROMPTS:
        ref = hf(p if _hf_is_slow(hf) else p.lower(), padding="max_length", max_length=77, truncation=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert tok(p)[0].tolist() == ref.input_ids, repr(p)
    assert tok.tokenize("a <cat-toy>") == ["a</w>", "<cat-toy>"]
    assert tok.decode(tok.encode("a <birb-style> cat")) == "a <birb-style> cat"


def test_add_tokens_case_sensitive_like_hf_slow(hf_dir):
    """HF's slow tokenizer matches added tokens case-sensitively in the raw text; transformers 5 lowercases first
    and would match '<BIRB-STYLE>' too. minisd follows the slow tokenizer: a case variant is ordinary text."""
    tok = CLIPTokenizer.sd1()
    tok.add_tokens("<birb-style>")
    plain = CLIPTokenizer.sd1()
    assert tok.encode("a <BIRB-STYLE>") == plain.encode("a <BIRB-STYLE>")
    assert 49408 not in tok.encode("a <Birb-Style>")
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    hf.add_tokens(["<birb-style>"])
    if _hf_is_slow(hf):
        assert tok.encode("a <BIRB-STYLE>") == hf.encode("a <BIRB-STYLE>", add_special_tokens=False)


def test_add_tokens_errors():
    tok = CLIPTokenizer.sd1()
    assert tok.add_tokens(["<a>", "<b>"]) == [49408, 49409]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tok.add_tokens(["<a>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tok.add_tokens(["cat</w>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tok.add_tokens(["<|endoftext|>"])
    with pytest.raises(ValueError, match="non-empty strings"):
        tok.add_tokens([""])
    assert CLIPTokenizer.sd1().vocab_size == 49408  # added tokens belong to one instance


# ----------------------------------------------------------------------------------------------------------------
# __call__ and the no-ftfy fallback

def test_call_batch_padding_and_errors(tok):
    out = tok(["a photo", "", "a cat"])
    assert out.shape == (3, 77) and out.dtype == np.int64
    assert out[1, :2].tolist() == [SOT_ID, EOT_ID] and (out[1, 2:] == EOT_ID).all()
    sd2 = tok(["a photo"], pad_id=0)
    assert sd2[0, :4].tolist() == [SOT_ID, 320, 1125, EOT_ID] and (sd2[0, 4:] == 0).all()
    assert (CLIPTokenizer.sd2()("a photo") == sd2).all()
    short = tok("a photo of a cat", max_length=5)
    assert short.tolist() == [[SOT_ID, 320, 1125, 539, EOT_ID]] or pytest.fail("max_length=5 keeps 3 tokens")
    with pytest.raises(ValueError, match="prompts must be a str or a list of str"):
        tok(3)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tok("a", max_length=1)
    with pytest.raises(ValueError, match=r"pad_id must be an id in \[0, 49408\)"):
        CLIPTokenizer(pad_id=-1)


def test_without_ftfy_text_is_only_nfc():
    tok = CLIPTokenizer.sd1(use_ftfy=False)
    assert tok.clean("  It’s\tCafe\u0301  ") == "it’s café"
    assert tok.encode("e\u0301") == tok.encode("é")  # NFC still applies


def test_with_ftfy_fixes_text():
    pytest.importorskip("ftfy")
    tok = CLIPTokenizer.sd1(use_ftfy=True)
    assert tok.clean("“Curly”\u00a0ＡＢＣ &amp; ﬁne") == '"curly" abc & fine'


# ----------------------------------------------------------------------------------------------------------------
# the CLI

def test_cli_main_prints_77_ids_json(tok):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["tokenize", "a photo of a cat"]) == 0
    ids = json.loads(buf.getvalue())
    assert len(ids) == 77 and ids == tok("a photo of a cat")[0].tolist()
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["tokenize", "--sd2", "a photo"]) == 0
    assert json.loads(buf.getvalue())[3:] == [EOT_ID] + [0] * 73


def test_cli_subprocess_long_prompt():
    prompt = "a " * 100
    res = subprocess.run([sys.executable, "-m", "minisd.cli", "tokenize", prompt], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    ids = json.loads(res.stdout)  # stdout is exactly one JSON list, the warning went to stderr
    assert len(ids) == 77 and ids[0] == SOT_ID and ids[-1] == EOT_ID and ids[1:76] == [320] * 75
    assert "truncated" in res.stderr and "25 over the limit" in res.stderr


def test_hand_written_prompts_are_in_the_generated_set():
    assert generate_prompts(N_PROMPTS)[:len(HAND_WRITTEN)] == HAND_WRITTEN
