r"""CLIP byte-level BPE tokenizer: prompt text -> the (N, 77) int64 token ids the SD text encoder reads.

Glossary: N = prompts in a batch, L = sequence length (77 for CLIP), V = vocabulary size (49,408 + added tokens).

Pipeline for one prompt (each step matches Hugging Face's Python `CLIPTokenizer`, the slow one that SD 1.x
pipelines used through transformers 4.x, with `ftfy` installed):

  1. Whole units. The text is first cut at every exact occurrence of `<|startoftext|>`, `<|endoftext|>`, the pad
     token (HF registers it as a special token: "!" for SD 2.x, see `match_pad_token`) and the textual-inversion
     tokens registered with `add_tokens` (leftmost-longest match, case-sensitive, even inside a word:
     "a<birb-style>cat" -> a, <birb-style>, cat). These pieces become one id each and skip steps 2-4.
  2. Cleanup of every other piece: `ftfy.fix_text` (mojibake, curly quotes -> straight, fullwidth -> ASCII,
     ligatures, HTML entities when the piece has no '<', NFC) -> collapse runs of Unicode White_Space to one
     space -> strip -> lowercase (`str.lower`, which writes a word-final capital sigma as 'ς').
  3. Pre-tokens: the split regex of openai/CLIP,
         <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+   (IGNORECASE)
     written by hand below with `unicodedata` categories, so minisd needs no `regex` package: runs of letters,
     one digit at a time, runs of anything else that is not white space, and the English contractions.
  4. Byte-level BPE: each pre-token's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), the
     last symbol gets the end-of-word mark `</w>`, then the adjacent pair with the lowest merge rank is merged,
     repeatedly, until no pair is in the merge table. Results are cached per pre-token.

Model input (`__call__`): [49406] + ids[:75] + [49407], padded to 77 with 49407 (SD 1.x, the SD 1.5 tokenizer's
pad token is <|endoftext|>) or with 0 (SD 2.x / OpenCLIP, pad token "!"). Longer prompts are truncated with a
warning that shows the dropped text, as diffusers does.

SD 2.x subtlety: with HF's pad token "!" (diffusers' SD 2.x tokenizer files) every "!" in a prompt is a lone id 0
("wow!!" -> wow</w>, !, !), while open_clip, which SD 2.x was trained with, tokenizes it normally (!!</w>).
`CLIPTokenizer.sd2()` reproduces diffusers; `CLIPTokenizer.sd2(match_pad_token=False)` reproduces open_clip.

Deviations and where results can differ (measured in tests/test_tokenizer.py):
  * Without `ftfy` installed (or with use_ftfy=False), step 2 uses Unicode NFC instead of ftfy.fix_text; that is
    what transformers >= 5 does (its CLIPTokenizer is the Rust `tokenizers` one and never calls ftfy). Prompts with
    curly quotes, fullwidth characters, ligatures, HTML entities or mojibake then give different ids.
  * The original openai/open_clip tokenizer also applies html.unescape twice; HF's does not (ftfy unescapes once,
    and only when the piece contains no '<'). minisd follows HF.
  * transformers >= 5 lowercases char by char (word-final 'Σ' -> 'σ', not 'ς'), matches added tokens after
    lowercasing (case-insensitive), and compiles the split regex without IGNORECASE ("'ſ" is one pre-token here).
  * `unicodedata` is the Unicode version of the running Python (14.0 for 3.11); the `regex` package may know
    newer letters. Characters assigned after that version count as punctuation here.
  * HF's slow tokenizer reuses the id of an added token that is already in the vocabulary; `add_tokens` refuses.

References (pinned):
  openai/CLIP clip/simple_tokenizer.py
    https://github.com/openai/CLIP/blob/2558ec83f8fdfd5b500bf0c7255d1f53b5dbf588/clip/simple_tokenizer.py
  HF slow CLIPTokenizer (transformers v4.57.3)
    https://github.com/huggingface/transformers/blob/v4.57.3/src/transformers/models/clip/tokenization_clip.py
  diffusers truncation warning (encode_prompt):
    https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py
  Vocabulary: minisd/data/bpe_simple_vocab_16e6.txt.gz from open-clip-torch 3.3.0 (MIT, data/LICENSE.open_clip);
    identical to SD 1.5's tokenizer/vocab.json + merges.txt.
"""
import gzip
import re
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

