"""The emulator's SentencePiece vocabulary: token counts, `/api/show` tokenizer arrays, output pieces.

The model file `data/emulator.model` ships with the package. It was trained once by `build()` on English text
that the Python standard library carries (its module docstrings), so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib
import io
import pkgutil
from pathlib import Path

import sentencepiece as spm

__all__ = ["GGUF_TOKEN_TYPES", "MODEL_PATH", "Vocabulary", "build", "default_vocabulary"]

MODEL_PATH = Path(__file__).parent / "data" / "emulator.model"

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type enum).
GGUF_TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}


class Vocabulary:
    """A loaded SentencePiece model with the views the emulator needs.

    Contract: `count(text)` is the number of pieces SentencePiece produces for `text` (no BOS/EOS);
    `pieces()`, `scores()` and `token_types()` are parallel arrays indexed by token id, exactly what a GGUF
    file with `tokenizer.ggml.model == "llama"` carries, so a client can rebuild this same model from them.
    """

    def __init__(self, model_path: Path = MODEL_PATH) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()

    def count(self, text: str) -> int:
        """Tokens in `text` as this vocabulary splits it."""
        if not text:
            return 0
        return len(self._sp.encode(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return str(self._sp.decode(ids))

    def piece(self, token_id: int) -> str:
        """The surface text of one token (SentencePiece's U+2581 shown as a space)."""
        return str(self._sp.id_to_piece(token_id)).replace("\u2581", " ")

    def is_normal(self, token_id: int) -> bool:
        """True for a token that is ordinary text (not control, unknown, byte or unused)."""
        sp = self._sp
        return not (
            sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_byte(token_id)
            or sp.is_unused(token_id)
        )

    def pieces(self) -> list[str]:
        """Every piece string, by id, as stored in the model (with U+2581)."""
        return [str(self._sp.id_to_piece(i)) for i in range(self.size)]

    def scores(self) -> list[float]:
        """Every piece's score, by id."""
        return [float(self._sp.get_score(i)) for i in range(self.size)]

    def token_types(self) -> list[int]:
        """Every piece's GGUF token type, by id."""
        sp = self._sp
        types: list[int] = []
        for i in range(self.size):
            if sp.is_unknown(i):
                types.append(GGUF_TOKEN_TYPES["unknown"])
            elif sp.is_control(i):
                types.append(GGUF_TOKEN_TYPES["control"])
            elif sp.is_byte(i):
                types.append(GGUF_TOKEN_TYPES["byte"])
            elif sp.is_unused(i):
                types.append(GGUF_TOKEN_TYPES["unused"])
            else:
                types.append(GGUF_TOKEN_TYPES["normal"])
        return types


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The shipped vocabulary, loaded once per process."""
    return Vocabulary()


def _stdlib_corpus() -> str:
    """English prose from the standard library's docstrings (deterministic for one Python version)."""
    import sys

    texts: list[str] = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc)
    return "\n".join(dict.fromkeys(texts))


def build(out_path: Path = MODEL_PATH, vocab_size: int = 8000) -> None:
    """Train the vocabulary and write it to `out_path`.

    A BPE SentencePiece model with byte fallback, identity normalisation and a space prefix: the kind of
    vocabulary llama.cpp's SPM tokenizer reads from a GGUF (tokenizer.ggml.model = "llama"), so that a
    client rebuilding it from /api/show's arrays gets exactly the same segmentation.
    """
    corpus = _stdlib_corpus()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=2,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())


if __name__ == "__main__":
    build()
