"""Penn Treebank tokenization exactly as the COCO caption toolkit does it, in pure Python.

pycocoevalcap's ``PTBTokenizer`` writes all captions of a dictionary, one per line, to a file, runs
Stanford CoreNLP 3.4.1's ``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` on it and
then drops the tokens listed in :data:`PUNCTUATION`. This module reimplements that lexer (a JFlex
scanner: at each position the longest match over all rules wins, the earlier rule on a tie, and a
rule's trailing context counts towards its length) and the two post-processing steps. It was
developed against the real jar as the oracle, on tens of thousands of generated strings (caption
words, random ASCII, random Unicode), until they all agreed.

Two facts about the toolkit that matter for exactness:

* The jar sees the captions joined by newlines, so a rule's look-ahead can read the start of the
  *next* caption ("Agent J." gives "agent j" when the next caption starts with "The", else
  "agent j."). :func:`tokenize_corpus` therefore lexes the joined text, in the toolkit's order.
* The jar lower-cases *after* tokenizing (``-lowerCase``), and the punctuation list is upper-case,
  so ``-lrb-``, ``-rrb-``, ``-lsb-`` and the like survive the punctuation filter.

Known differences from the toolkit:

* Deliberate: the toolkit only replaces ``\\n`` inside a caption; a ``\\r``, form feed, vertical
  tab, U+0085, U+2028 or U+2029 makes the jar emit an extra line and shifts every later caption
  onto the wrong image. Here those characters are treated as spaces instead.
* Lower-casing is Python's ``str.lower`` where the jar uses Java's ``toLowerCase``; they differ on
  rare cases such as Java's wider rule for a word-final capital sigma (Σ -> ς).

The lexer's notion of letters and digits (Unicode of about 2013) is in :mod:`._ptb_chars`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import cache
from typing import NamedTuple, TypeVar

from . import _ptb_chars

__all__ = ["PUNCTUATION", "tokenize", "tokenize_corpus"]

#: Tokens pycocoevalcap removes after tokenization (``PUNCTUATIONS`` in ptbtokenizer.py).
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_Key = TypeVar("_Key", bound=Hashable)

# Characters the toolkit would turn into extra output lines; we treat them as spaces (see above).
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x85\u2028\u2029]")


def _char_class(ranges: str) -> str:
    """The body of a regex character class from ``_ptb_chars``' "0041-005A 00AA ..." notation."""
    parts = []
    for item in ranges.split():
        first, _, last = item.partition("-")
        parts.append(re.escape(chr(int(first, 16))))
        if last:
            parts.append("-" + re.escape(chr(int(last, 16))))
    return "".join(parts)


_L = _char_class(_ptb_chars.LETTERS)
_D = _char_class(_ptb_chars.DIGITS)


def _caseless(pattern: str) -> str:
    """Make the letters of a JFlex-style regex case-insensitive, except inside character classes.

    The CoreNLP lexer is ``%caseless``, which "does not affect character classes": ``Pp?t[ye]s?``
    matches "PTy" but not "PTY". Letters outside ``[...]`` become ``[xX]``; escapes and ``(?:``
    group openers are copied unchanged.
    """
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            width = {"u": 6, "x": 4}.get(pattern[i + 1], 2)
            out.append(pattern[i : i + width])
            i += width
            continue
        if in_class:
            in_class = char != "]" or pattern[i - 1] == "["
        elif char == "[":
            in_class = True
        elif char == "(" and pattern.startswith("(?", i):
            close = pattern.index(":", i)
            out.append(pattern[i : close + 1])
            i = close + 1
            continue
        elif char.isalpha() and char.lower() != char.upper():
            char = f"[{char.lower()}{char.upper()}]"
        out.append(char)
        i += 1
    return "".join(out)