try:  # optional: text repair exactly as HF's slow CLIPTokenizer does it (see the module docstring)
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
SD1_PAD_ID = EOT_ID  # SD 1.x (HF tokenizer_config: pad_token "<|endoftext|>")
SD2_PAD_ID = 0  # SD 2.x / OpenCLIP pads with "!" = id 0
MAX_LENGTH = 77  # CLIP's context length: SOT + 75 content tokens + EOT
NUM_MERGES = 49152 - 256 - 2  # 48,894: the gz file lists 262,144 merges; CLIP uses the first 48,894
BASE_VOCAB_SIZE = 49408  # 256 bytes + 256 bytes with </w> + 48,894 merges + 2 specials
VOCAB_PATH = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

TRUNCATION_MESSAGE = ("The following part of your input was truncated because CLIP can only handle sequences up "
                      "to {max_length} tokens: {text!r}")

# Unicode White_Space: exactly the characters `\s` matches in the `regex` package (and Rust's regex). It is not
# str.isspace(), which also contains the separators U+001C..U+001F.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(chr(c) for c in range(0x2000, 0x200B)))
_WHITESPACE_RUN = re.compile("[" + re.escape("".join(sorted(WHITESPACE))) + "]+")

# The contractions of the split regex, in its order. They only start at an apostrophe.
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


# ----------------------------------------------------------------------------------------------------------------
# byte <-> printable character map and the pre-token split

