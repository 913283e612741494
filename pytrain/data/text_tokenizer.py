"""The tokenizers text data is read with: by `python -m pytrain.data.tokenize` and by the streamed datasets.

A tokenizer spec is `byte` (UTF-8 bytes, ids 0..255, no dependency), a Hugging Face `tokenizers` JSON file,
a local transformers tokenizer folder (its tokenizer.json, and tokenizer_config.json for BOS/EOS), or a
sentencepiece `.model` file (the last three need `pip install 'pytrain[data]'`).

BOS/EOS around each sample (`add_bos_eos`):
  none       the text's ids only;
  bos / eos  the tokenizer's BOS id before / EOS id after them;
  both       BOS and EOS around every sample (what InternLM's tools/tokenizer.py writes);
  tokenizer  what the tokenizer's own settings add: a tokenizers JSON's post-processor (transformers saves
             add_bos_token / add_eos_token into it), nothing for `byte` and sentencepiece (whose
             SentencePieceProcessor adds none unless asked).
BOS/EOS ids come from the tokenizer (sentencepiece's bos_id()/eos_id(), a transformers folder's
tokenizer_config.json or special_tokens_map.json) unless given.
"""

import json
from pathlib import Path

import numpy as np

EXTRA_HINT = "pip install 'pytrain[data]' (tokenizers, sentencepiece)"
ADD_BOS_EOS = ("none", "bos", "eos", "both", "tokenizer")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or cannot add what was asked; the message names it and the fix."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: lossless for any text, no vocabulary to ship."""

    vocab_size = 256
    bos_id = eos_id = None

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[bytes]:
        return [t.encode("utf-8") for t in texts]  # bytes are a sequence of the ids 0..255

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8")


class HFTokenizer:
    def __init__(self, path: Path, what: str, config_folder: Path | None = None):
        self.arguments = (path, what, config_folder)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"{what} {path} needs the `tokenizers` library: {EXTRA_HINT}") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises its own exception type
            raise TokenizerError(f"{what} {path} is not a Hugging Face tokenizers JSON file ({error})") from None
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.bos_id = self.eos_id = None
        if config_folder is not None:
            self.bos_id, self.eos_id = (self._special_id(config_folder, name) for name in ("bos_token", "eos_token"))

    def __reduce__(self):  # a copy for another process loads the file again
        return HFTokenizer, self.arguments

    def _special_id(self, folder: Path, name: str) -> int | None:
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / file
            token = json.loads(path.read_text(encoding="utf-8")).get(name) if path.exists() else None
            if isinstance(token, dict):  # transformers' AddedToken form
                token = token.get("content")
            if isinstance(token, str):
                return self.tokenizer.token_to_id(token)
        return None

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    def __init__(self, path: Path, what: str):
        self.arguments = (path, what)
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(f"{what} {path} needs the `sentencepiece` library: {EXTRA_HINT}") from None
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{what} {path} is not a sentencepiece model ({error})") from None
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None

    def __reduce__(self):
        return SentencePieceTokenizer, self.arguments

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.processor.encode(texts)]

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])


def load_tokenizer(spec: str, what: str = "--tokenizer"):
    """The tokenizer a spec names (module doc); `what` names the setting in error messages."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise TokenizerError(
                f"{what} {spec}: the folder has no tokenizer.json (a transformers tokenizer folder saved "
                f"with a fast tokenizer has one); give a tokenizers .json, a sentencepiece .model, or 'byte'"
            )
        return HFTokenizer(path / "tokenizer.json", what, config_folder=path)
    if not path.exists():
        raise TokenizerError(f"{what} {spec!r} does not exist: give 'byte' or the path of a tokenizer")
    if path.suffix == ".json":
        return HFTokenizer(path, what)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, what)
    raise TokenizerError(
        f"{what} {spec}: unknown kind; give 'byte', a tokenizers .json file, a transformers tokenizer "
        f"folder, or a sentencepiece .model file"
    )


class SampleEncoder:
    """texts -> token ids per sample, with BOS/EOS as add_bos_eos says (module doc). Picklable when its
    tokenizer is: loader workers get a copy."""

    def __init__(self, tokenizer, add_bos_eos: str = "none", bos_id=None, eos_id=None, what: str = "--add_bos_eos"):
        if add_bos_eos not in ADD_BOS_EOS:
            raise TokenizerError(f"{what}={add_bos_eos!r}: give one of {', '.join(map(repr, ADD_BOS_EOS))}")
        self.tokenizer, self.add = tokenizer, add_bos_eos
        self.bos_id = bos_id if bos_id is not None else tokenizer.bos_id
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_id
        for name, needed, value in (("BOS", ("bos", "both"), self.bos_id), ("EOS", ("eos", "both"), self.eos_id)):
            if add_bos_eos in needed and value is None:
                raise TokenizerError(
                    f"{what}={add_bos_eos!r} needs a {name} id, and the tokenizer defines none: give the id "
                    f"({name.lower()}_id) or another {what}"
                )
        self.vocab_size = tokenizer.vocab_size

    def encode_batch(self, texts: list[str]) -> list:
        """Each sample's ids: bytes from the byte tokenizer with nothing added (the tokenize command's fast
        path), else int64 arrays."""
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=self.add == "tokenizer")
        before = [self.bos_id] if self.add in ("bos", "both") else []
        after = [self.eos_id] if self.add in ("eos", "both") else []
        if not before and not after:
            return encoded
        return [
            np.concatenate([before, np.frombuffer(e, np.uint8) if isinstance(e, bytes) else e, after]).astype(np.int64)
            for e in encoded
        ]

    def encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        """encode_batch, always as int64 arrays."""
        return [
            np.frombuffer(e, np.uint8).astype(np.int64) if isinstance(e, bytes) else e for e in self.encode_batch(texts)
        ]
