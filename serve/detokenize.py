"""Streaming text of a growing token list, decoding a few tokens per step, not the whole output.

Decoding the whole output at every new token costs O(n) per token, O(n^2) per request. The
decoder keeps two offsets into the ids (the scheme vLLM's incremental detokenizer uses): the
text is extended by `decode(ids[prefix:]) - decode(ids[prefix:read])`, so each step decodes only
the tokens since the last stable point plus a little context (a tokenizer may render a token
differently at the start of a sequence, e.g. SentencePiece's leading space, so both decodes start
at the same token). A token that ends in the middle of a UTF-8 character (decoded as U+FFFD) is
held until the character is complete.
"""
from __future__ import annotations

from typing import Sequence


class IncrementalText:
  """The decoded text of ids[:n] as ids grow (`update`), equal to `tokenizer.decode(ids)` but for
  a held incomplete character at the end."""

  def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
    self.tokenizer = tokenizer
    self.skip = skip_special_tokens
    self.text = ""
    self.prefix = 0  # ids[prefix:read] decode to the tail of `text` (context for the next step)
    self.read = 0    # ids[:read] are in `text`

  def _decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip)

  def update(self, ids: Sequence[int]) -> str:
    """The text of `ids` (which extend the ids of the last call), an incomplete character at
    the end held back."""
    if len(ids) <= self.read:
      return self.text
    before = self._decode(ids[self.prefix:self.read])
    after = self._decode(ids[self.prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      self.text += after[len(before):]
      self.prefix, self.read = self.read, len(ids)
    return self.text