# ---- macros, named as in CoreNLP's PTBLexer.flex (case-sensitive form; see _caseless) ---------
SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
SPACES = f"{SPACE}+"
SPACENL = f"(?:{SPACE}|\n)"
SPACENLS = f"{SPACENL}+"
LETTER_CLASS = f"[{_L}]"
DIGIT = f"[{_D}]"
ALNUM = f"[{_L}{_D}]"
SPLET = "&[aeiouAEIOU](?:acute|grave|uml);"
LETTER = f"(?:[{_L}{_char_class(_ptb_chars.WORD_EXTRAS)}]|{SPLET})"  # what words are made of
WORD = f"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"
APOS = "(?:['\u0092\u2019]|&apos;)"
APOSETCETERA = f"(?:{APOS}|[`\u0091\u2018\u201b])"
REDAUX = f"{APOS}(?:[msdMSD]|re|ve|ll)"
SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = f"n{APOSETCETERA}t"
HYPHEN = "[-_\u058a\u2010\u2011]"
SGML_NAME = "[A-Za-z][A-Za-z0-9_:.-]*"
SGML_ATTRIBUTE = f"{SGML_NAME}(?:[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?"
SGML = f"<(?:[!?][A-Za-z-][^>\r\n]*|{SGML_NAME}(?:[ ]+{SGML_ATTRIBUTE})*[ ]*\\/?|\\/{SGML_NAME})[ ]*>"
SPAMP = "&amp;"
INSENTP = "[,;:\u3001]"
ACRO = "[A-Za-z](?:\\.[A-Za-z])*"
ACRO2 = "[A-Za-z](?:\\.[A-Za-z])+"
ACRO_FORMS = (ACRO, "(?:Canada|Sino|Korean|EU|Japan|non)-U\\.S", "U\\.S\\.-(?:U\\.K|U\\.S\\.S\\.R)")
ABMONTH = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
ABDAYS = "Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
ABSTATE = (
    "Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn"
    "|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo"
)
ABCOMP = "Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
ABNUM = "tel|est|ext|sq"
ABPTIT = "Jr|Sr|Bros|(?:Ed|Ph)\\.D|Blvd|Rd|Esq"
ABBREV1 = f"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq|Bldg)\\."
ABTITLE = (
    "Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt"
    "|Ste?|Ave|Pres|Lieut|Rt|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme"
    "|Msgr|Sfc"
)
ABCOMP2 = "Invt|Elec|Natl|M[ft]g|Dept"
ABBREV4_FORMS = (f"(?:{ABTITLE}|vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREAS|Ph|{ABCOMP2})", *ACRO_FORMS)
ABBREV3 = "(?:ca|figs?|prop|nos?|art|bldg|pp|op)\\."
SENTEND = f"{SPACENL}(?:{SPACENL}|[A-Z]|{SGML})"
ACRONYM_FOLLOWERS = (
    "[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere"
    "|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he"
    "|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen"
    f"|[W]hile|[W]hat|[Y]et|[Y]ou|{SGML}"
)
QUOTE_CHARS = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
DBLQUOT = '(?:"|&quot;)'
MISCSYMBOL = (
    "[+%&~\\^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387"
    "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
    "\u0703-\u070d\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b"
    "\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
)
FILENAME_EXT = (
    "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt"
    "|ps|py|sql|tar|txt|wav|x|xml|zip"
)
EMAIL_CHAR = '[^ \t\n\f\r"<>|(){}\u00a0]'
DOMAIN_CHAR = '[^ \t\n\f\r"<>|(){}.\u00a0]'
URL_END = '[^ \t\n\f\r"<>|.!?(){},-]'
URL_PATH = f'(?:\\/[^ \t\n\f\r"<>|()]+{URL_END})?'


# ---- actions: what a matched rule emits ---------------------------------------------------------
def _strip_soft_hyphens(text: str) -> str:
    """CoreNLP's removeSoftHyphens: drop U+00AD, and a token of only soft hyphens becomes "-"."""
    stripped = text.replace("\u00ad", "")
    return stripped or "-"


_SINGLE_QUOTE = re.compile("&apos;|'")
_DOUBLE_QUOTE = re.compile('"|&quot;')
_AMP = re.compile("(?i:&amp;)")


