"""Deterministic prompt generator for the tokenizer tests: the hard cases of CLIP tokenization, mixed at random.

generate_prompts(n, seed) returns n prompts: first the hand-written HAND_WRITTEN list (each targets one rule),
then random mixtures of fragments from every pool below, joined by random separators (spaces, tabs, newlines,
NBSP, nothing). A fixed share of the random prompts is long (> 75 tokens) so truncation is exercised.
"""
import random

WORDS = ("a photo of a cat astronaut riding horse painting squirrel eating burger portrait landscape sunset "
         "city street night neon cyberpunk forest river mountain castle dragon knight wizard robot "
         "masterpiece best quality ultra detailed octane render trending on artstation by greg rutkowski "
         "and alphonse mucha highly intricate sharp focus concept art digital illustration cinematic "
         "lighting volumetric fog bokeh dslr hdr uhd photorealistic unreal engine studio ghibli "
         "watercolor oil canvas sketch charcoal anime manga pixel isometric low poly macro wide angle").split()

MIXED_CASE = ["A PhOtO oF a CaT", "HDR", "iPhone", "McDonald's", "NASA", "DSLR", "CamelCaseWord", "UPPER CASE",
              "Title Case Words", "eBay", "PhD", "x-Men", "THE END", "Mount EVEREST"]

UNICODE = ["café", "naïve", "Ångström", "São Paulo", "Zürich", "Dvořák", "façade", "crème brûlée", "jalapeño",
           "e\u0301", "a\u0308b", "n\u0303o", "Cafe\u0301", "o\u0302\u0323",  # decomposed: combining marks
           "日本語のテキスト", "中文提示词", "한국어", "ひらがな", "カタカナ", "東京タワー",
           "🐱", "👩\u200d🚀", "🏳️\u200d🌈", "🇯🇵", "👍🏽", "❤️", "🔥🔥🔥", "✨", "🎨🖌️",
           "Москва", "ПРИВЕТ мир", "Ёлка", "ΟΔΟΣ", "Σίσυφος", "ΣΟΦΙΑ ΚΑΙ ΛΟΓΟΣ", "αλφα βήτα", "ΑΘΗΝΑ",
           "مرحبا", "שלום", "नमस्ते", "สวัสดี", "Ελληνικά", "İstanbul", "straße", "ǅemal", "ﬁne", "ﬂow",
           "ＡＢＣ", "ｆｕｌｌｗｉｄｔｈ", "１２３", "！？", "ｶﾀｶﾅ",
           "zero\u200bwidth", "zw\u200cnj", "zw\u200dj", "bom\ufeffhere", "word\u2060joiner", "soft\xadhyphen",
           "x²", "H₂O", "½ cup", "Ⅻ", "٣٤٥", "①②", "१२३", "∞", "≈", "→", "©", "®", "™", "°C", "€100", "£5", "¥",
           "Ã©mojibake", "â€™s", "Ã¼ber", "donâ€™t"]

PUNCTUATION = ["!!!", "?!", "...", "---", "***", "(((masterpiece)))", "[[detail]]", "{a|b}", "@#$%^&*", "~~",
               "<>", "::", ",,", '"quoted"', "—", "–", "…", "«guillemets»", "¿¡", "(ultra-detailed:1.2)",
               "a_b-c+d=e/f\\g|h~i`j^k", "[", "]", "((", "))", ";", ":)", ":-(", "^_^", "#hashtag", "@user",
               "https://example.com/a?b=c&d=e", "e-mail", "C++", "A/B", "50/50", "|", "<|", "|>"]

APOSTROPHES = ["it's", "don't", "they're", "we've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "THEY'RE",
               "it’s", "don’t", "‘single’", "“double”", "rock'n'roll", "'s", "''s", "o'clock", "'tis",
               "y'all'd've", "cat's", "cats'", "'quoted'", "'", "''", "'S", "'Ll", "rock 'n' roll", "it' s",
               "won't've", "ma'am", "'re'", "'ve", "'m", "'d", "'ll", "'t"]

NUMBERS = ["1,000,000", "3.14159", "1e-5", "2023-01-01", "12:30", "$1,299.99", "50%", "4k", "8K", "1080p",
           "v1.5", "0.18215", "42", "007", "-273.15", "+1", "10x", "3d", "2D", "1st", "22nd", "1920x1080",
           "sd-v1-5", "#1", "No.9"]

HTML = ["&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&amp;amp;", "&nbsp;", "&eacute;", "&#x27;", "&copy;",
        "R&amp;D", "Tom &amp; Jerry", "it&#39;s", "a &lt; b", "&gt;&gt;", "&notanentity;", "&#8217;", "&"]

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "<|endoftext", "<|start"]

WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\xa0", "\u3000", "\u2009", "\u202f", " \t\n ", "\x0b",
              "\x0c", "\x85", "\u2028", "\u2003"]

POOLS = [WORDS, WORDS, WORDS, MIXED_CASE, UNICODE, UNICODE, PUNCTUATION, APOSTROPHES, NUMBERS, HTML, WHITESPACE]

HAND_WRITTEN = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A painting of a squirrel eating a burger",
    "Hello,   World!! it's 2024 café",
    "  leading and trailing spaces  ",
    "\ttabs\tand\nnewlines\n",
    "\xa0nbsp\xa0around\xa0",
    "MiXeD CaSe PrOmPt",
    "it's they're we've I'm we'll he'd don't",
    "IT'S THEY'RE WE'VE I'M WE'LL HE'D DON'T",
    "it’s “curly” ‘quotes’",
    "1,000,000 3.14159 2023-01-01",
    "Tom &amp; Jerry &#39;n&#39; friends",
    "&amp;amp; double escaped",
    "a < b &amp; c",
    "fullwidth ＡＢＣ１２３！",
    "zero\u200bwidth\u200cjoiners\u200dhere\ufeff",
    "e\u0301le\u0301phant (decomposed)",
    "ΟΔΟΣ ΣΟΦΙΑΣ",
    "日本語 中文 한국어",
    "emoji 🐱👩\u200d🚀🏳️\u200d🌈",
    "(((masterpiece))), best quality, [[ultra detailed]], {a|b}",
    "<|startoftext|> special <|endoftext|>",
    "<|STARTOFTEXT|>x<|endoftext|>y",
    "Ã©mojibake text that ftfy fixes â€” like this",
    " ".join(["a"] * 75),  # exactly 75 content tokens: no truncation
    " ".join(["a"] * 76),  # one over: truncation and a warning
    " ".join(["photo"] * 120),
    "a " * 300,
]


def _fragment(rng):
    pool = rng.choice(POOLS)
    return rng.choice(pool)


def _random_prompt(rng, n_fragments):
    seps = [" ", " ", " ", ", ", "", "  ", "\t", "\n", "\xa0", " - "]
    parts = []
    for _ in range(n_fragments):
        parts.append(_fragment(rng))
        parts.append(rng.choice(seps))
    if rng.random() < 0.05:  # now and then a special token string inside ordinary text
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(SPECIALS))
    return "".join(parts[:-1] if rng.random() < 0.7 else parts)


def generate_prompts(n=240, seed=0):
    """n prompts (n >= len(HAND_WRITTEN)): the hand-written cases, then random ones (1 in 8 long, > 75 tokens)."""
    rng = random.Random(seed)
    prompts = list(HAND_WRITTEN)
    while len(prompts) < n:
        long = rng.random() < 0.125
        prompts.append(_random_prompt(rng, rng.randint(60, 120) if long else rng.randint(1, 12)))
    return prompts[:n]