@lru_cache(maxsize=None)
def bytes_to_unicode():
    """{byte value: one printable character}. BPE works on strings, so every UTF-8 byte needs a visible stand-in.

    The 188 bytes that are already printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the
    other 68 (control characters, space, soft hyphen) get U+0100, U+0101, ... in byte order. Vocabulary ids
    0..255 follow the order of this dict: the printable bytes first, then the remapped ones.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _char_class(c):
    """'L' letter (\\p{L}), 'N' number (\\p{N}), ' ' white space or U+0345 (see below), 'P' anything else."""
    if c in WHITESPACE or c == "\u0345":
        # U+0345 COMBINING GREEK YPOGEGRAMMENI is a mark (Mn), but under IGNORECASE a negated class also rejects
        # a character whose case variants are in it, and U+0345 case-folds to the letter iota. So no alternative
        # of the regex matches it and findall skips it like white space (checked against `regex` in the tests).
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def _same_ignorecase(c, lit):
    """Does character c match the literal character `lit` of the split regex under IGNORECASE?

    For the ASCII literals of that regex the case-insensitive equivalents are the upper case letter and, for 's',
    U+017F LATIN SMALL LETTER LONG S (its case folding is 's'). tests/test_tokenizer.py checks this against the
    `regex` package for every code point.
    """
    return c == lit or c == lit.upper() or (lit == "s" and c == "\u017f")


def _match_literal(text, i, lit):
    """Does text[i:] start with `lit`, compared case-insensitively like the regex?"""
    return len(text) - i >= len(lit) and all(_same_ignorecase(text[i + k], ch) for k, ch in enumerate(lit))


def pre_tokenize(text):
    """Split cleaned text into pre-tokens exactly like the CLIP split regex with re.findall (see module docstring).

    At each position the regex tries its alternatives in order and takes the first that matches; a position where
    none matches (white space) is skipped. So "it's" -> it, 's and "!'s" -> !', s (the punctuation run is greedy).
    """
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        kind = _char_class(c)
        if kind == " ":  # no alternative matches white space: findall moves on
            i += 1
            continue
        j = 0
        if c == "<":
            for special in (SOT, EOT):
                if _match_literal(text, i, special):
                    j = i + len(special)
                    break
        elif c == "'":
            for tail in _CONTRACTIONS:
                if _match_literal(text, i + 1, tail):
                    j = i + 1 + len(tail)
                    break
        if not j:
            j = i + 1
            if kind == "L":  # [\p{L}]+
                while j < n and _char_class(text[j]) == "L":
                    j += 1
            elif kind == "P":  # [^\s\p{L}\p{N}]+ ; a number, [\p{N}], is always a single character
                while j < n and _char_class(text[j]) == "P":
                    j += 1
        out.append(text[i:j])
        i = j
    return out


# ----------------------------------------------------------------------------------------------------------------
# the vocabulary (loaded once per file, shared by every tokenizer instance)

class _Vocab:
    """The BPE tables of one vocabulary file, plus a cache of finished pre-tokens (shared: it depends only on the
    merges). encoder: token string -> id; decoder: id -> token string; ranks: (left, right) -> merge rank."""

    def __init__(self, path):
        with gzip.open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        # Line 0 is a '#version' header; the merges used by CLIP are lines 1 .. 48,894 ("i n", "t h", ...).
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"tokenizer: {path} is not a CLIP BPE merges file (need {NUM_MERGES} 'a b' lines "
                             f"after the header)")
        byte_chars = list(bytes_to_unicode().values())
        tokens = byte_chars + [ch + "</w>" for ch in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.decoder = tokens  # id -> token string, ids 0 .. 49,407
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.cache = {}

    def bpe(self, word):
        """Byte-mapped pre-token (str) -> list of ids. Greedy: always merge the lowest-ranked adjacent pair."""
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        symbols = list(word[:-1]) + [word[-1] + "</w>"]  # the end-of-word mark rides on the last symbol
        while len(symbols) > 1:
            best, best_rank = None, NUM_MERGES
            for pair in zip(symbols[:-1], symbols[1:]):
                rank = self.ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:  # no adjacent pair is a known merge: done
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder[s] for s in symbols]  # every merge result and every byte symbol is in the vocab
        self.cache[word] = ids
        return ids


@lru_cache(maxsize=None)
def _load_vocab(path):
    return _Vocab(path)


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer

def _check_call_args(pad_id, max_length):
    if not 0 <= int(pad_id) < BASE_VOCAB_SIZE:
        raise ValueError(f"tokenizer: pad_id must be an id in [0, {BASE_VOCAB_SIZE}), got {pad_id} "
                         f"(SD 1.x pads with {SD1_PAD_ID}, SD 2.x with {SD2_PAD_ID})")
    if int(max_length) < 2:
        raise ValueError(f"tokenizer: max_length must be >= 2 (SOT and EOT), got {max_length}")


class CLIPTokenizer:
    """CLIP BPE tokenizer for SD 1.x/2.x. `CLIPTokenizer.sd1()` pads with 49407, `CLIPTokenizer.sd2()` with 0.

    tok = CLIPTokenizer.sd1()
    tok.encode("a photo of a cat")        # [320, 1125, 539, 320, 2368]   (no SOT/EOT)
    tok(["a photo", "a cat"])             # (2, 77) int64: SOT, ids, EOT, padding
    tok.add_tokens(["<birb-style>"])      # [49408]: a textual-inversion token, matched as one unit

    pad_id: id written after EOT (49407 for SD 1.x, 0 for SD 2.x); max_length: L, 77 for every SD model;
    use_ftfy: None = use ftfy.fix_text when ftfy is installed, True = require it, False = NFC only (this is what
    transformers >= 5 does); vocab_path: a bpe_simple_vocab_16e6.txt.gz (default: the one shipped with minisd).
    match_pad_token: HF registers the pad token as a special token, so its text is cut out of prompts as one unit
    like <|endoftext|>. For SD 1.x that changes nothing (the pad token is <|endoftext|>); for SD 2.x in diffusers
    (pad token "!") every "!" in a prompt becomes a lone id 0: "wow!!" -> wow</w>, !, ! instead of wow</w>, !!</w>.
    True (default) reproduces diffusers/transformers; False reproduces open_clip, which SD 2.x was trained with.
    The vocabulary file is read on first use and shared by all instances.
    """

    def __init__(self, pad_id=SD1_PAD_ID, max_length=MAX_LENGTH, use_ftfy=None, vocab_path=None,
                 match_pad_token=True):
        if use_ftfy and ftfy is None:
            raise ImportError("tokenizer: use_ftfy=True needs the ftfy package: pip install ftfy")
        _check_call_args(pad_id, max_length)
        self.pad_id = int(pad_id)
        self.max_length = int(max_length)
        self.use_ftfy = ftfy is not None if use_ftfy is None else bool(use_ftfy)
        self.vocab_path = str(vocab_path or VOCAB_PATH)
        self.match_pad_token = bool(match_pad_token)
        self._vocab = None
        self.added_tokens = {}  # text -> id (49408, ...), grown by add_tokens

    @classmethod
    def sd1(cls, **kwargs):
        """SD 1.x: padding with <|endoftext|> (49407), as the SD 1.5 tokenizer files say."""
        return cls(pad_id=SD1_PAD_ID, **kwargs)

    @classmethod
    def sd2(cls, **kwargs):
        """SD 2.x (OpenCLIP ViT-H): padding with "!" (id 0). Pass match_pad_token=False for open_clip's ids."""
        return cls(pad_id=SD2_PAD_ID, **kwargs)

    @property
    def vocab(self):
        if self._vocab is None:  # lazy: constructing a tokenizer costs nothing until it is used
            self._vocab = _load_vocab(self.vocab_path)
        return self._vocab

    @property
    def vocab_size(self):
        """V: 49,408 plus the added tokens."""
        return BASE_VOCAB_SIZE + len(self.added_tokens)

    def whole_units(self):
        """{text: id} of everything cut out of a prompt before cleanup: SOT, EOT, the pad token (match_pad_token)
        and the added tokens."""
        units = {SOT: SOT_ID, EOT: EOT_ID}
        if self.match_pad_token and 0 <= self.pad_id < SOT_ID:
            units[self.vocab.decoder[self.pad_id]] = self.pad_id
        units.update(self.added_tokens)
        return units

    # --- text -> ids ---------------------------------------------------------------------------------------------

    def add_tokens(self, tokens):
        """Register new whole-unit tokens (textual inversion). tokens: str or list of str -> list of their new ids
        (49408, 49409, ... in order). Like HF's slow tokenizer they are found in the raw prompt, case-sensitively,
        even without spaces around them. The text encoder must get one embedding row per new id."""
        if isinstance(tokens, str):
            tokens = [tokens]
        new_ids = []
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"tokenizer.add_tokens: tokens must be non-empty strings, got {t!r}")
            if t in self.added_tokens or t in self.vocab.encoder:
                # HF silently reuses the existing id; textual-inversion loaders (diffusers) refuse, and so do we:
                # a new embedding for an existing token would be ignored or would change every prompt using it.
                raise ValueError(f"tokenizer.add_tokens: {t!r} is already in the vocabulary "
                                 f"(id {self.added_tokens.get(t, self.vocab.encoder.get(t))}); choose another name")
            self.added_tokens[t] = BASE_VOCAB_SIZE + len(self.added_tokens)
            new_ids.append(self.added_tokens[t])
        return new_ids

    def _split_added(self, text):
        """Cut text at the whole units (leftmost-longest). Returns [(piece, id or None)]; None = ordinary text."""
        units = self.whole_units()
        out, start, i = [], 0, 0
        starts = {t[0] for t in units}
        while i < len(text):
            hit = None
            if text[i] in starts:
                for t in units:
                    if text.startswith(t, i) and (hit is None or len(t) > len(hit)):
                        hit = t
            if hit is None:
                i += 1
                continue
            if start < i:
                out.append((text[start:i], None))
            out.append((hit, units[hit]))
            i = start = i + len(hit)
        if start < len(text):
            out.append((text[start:], None))
        return out

    def clean(self, text):
        """Step 2 of the module docstring: fix_text -> collapse white space -> strip -> lowercase."""
        text = ftfy.fix_text(text) if self.use_ftfy else unicodedata.normalize("NFC", text)
        return _WHITESPACE_RUN.sub(" ", text).strip().lower()

    def _encode_piece(self, text):
        """Ordinary text (no added tokens) -> (ids, BPE token strings)."""
        vocab = self.vocab
        byte_map = bytes_to_unicode()
        ids = []
        for word in pre_tokenize(self.clean(text)):
            if word in (SOT, EOT):  # the regex's first alternatives: a lowercased "<|STARTOFTEXT|>" is the token
                ids.append(vocab.encoder[word])
                continue
            try:
                raw = word.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"tokenizer: the text contains a lone surrogate in {word!r}; it is not valid "
                                 f"Unicode text (install ftfy, which repairs it, or fix the input)") from None
            ids.extend(vocab.bpe("".join(byte_map[b] for b in raw)))
        return ids

    def encode(self, text):
        """str -> list of ids, without SOT/EOT and without truncation."""
        if not isinstance(text, str):
            raise ValueError(f"tokenizer.encode: text must be a str, got {type(text).__name__}")
        ids = []
        for piece, piece_id in self._split_added(text):
            if piece_id is not None:
                ids.append(piece_id)
            else:
                ids.extend(self._encode_piece(piece))
        return ids

    def tokenize(self, text):
        """str -> list of token strings ('a</w>', 'photo</w>', '<birb-style>'), for inspection."""
        return [self.id_to_token(i) for i in self.encode(text)]

    def __call__(self, prompts, pad_id=None, max_length=None):
        """prompts: str or list of N str -> (N, L) int64 array: [SOT] + ids[:L-2] + [EOT] + padding.

        pad_id / max_length default to the instance's; pad_id here only changes the padding value (which text is
        matched as a whole unit is fixed by the instance, see match_pad_token). Prompts with more than L-2 tokens
        are truncated and a UserWarning names how many tokens were dropped and shows their text.
        """
        pad_id = self.pad_id if pad_id is None else int(pad_id)
        length = self.max_length if max_length is None else int(max_length)
        _check_call_args(pad_id, length)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("tokenizer: prompts must be a str or a list of str, got "
                             f"{type(prompts).__name__}")
        out = np.full((len(prompts), length), pad_id, dtype=np.int64)  # (N, L)
        for n, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            keep = length - 2
            if len(ids) > keep:
                dropped = ids[keep:]
                warnings.warn(f"CLIPTokenizer: prompt {n} has {len(ids)} tokens, {len(dropped)} over the limit of "
                              f"{keep}; they were dropped. "
                              + TRUNCATION_MESSAGE.format(max_length=length, text=self.decode(dropped)),
                              UserWarning, stacklevel=2)
                ids = ids[:keep]
            out[n, 0] = SOT_ID
            out[n, 1:len(ids) + 1] = ids
            out[n, len(ids) + 1] = EOT_ID
        return out

    # --- ids -> text ---------------------------------------------------------------------------------------------

    def id_to_token(self, i):
        """id -> token string (BPE piece, special or added token)."""
        i = int(i)
        if 0 <= i < BASE_VOCAB_SIZE:
            return self.vocab.decoder[i]
        for t, t_id in self.added_tokens.items():
            if t_id == i:
                return t
        raise ValueError(f"tokenizer: id {i} is outside the vocabulary [0, {self.vocab_size})")

    def decode(self, ids, skip_special_tokens=False):
        """ids (sequence or 1-D array) -> text. Byte pieces are joined and decoded as UTF-8 (invalid bytes, e.g. a
        character cut by truncation, become U+FFFD), '</w>' becomes a space. SOT/EOT/the pad token (when matched
        as a unit)/added tokens appear as their text, separated by spaces; skip_special_tokens drops SOT, EOT and
        that pad token, as HF does (e.g. the padding of __call__)."""
        byte_dec = {ch: b for b, ch in bytes_to_unicode().items()}
        specials = {SOT_ID, EOT_ID} | ({self.pad_id} if self.match_pad_token else set())
        words, pieces = [], []

        def flush():
            if pieces:
                raw = bytes(byte_dec[ch] for ch in "".join(pieces))  # '</w>' is made of printable bytes too
                words.append(raw.decode("utf-8", errors="replace").replace("</w>", " ").strip(" "))
                pieces.clear()

        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            token = self.id_to_token(i)
            if i < SOT_ID and i not in specials:
                pieces.append(token)
                continue
            flush()
            if not (skip_special_tokens and i in specials):
                words.append(token)
        flush()
        return " ".join(w for w in words if w)