def _latex_quotes(text: str, probably_left: bool) -> str:
    """CoreNLP's latexQuotes: map quote characters to `, ', `` and '' (the PTB convention)."""
    text = _SINGLE_QUOTE.sub("`" if probably_left else "'", text)
    text = _DOUBLE_QUOTE.sub("``" if probably_left else "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


class _Emit(NamedTuple):
    """What an action produces: the token text (None for none) and how many characters it used."""

    token: str | None
    length: int


_Action = Callable[[str], _Emit]


def _same(text: str) -> _Emit:
    return _Emit(text, len(text))


def _word(text: str) -> _Emit:
    return _Emit(_strip_soft_hyphens(text), len(text))


def _left_quote(text: str) -> _Emit:
    return _Emit(_latex_quotes(text, True), len(text))


def _right_quote(text: str) -> _Emit:
    return _Emit(_latex_quotes(text, False), len(text))


def _skip(text: str) -> _Emit:
    return _Emit(None, len(text))


def _constant(token: str) -> _Action:
    return lambda text: _Emit(token, len(text))


def _pushback(count: int) -> _Action:
    """Emit all but the last ``count`` characters, which are lexed again."""
    return lambda text: _Emit(text[:-count], len(text) - count)


def _nbsp(text: str) -> _Emit:
    """normalizeSpace: spaces inside a token become non-breaking spaces."""
    return _Emit(text.replace(" ", "\u00a0"), len(text))


def _duplicate_period(text: str) -> _Emit:
    """An abbreviation ending a sentence: emit it with its period, then lex the period again."""
    return _Emit(text, len(text) - 1)


def _acronym(text: str) -> _Emit:
    """An acronym before a sentence-initial word; a lone letter ("I.") gives up its period instead."""
    if len(text) == 2:
        return _Emit(text[:1], 1)
    return _Emit(text, len(text) - 1)


def _amp(text: str) -> _Emit:
    return _Emit(_AMP.sub("&", text), len(text))


def _hyphens(text: str) -> _Emit:
    return _Emit("--" if 3 <= len(text) <= 4 else text, len(text))


def _currency(text: str) -> _Emit:
    return _Emit(_CURRENCY.get(text, text), len(text))


def _fraction(text: str) -> _Emit:
    return _Emit(_FRACTIONS.get(text, text), len(text))


def _escape_parens(text: str) -> str:
    """normalizeParentheses inside a token: ( and ) become -LRB- and -RRB-."""
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _smiley(text: str) -> _Emit:
    return _Emit(_escape_parens(text), len(text))


def _phone(text: str) -> _Emit:
    return _Emit(_escape_parens(text.replace(" ", "\u00a0")), len(text))


# ---- the rules, in the lexer's priority order ---------------------------------------------------
class _Rule(NamedTuple):
    """One alternative of a lexer rule; ``(?P<t>...)`` marks the token when there is trailing context."""

    pattern: re.Pattern[str]
    action: _Action


@cache
def _rules() -> list[_Rule]:
    """The lexer rules in priority order (compiled on first use: importing stays cheap)."""
    rules: list[tuple[str, _Action]] = []

    def add(action: _Action, *alternatives: str, context: str | None = None) -> None:
        """Add a rule; each alternative competes on its own (longest match), with the same action."""
        for alternative in alternatives:
            pattern = _caseless(alternative)
            rules.append((pattern if context is None else f"(?P<t>{pattern}){_caseless(context)}", action))

    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\u00ad]+))+"
    thing_part = f"(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+"
    thing = f"{thing_part}(?:{HYPHEN}{thing_part})*"
    thinga = f"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+"
    number_gap = "[.:,\u00ad\u066b\u066c]"

    add(_same, "c[+][+]|(?:c|f)#")
    add(_pushback(3), "cannot", "'twas")
    add(_pushback(2), "'tis", "gonna", "gotta", "lemme", "gimme", "wanna")
    add(_nbsp, SGML)
    add(_constant("--"), "&(?:MD|mdash|ndash);", "[\u0096\u0097\u2013\u2014\u2015]")
    add(_amp, SPAMP)
    add(_same, "&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);")
    add(_word, WORD, context=REDAUX)
    add(_word, SWORD, context=SREDAUX)
    add(_word, WORD)
    add(
        _same,
        f"{APOS}n{APOS}?",
        f"[lLdDjJ]{APOS}",
        f"Dunkin{APOS}",
        f"somethin{APOS}",
        f"ol{APOS}",
        f"{APOS}em",
        f"[A-HJ-XZn]{APOSETCETERA}{LETTER_CLASS}{{2}}{LETTER_CLASS}*",
        f"{APOS}[2-9]0s",
        f"{APOS}till?",
        f"{LETTER_CLASS}+[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z]{LETTER_CLASS}*",
        f"{APOS}cause",
        "cont'd\\.?",
        "nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l",
        f"O{APOSETCETERA}o",
    )
    add(_same, f"y{APOS}", context=LETTER_CLASS)
    add(_same, f'https?:\\/\\/[^ \t\n\f\r"<>|()]+{URL_END}')
    add(
        _same,
        f'www\\.(?:[^ \t\n\f\r"<>|.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}}{URL_PATH}',
        f"(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\\.)+(?:com|net|org|edu){URL_PATH}",
    )
    add(_same, f"(?:&lt;|<)?[a-zA-Z0-9]{EMAIL_CHAR}*@(?:{DOMAIN_CHAR}+\\.)*{DOMAIN_CHAR}+(?:&gt;|>)?")
    add(_same, "@[a-zA-Z_][a-zA-Z_0-9]*", f"#{LETTER}+")
    add(_right_quote, REDAUX, context="[^A-Za-z]")
    add(_right_quote, SREDAUX)
    add(_same, f"{DIGIT}{{1,2}}[-/]{DIGIT}{{1,2}}[-/]{DIGIT}{{2,4}}")
    add(_word, f"[-+]?{DIGIT}+", f"[-+]?{DIGIT}*(?:{number_gap}{DIGIT}+)+")
    add(_same, "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)")
    add(_nbsp, f"(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\\\?\\/|\u2044){DIGIT}{{1,4}}")
    add(_fraction, "[\u00bc\u00bd\u00be\u2153-\u215e]")
    add(
        _amp,
        "-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\\.D\\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls",
        f"Cap{APOS}n",
        f"c{APOS}est",
    )
    add(_same, "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?\\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}")
    add(_same, "[A-Z]*\\$|#")
    add(_currency, "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]")
    add(_acronym, *(f"{a}\\." for a in ACRO_FORMS), context=f"{SPACENLS}(?:{ACRONYM_FOLLOWERS}){SPACENL}")
    add(_same, ABBREV3, context=f"{SPACENL}?{DIGIT}")
    add(_same, "(?:pt[eyEY]|co)\\.", context=f"{SPACE}(?:ltd|lim)")
    add(_duplicate_period, ABBREV1, context=SENTEND)
    add(_same, ABBREV1, context="(?s:..)")
    add(_duplicate_period, ABBREV1)
    add(_same, *(f"{a}\\." for a in ABBREV4_FORMS))
    add(_same, *ABBREV4_FORMS, context=SPACE)
    add(_same, *ACRO_FORMS, context=SPACENL)
    add(_same, f"{APOS}[0-9][0-9]", context=SPACENL)
    add(_same, f"{ALNUM}+(?:\\.{ALNUM}+)*\\.(?:{FILENAME_EXT})", context=f"(?:{SPACENL}|[.?!,])")
    add(_word, f"{WORD}\\.", context=INSENTP)
    add(
        _phone,
        "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
        "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
        "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}",
    )
    add(_left_quote, DBLQUOT, context="[A-Za-z0-9$]")
    add(_right_quote, DBLQUOT)
    add(_skip, "\x7f")
    add(_constant("<"), "<|&lt;")
    add(_constant(">"), ">|&gt;")
    add(_smiley, "[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", context="[^A-Za-z0-9]")
    asian = "[-^x=~<>']"
    add(
        _smiley,
        "[\\^x=~<>]\\.\\[\\^x=~<>\\]",  # sic: CoreNLP's pattern has a literal "[^x=~<>]" here
        f"{asian}_{asian}",
        f"\\({asian}[_.]?{asian}\\)",
        "\\([\\^x=~<>']-[\\^x=~<>'`]\\)",
    )
    add(_constant("-LCB-"), "\\{")
    add(_constant("-RCB-"), "\\}")
    add(_constant("-LSB-"), "\\[")
    add(_constant("-RSB-"), "\\]")
    add(_constant("-LRB-"), "\\(")
    add(_constant("-RRB-"), "\\)")
    add(_hyphens, "-+")
    add(_constant("..."), "\\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\u0085\u2026]")
    add(_same, "@+", "#+", "_+")
    add(_same, "\\*+", "(?:\\\\\\*){1,3}")
    add(_same, INSENTP)
    add(_same, "[?!]+")
    add(_same, "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]")
    add(_same, "=")
    add(_same, "\\/")
    add(_word, f"{hthing}\\.", context=INSENTP)
    add(_word, hthing)
    add(_same, f"{thing}\\.", context=INSENTP)
    add(_same, thing)
    add(_amp, f"{thinga}\\.", context=INSENTP)
    add(_amp, thinga)
    add(_left_quote, "'", context="[A-Za-z][^ \t\n\r\u00a0]")
    add(_right_quote, REDAUX)
    add(_right_quote, APOS, "''", f"{QUOTE_CHARS}{{1,2}}")
    add(_same, "<<|>>")
    add(_same, MISCSYMBOL)
    add(_skip, "\x00", SPACES, "[\u200b\u200e\u200f\ufeff]")
    add(_constant("\n"), "\n")
    add(_skip, "&nbsp;")
    add(_skip, "[^\n]")  # untokenizable: CoreNLP deletes it (and logs a warning)
    return [_Rule(re.compile(pattern), action) for pattern, action in rules]


