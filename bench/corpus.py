"""Real English text that benchmark prompts are cut from (public domain; fixed, so prompts never drift).

`prompts` tokenizes it once and cuts windows of exactly `length` token ids at evenly spaced starts,
wrapping around the end, so any number of prompts of any length comes from the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in
Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great
civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We
are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final
resting place for those who here gave their lives that that nation might live. It is altogether fitting
and proper that we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate
-- we can not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated
it, far above our poor power to add or detract. The world will little note, nor long remember what we say
here, but it can never forget what they did here. It is for us the living, rather, to be dedicated here
to the unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to
be here dedicated to the great task remaining before us -- that from these honored dead we take increased
devotion to that cause for which they gave the last full measure of devotion -- that we here highly
resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new birth
of freedom -- and that government of the people, by the people, for the people, shall not perish from the
earth.

When in the Course of human events, it becomes necessary for one people to dissolve the political bands
which have connected them with another, and to assume among the powers of the earth, the separate and
equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the
opinions of mankind requires that they should declare the causes which impel them to the separation. We
hold these truths to be self-evident, that all men are created equal, that they are endowed by their
Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness.
That to secure these rights, Governments are instituted among Men, deriving their just powers from the
consent of the governed, That whenever any Form of Government becomes destructive of these ends, it is
the Right of the People to alter or to abolish it, and to institute new Government, laying its foundation
on such principles and organizing its powers in such form, as to them shall seem most likely to effect
their Safety and Happiness.
"""


class Encoder(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


def prompts(tokenizer: Encoder, count: int, length: int, *, text: str = TEXT) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids each, cut from `text` at evenly spaced starts."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens; a prompt needs {length}")
    stride = max(1, len(ids) // max(count, 1))
    return [_window(ids, i * stride, length) for i in range(count)]


def _window(ids: Sequence[int], start: int, length: int) -> list[int]:
    return [ids[(start + j) % len(ids)] for j in range(length)]