# Fast path for the most common case: a plain lower-case word followed by a space or the end.
_PLAIN_WORD = re.compile(r"[a-z]+(?=[ \n]|\Z)")
_PLAIN_SPACES = re.compile(f"[ \t]{SPACE}*")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> Iterable[str]:
    """Yield the raw PTB tokens of ``text`` (newlines yield ``"\\n"``), before lower-casing."""
    pos, end = 0, len(text)
    while pos < end:
        plain = _PLAIN_SPACES.match(text, pos) or _PLAIN_WORD.match(text, pos)
        if plain is not None and plain.group() not in _ASSIMILATIONS:
            if plain.group()[0] not in " \t":
                yield plain.group()
            pos = plain.end()
            continue
        best, best_length = None, 0
        for rule in _rules():
            match = rule.pattern.match(text, pos)
            if match is not None and match.end() - pos > best_length:
                best, best_length = (rule, match), match.end() - pos
        assert best is not None  # the last rule matches any character but a newline, handled above
        rule, match = best
        token_text = match.group("t") if "t" in rule.pattern.groupindex else match.group()
        token, length = rule.action(token_text)
        if token is not None:
            yield token
        pos += length


def _lines(text: str) -> list[str]:
    """Tokenize newline-separated captions like ``PTBTokenizer -preserveLines -lowerCase``."""
    lines: list[list[str]] = [[]]
    for token in _lex(text):
        if token == "\n":
            lines.append([])
        else:
            lines[-1].append(token.lower())
    return [" ".join(line) for line in lines]


def _drop_punctuation(line: str) -> str:
    """pycocoevalcap's post-processing of one output line of the jar."""
    return " ".join(word for word in line.rstrip().split(" ") if word not in PUNCTUATION)


def tokenize(text: str) -> str:
    """One caption tokenized as pycocoevalcap's PTBTokenizer does when it is the only caption."""
    return _drop_punctuation(_lines(_LINE_BREAKS.sub(" ", text.replace("\n", " ")))[0])


def tokenize_corpus(captions: Mapping[_Key, Sequence[str]]) -> dict[_Key, list[str]]:
    """Tokenize ``{id: [caption, ...]}`` exactly like ``PTBTokenizer().tokenize`` (raw strings in).

    The captions are lexed as one text, joined by newlines in the same order as the toolkit, because
    the jar's look-ahead can see the start of the next caption. An id without captions maps to ``[]``.
    """
    owners = [key for key, values in captions.items() for _ in values]
    joined = "\n".join(_LINE_BREAKS.sub(" ", c.replace("\n", " ")) for values in captions.values() for c in values)
    result: dict[_Key, list[str]] = {key: [] for key in captions}
    for key, line in zip(owners, _lines(joined), strict=True):
        result[key].append(_drop_punctuation(line))
    return result
